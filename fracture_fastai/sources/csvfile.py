"""CSV lists of images: columns file, label[, split], files relative to the CSV's folder."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from .table import SPLIT_ALIASES, DataError, DataTable, check_path, group_of, grouped_split

__all__ = ["read_csv"]


def read_csv(path, valid_pct: float = 0.2, seed: int = 42) -> DataTable:
    "Table of a CSV with columns file, label[, split]; relative files are taken from the CSV's folder."
    path = check_path(path)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable CSV ({e.__class__.__name__}); expected columns file,label[,split]") from None
    missing = {"file", "label"} - set(df.columns)
    if missing:
        raise DataError(f"{path} lacks column(s) {sorted(missing)}; expected columns file,label[,split]")
    if df.empty:
        raise DataError(f"{path} lists no images (a header only); add rows file,label[,split]")
    skipped = Counter()
    no_file = df.file.isna() | (df.file.astype(str).str.strip() == "")
    no_label = ~no_file & (df.label.isna() | (df.label.astype(str).str.strip() == ""))
    if no_file.any(): skipped["row without a file"] += int(no_file.sum())
    if no_label.any(): skipped["empty label"] += int(no_label.sum())
    df = df[~no_file & ~no_label].copy()
    df["file"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in df.file.astype(str).str.strip()]
    df["label"] = df.label.astype(str).str.strip()
    labels_per_file = df.groupby("file").label.nunique()
    if (labels_per_file > 1).any():
        clash = labels_per_file[labels_per_file > 1].index[0]
        raise DataError(f"{path} gives {int((labels_per_file > 1).sum())} file(s) two or more labels (e.g. {clash}: "
                        f"{', '.join(sorted(df.label[df.file == clash].unique()))}); keep one label per file")
    df = df.drop_duplicates(["file", "label"])
    exists = df.file.map(lambda f: Path(f).is_file())
    if (~exists).any(): skipped["missing file"] += int((~exists).sum())
    df = df[exists]
    if df.empty:
        raise DataError(f"none of the files listed in {path} exist; paths are read relative to the CSV's folder")
    if "split" in df.columns:
        df["split"] = df.split.astype(str).str.lower().map(SPLIT_ALIASES)
        if df.split.isna().any():
            raise DataError(f"{path} has split values other than {sorted(SPLIT_ALIASES)}; fix the split column")
    else:
        df["split"] = "train"
    df["group"] = df.file.map(group_of)
    df["polygons"] = [[] for _ in range(len(df))]
    df = df[["file", "label", "split", "group", "polygons"]].reset_index(drop=True)
    if not (df.split == "valid").any():
        df = grouped_split(df, valid_pct, seed)
    return DataTable(df, skipped, source="csv")
