"""YOLO exports (`data.yaml` + `{train,val|valid,test}/{images,labels}`), labelled by the body region of their classes."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from .table import SPLIT_ALIASES, DataError, DataTable, check_path, group_of, image_files

__all__ = ["REGIONS", "region_of", "read_yolo", "parse_yolo_label"]

REGIONS = ("elbow", "fingers", "forearm", "humerus", "shoulder", "wrist")
_YOLO_SLACK = 1e-3  # exporters round normalised coordinates: 1.0004 is still on the image
# Words that qualify a YOLO class name without naming the body region.
_FINDING_WORDS = {"positive", "negative", "fracture", "fractures", "fractured", "normal", "abnormal"}


def region_of(class_name: str) -> str:
    "Body region named by a YOLO class name: 'elbow positive' -> 'elbow', 'humerus fracture' -> 'humerus'."
    words = [w for w in re.split(r"[\s_\-]+", class_name.strip().lower()) if w and w not in _FINDING_WORDS]
    if not words:
        raise DataError(f"class name {class_name!r} names no body region; rename it in data.yaml")
    return " ".join(words)


def parse_yolo_label(text: str, bad: Counter | None = None):
    "Class ids and fracture polygons (normalised (x, y) pairs) of one YOLO label file; boxes become 4-point polygons."
    # Lines that cannot be a label (text, inf/nan, a negative class, a shape outside the image) are left out and
    # counted in `bad` by reason, never scored: a broken annotation must not pass as a fracture outline.
    bad = Counter() if bad is None else bad
    ids, polygons = [], []
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            bad["label line not numeric"] += 1
            continue
        if not all(math.isfinite(v) for v in values):
            bad["label line with inf or nan"] += 1
            continue
        cls, coords = values[0], values[1:]
        if cls < 0 or cls != int(cls):
            bad["negative or fractional class id"] += 1
            continue
        if len(coords) == 4:  # box: cx cy w h
            cx, cy, w, h = coords
            poly = [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            poly = list(zip(coords[0::2], coords[1::2]))
        else:
            bad["label line of the wrong length"] += 1
            continue
        if not all(-_YOLO_SLACK <= v <= 1 + _YOLO_SLACK for xy in poly for v in xy):
            bad["label outside the image (coordinates beyond 0..1)"] += 1
            continue
        ids.append(int(cls))
        polygons.append([[round(x, 6), round(y, 6)] for x, y in poly])
    return ids, polygons


def _yolo_names(cfg: dict) -> dict:
    names = cfg.get("names")
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, list):
        return dict(enumerate(map(str, names)))
    raise DataError("data.yaml has no 'names' list; add the class names in YOLO order")


def read_yolo(path) -> DataTable:
    "Table of a YOLO export (`data.yaml` + `{train,val|valid,test}/{images,labels}`), labelled by body region."
    import yaml
    path = check_path(path)
    yaml_file = path if path.is_file() else path / "data.yaml"
    if not yaml_file.exists():
        raise DataError(f"no data.yaml in {str(path)!r}; a YOLO export needs one")
    try:
        cfg = yaml.safe_load(yaml_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{yaml_file} is not valid YAML ({e.__class__.__name__}); fix or re-export it") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{yaml_file} holds a {type(cfg).__name__}, not a mapping of train/val/names; fix or re-export it")
    names = _yolo_names(cfg)
    root = yaml_file.parent
    if cfg.get("path") and Path(str(cfg["path"])).is_absolute() and Path(str(cfg["path"])).is_dir():
        root = Path(str(cfg["path"]))  # an export whose path: still points somewhere real
    elif cfg.get("path") and not Path(str(cfg["path"])).is_absolute() and (root / str(cfg["path"])).is_dir():
        root = root / str(cfg["path"])
    rows, unlabelled, skipped, notes = [], [], Counter(), []
    for key, split in SPLIT_ALIASES.items():
        if key not in cfg or not cfg[key]:
            continue
        images = _resolve_split_dir(root, yaml_file.parent, str(cfg[key]))
        if images is None:
            notes.append(f"split {key!r} named in data.yaml but {cfg[key]!r} is missing; left out")
            continue
        labels = images.parent / "labels" if images.name == "images" else images
        for img in image_files(images, recursive=False, skipped=skipped):
            label_file = labels / (img.stem + ".txt")
            ids, polygons = parse_yolo_label(label_file.read_text(), skipped) if label_file.exists() else ([], [])
            if not ids:
                skipped["unlabelled"] += 1
                unlabelled.append(dict(file=str(img), split=split, group=group_of(img)))
                continue
            try:
                regions = {region_of(names[i]) for i in ids}
            except KeyError:
                skipped["unknown class id"] += 1
                continue
            if len(regions) > 1:
                skipped["several regions"] += 1
                continue
            rows.append(dict(file=str(img), label=regions.pop(), split=split, group=group_of(img), polygons=polygons))
    if not rows:
        raise DataError(f"no labelled images found under {str(root)!r}; check data.yaml's train/val entries")
    return DataTable(pd.DataFrame(rows), skipped, notes, source="yolo",
                     unlabelled=pd.DataFrame(unlabelled, columns=["file", "split", "group"]))


def _resolve_split_dir(root: Path, yaml_dir: Path, entry: str):
    "data.yaml's `train: ../train/images` style entries, tried against the yaml's folder when `path:` points nowhere."
    # Roboflow writes '../train/images' relative to a folder one level down: try it without the '..' too.
    inside = Path(*[p for p in Path(entry).parts if p not in ("..", ".")] or ["."])
    candidates = [root / entry, yaml_dir / entry, yaml_dir / inside]
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None
