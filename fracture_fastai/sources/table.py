"""The one table every source turns into (file, label, split, group, polygons, ...) and the split logic the readers share."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..dicom import DICOM_EXTS
from ..errors import DataError

__all__ = ["DataError", "DataTable", "IMAGE_EXTS", "image_files", "SPLITS", "SPLIT_ALIASES", "group_of", "grouped_split", "stratified_split",
           "check_path", "is_image"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"} | DICOM_EXTS
SPLITS = ("train", "valid", "test")
# Roboflow writes "valid", Ultralytics "val"; both mean the package's "valid".
SPLIT_ALIASES = {"train": "train", "val": "valid", "valid": "valid", "validation": "valid", "test": "test"}


@dataclass
class DataTable:
    "The one table every source turns into, plus what was left out and why."
    df: pd.DataFrame  # columns: file, label, split, group, polygons[, body_part, hardware, ... as the source has them]
    skipped: Counter = field(default_factory=Counter)  # reason -> number of images left out
    notes: list = field(default_factory=list)  # non-fatal remarks (e.g. a split named but missing)
    source: str = ""  # which reader made it: yolo, folders, csv, fracatlas
    # Images the source holds without a label (a YOLO export's empty label files): file, split, group. Never trained
    # on as they are; `pseudo.pseudo_label` can label the train split's from a teacher model.
    unlabelled: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["file", "split", "group"]))

    @property
    def classes(self) -> list:
        return sorted(self.df.label.unique())

    def counts(self) -> dict:
        "{split: {class: count}} in the package's split order."
        out = {}
        for split in SPLITS:
            part = self.df[self.df.split == split]
            if len(part):
                out[split] = {k: int(v) for k, v in sorted(part.label.value_counts().items())}
        return out

    def counts_by(self, column: str) -> dict:
        "{split: {value of `column`: {class: count}}}, e.g. by body part; {} when the table has no such column."
        if column not in self.df.columns: return {}
        out = {}
        for split in SPLITS:
            part = self.df[self.df.split == split]
            if len(part):
                out[split] = {str(value): {k: int(v) for k, v in sorted(rows.label.value_counts().items())}
                              for value, rows in sorted(part.groupby(column), key=lambda kv: str(kv[0]))}
        return out

    def summary(self) -> dict:
        out = {"splits": self.counts(), "skipped": dict(self.skipped)}
        if "body_part" in self.df.columns:  # sources that tag body parts (FracAtlas): the split's balance by part
            out["body_parts"] = self.counts_by("body_part")
        return out


def group_of(path) -> str:
    "The source radiograph of an image: Roboflow's augmented copies share the name before '.rf.'."
    name = Path(path).name
    return name.split(".rf.")[0] if ".rf." in name else Path(name).stem


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def image_files(
    folder,  # a folder of images
    recursive: bool = True,  # look in its subfolders too
    skipped: Counter | None = None,  # counts what is left out, by reason
) -> list:
    """The images in `folder`, sorted, as a collection copied between machines holds them: hidden files (macOS's `._*`
    twins of every image, `.DS_Store`, anything in a dot folder), broken links and other file types are left out."""
    folder, found = Path(folder), []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if p.is_dir(): continue
        if any(part.startswith(".") for part in p.relative_to(folder).parts): reason = "hidden file"
        elif not p.exists(): reason = "broken link"  # a symlink whose target is gone
        elif p.suffix.lower() not in IMAGE_EXTS: reason = "not an image"
        else:
            found.append(p)
            continue
        if skipped is not None: skipped[reason] += 1
    return found


def check_path(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; pass a YOLO export, a folder tree of classes, a CSV or a FracAtlas folder")
    return path


def grouped_split(df: pd.DataFrame, valid_pct: float = 0.2, seed: int = 42) -> pd.DataFrame:
    "Move about `valid_pct` of train's groups to 'valid', class by class, so no source radiograph is on both sides."
    if not 0 < valid_pct < 1:
        raise DataError(f"valid_pct must be between 0 and 1, got {valid_pct}")
    df = df.copy()
    rng = np.random.default_rng(seed)
    train = df[df.split == "train"]
    # A group is assigned by its most common label, so each class keeps roughly its share in valid.
    group_label = train.groupby("group").label.agg(lambda s: s.value_counts().index[0])
    valid_groups = []
    for _, groups in sorted(group_label.groupby(group_label).groups.items()):
        groups = sorted(groups)
        n = int(round(len(groups) * valid_pct))
        if len(groups) > 1:
            n = min(max(n, 1), len(groups) - 1)
        valid_groups += list(rng.choice(groups, size=n, replace=False)) if n else []
    df.loc[(df.split == "train") & df.group.isin(valid_groups), "split"] = "valid"
    return df


def stratified_split(
    df: pd.DataFrame,  # a table with columns group, label and the `by` columns; its split column is replaced
    fractions=(0.7, 0.15, 0.15),  # shares of train, valid, test (of the groups of each stratum)
    by=("label",),  # the columns whose combinations are the strata, e.g. ("label", "body_part")
    seed: int = 42,  # seeds the draw: the same table and seed give the same split
) -> pd.DataFrame:
    "Split whole groups into train/valid/test, stratum by stratum, so each keeps its share and no group straddles splits."
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be three shares (train, valid, test) summing to 1; got {fractions}")
    missing = {"group", *by} - set(df.columns)
    if missing:
        raise DataError(f"cannot stratify: the table lacks column(s) {sorted(missing)}")
    df = df.copy()
    rng = np.random.default_rng(seed)
    # A group (e.g. byte-identical copies of one radiograph) goes where its most common stratum goes.
    strata = df[list(by)].astype(str).agg(" | ".join, axis=1)
    group_stratum = strata.groupby(df.group).agg(lambda s: s.value_counts().index[0])
    split_of = {}
    for _, groups in sorted(group_stratum.groupby(group_stratum).groups.items()):
        groups = np.array(sorted(groups), dtype=object)[rng.permutation(len(groups))]
        n_valid, n_test = int(round(len(groups) * fractions[1])), int(round(len(groups) * fractions[2]))
        split_of.update({g: "valid" for g in groups[:n_valid]})
        split_of.update({g: "test" for g in groups[n_valid:n_valid + n_test]})
        split_of.update({g: "train" for g in groups[n_valid + n_test:]})
    df["split"] = df.group.map(split_of)
    return df
