"""Folder trees of classes: `{train,valid,test}/<class>/` or a flat `<class>/` tree split by group."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from .table import SPLIT_ALIASES, DataError, DataTable, check_path, group_of, grouped_split, image_files

__all__ = ["read_folders"]


def read_folders(path, valid_pct: float = 0.2, seed: int = 42) -> DataTable:
    "Table of an ImageNet-style tree `{train,valid,test}/<class>/` or of a flat `<class>/` tree split by group."
    path = check_path(path)
    subdirs = {p.name.lower(): p for p in path.iterdir() if p.is_dir()}
    split_dirs = {SPLIT_ALIASES[k]: v for k, v in subdirs.items() if k in SPLIT_ALIASES}
    rows, skipped, notes = [], Counter(), []
    if "train" in split_dirs:
        for split, folder in split_dirs.items():
            rows += _class_rows(folder, split, skipped, notes)
    else:
        rows = _class_rows(path, "train", skipped, notes)
    if not rows:
        raise DataError(f"no images found in class folders under {str(path)!r}; expected <class>/<image> or train/<class>/<image>")
    table = DataTable(pd.DataFrame(rows), skipped, notes, source="folders")
    if "valid" not in split_dirs:
        table.df = grouped_split(table.df, valid_pct, seed)
    return table


def _class_rows(folder: Path, split: str, skipped: Counter, notes: list) -> list:
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = image_files(class_dir, skipped=skipped)
        if not images:  # said, not dropped silently: a class that vanishes changes what the model can answer
            notes.append(f"class folder {str(class_dir)!r} holds no images; class {class_dir.name!r} left out of {split}")
        rows += [dict(file=str(p), label=class_dir.name, split=split, group=group_of(p), polygons=[]) for p in images]
    return rows
