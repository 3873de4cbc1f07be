"""FracAtlas (Abedeen et al., Scientific Data 2023): `dataset.csv`, `images/{Fractured,Non_fractured}/`,
`Annotations/YOLO/*.txt` fracture boxes; labelled fractured / normal, with body part and hardware as columns."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pandas as pd

from .table import DataError, DataTable, check_path, is_image, stratified_split
from .yolo import parse_yolo_label

__all__ = ["FRACATLAS_SPLIT", "BODY_PARTS", "CSV_COLUMNS", "is_fracatlas", "read_fracatlas"]

# FracAtlas ships no classification split and no patient ids: a seeded one, stratified by label and body part.
FRACATLAS_SPLIT = (0.7, 0.15, 0.15)
BODY_PARTS = ("hand", "leg", "hip", "shoulder")  # the csv's one-hot tags; 'mixed' marks images showing several
# dataset.csv's columns as FracAtlas ships them; the reader needs image_id and fractured, and reads the tags it knows.
CSV_COLUMNS = ("image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "fractured",
               "fracture_count", "frontal", "lateral", "oblique")
_FOLDERS = {"Fractured": "fractured", "Non_fractured": "normal"}
_NEEDED = {"image_id", "fractured"}


def is_fracatlas(path) -> bool:
    "Does folder `path` have FracAtlas's layout (dataset.csv beside images/Fractured or images/Non_fractured)?"
    path = Path(path)
    return (path.is_dir() and (path / "dataset.csv").is_file()
            and any((path / "images" / folder).is_dir() for folder in _FOLDERS))


def _body_part(row) -> str:
    "'mixed' where the radiograph shows several parts (the csv then tags them too), else the one part tagged."
    if int(row.get("mixed", 0) or 0): return "mixed"
    tagged = [part for part in BODY_PARTS if int(row.get(part, 0) or 0)]
    return tagged[0] if len(tagged) == 1 else "mixed" if tagged else "unknown"


def _identical_groups(files) -> dict:
    "{file: group}: byte-identical files share the group of the first of them (in order), others are their own stem."
    # Only files whose sizes collide are hashed: identical bytes need equal sizes, and most sizes are unique.
    sizes = Counter()
    size_of = {}
    for f in files:
        size_of[f] = Path(f).stat().st_size
        sizes[size_of[f]] += 1
    first_of_digest, groups = {}, {}
    for f in files:
        group = Path(f).stem
        if sizes[size_of[f]] > 1:
            digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
            group = first_of_digest.setdefault(digest, group)
        groups[f] = group
    return groups


def read_fracatlas(
    path,  # the FracAtlas folder (dataset.csv, images/, Annotations/)
    seed: int = 42,  # seeds the stratified split
    fractions=FRACATLAS_SPLIT,  # train, valid, test shares
) -> DataTable:
    "Table of FracAtlas: label fractured/normal, fracture boxes as polygons, body_part and hardware columns, split 70/15/15."
    path = check_path(path)
    csv = path / "dataset.csv"
    try:
        meta = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{csv} is not a readable CSV ({e.__class__.__name__}); restore FracAtlas's dataset.csv") from None
    missing = _NEEDED - set(meta.columns)
    if missing:
        raise DataError(f"{csv} lacks column(s) {sorted(missing)}; FracAtlas's dataset.csv has image_id, ..., fractured")
    boxes_dir = path / "Annotations" / "YOLO"  # the original release also has COCO/VGG/PASCAL folders: the same boxes
    rows, skipped, notes, listed = [], Counter(), [], set()
    for row in meta.to_dict("records"):
        image_id = str(row["image_id"]).strip()
        listed.add(image_id)
        label = "fractured" if int(row["fractured"] or 0) else "normal"
        folder = "Fractured" if label == "fractured" else "Non_fractured"
        file = path / "images" / folder / image_id
        if not file.is_file():
            other = path / "images" / ("Non_fractured" if label == "fractured" else "Fractured") / image_id
            skipped["in the wrong label folder" if other.is_file() else "listed in dataset.csv but missing"] += 1
            continue
        polygons = []
        box_file = boxes_dir / (Path(image_id).stem + ".txt")
        if label == "fractured" and box_file.is_file():
            polygons = parse_yolo_label(box_file.read_text(), skipped)[1]
        rows.append(dict(file=str(file), label=label, split="train", group=Path(image_id).stem, polygons=polygons,
                         body_part=_body_part(row), hardware="yes" if int(row.get("hardware", 0) or 0) else "no"))
    unlisted = [p for folder in _FOLDERS if (path / "images" / folder).is_dir()
                for p in (path / "images" / folder).iterdir() if is_image(p) and p.name not in listed]
    if unlisted:
        skipped["image not in dataset.csv"] += len(unlisted)
    if not rows:
        raise DataError(f"none of the images listed in {csv} exist under {path / 'images'}; check the FracAtlas folder")
    df = pd.DataFrame(rows)
    df["group"] = df.file.map(_identical_groups(df.file.tolist()))
    n_copies = int(df.group.duplicated(keep=False).sum())
    if n_copies:
        notes.append(f"{n_copies} images are byte-identical copies ({df.group[df.group.duplicated(keep=False)].nunique()} "
                     "radiographs): each kept on one side of the split")
    clash = df.groupby("group").label.nunique()
    if (clash > 1).any():
        notes.append(f"{int((clash > 1).sum())} byte-identical radiograph(s) carry both labels")
    fractured = df[df.label == "fractured"]
    if len(fractured) and not boxes_dir.is_dir():
        notes.append(f"no {boxes_dir.relative_to(path)} folder: fracture boxes absent, localisation is not scored")
    elif len(fractured) and not fractured.polygons.map(len).any():
        notes.append("no fractured image has a YOLO box: localisation is not scored")
    df = stratified_split(df, fractions, by=("label", "body_part"), seed=seed)
    notes.append(f"split {'/'.join(f'{f:.0%}' for f in fractions)} (train/valid/test), seeded ({seed}), stratified by "
                 "label and body part: FracAtlas has no official split")
    return DataTable(df.reset_index(drop=True), skipped, notes, source="fracatlas")
