"""Data sources: one reader per format (YOLO export, folder tree, CSV, FracAtlas), each turning a dataset into the one
`DataTable`; `read_any` picks the reader for a path. Readers import `table` only, never this dispatcher."""
from __future__ import annotations

from .csvfile import read_csv
from .folders import read_folders
from .fracatlas import is_fracatlas, read_fracatlas
from .table import (IMAGE_EXTS, SPLIT_ALIASES, SPLITS, DataError, DataTable, check_path, group_of, grouped_split,
                    image_files, stratified_split)
from .yolo import REGIONS, parse_yolo_label, read_yolo, region_of

__all__ = ["DataError", "DataTable", "IMAGE_EXTS", "image_files", "SPLITS", "SPLIT_ALIASES", "REGIONS", "group_of", "grouped_split",
           "stratified_split", "region_of", "parse_yolo_label", "read_yolo", "read_folders", "read_csv", "read_fracatlas",
           "is_fracatlas", "read_any"]


def read_any(
    path,  # a YOLO export (folder or its data.yaml), a folder tree of classes, a CSV, or a FracAtlas folder
    valid_pct: float = 0.2,  # share of train's radiographs held out where the data has no validation split
    seed: int = 42,  # seeds that split
) -> DataTable:
    "The table of whatever `path` is, read by the reader of its format; a missing valid split is carved, grouped."
    path = check_path(path)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            table = read_yolo(path)
        elif path.name == "dataset.csv" and is_fracatlas(path.parent):  # FracAtlas's own csv, not a file,label list
            return read_fracatlas(path.parent, seed=seed)
        elif path.suffix.lower() == ".csv":
            return read_csv(path, valid_pct, seed)
        else:
            raise DataError(f"{str(path)!r} is a file but neither a CSV nor a data.yaml; pass a dataset folder")
    elif (path / "data.yaml").exists():
        table = read_yolo(path)
    elif is_fracatlas(path):
        return read_fracatlas(path, seed=seed)  # its own train/valid/test split
    elif not any(path.iterdir()):
        raise DataError(f"data folder {str(path)!r} is empty; put class folders or a YOLO export in it")
    else:
        return read_folders(path, valid_pct, seed)
    if not (table.df.split == "valid").any():
        table.df = grouped_split(table.df, valid_pct, seed)
        table.notes.append(f"no validation split: {valid_pct:.0%} of train's radiographs held out, grouped by source")
    return table
