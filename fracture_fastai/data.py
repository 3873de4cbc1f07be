"""Data sources -> one table (file, label, split, group, polygons) -> fastai DataLoaders.

Every dataset quirk (Roboflow's augmented copies, YOLO class names, unlabelled images)
is handled here; the rest of the package only sees the table.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

__all__ = ["DataError", "DataTable", "IMAGE_EXTS", "SPLITS", "REGIONS", "region_of", "group_of", "read_yolo",
           "read_folders", "read_csv", "load_table", "image_problem", "drop_unreadable", "grouped_split", "sample_per_class", "class_weights", "save_batch",
           "radiograph_dataloaders", "BALANCE", "COPIES", "default_workers", "RadiographDL"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "valid", "test")
REGIONS = ("elbow", "fingers", "forearm", "humerus", "shoulder", "wrist")
BALANCE = ("none", "oversample", "weights")
COPIES = ("one", "all")  # per training epoch: one image of each source radiograph (group), or every image
# Roboflow writes "valid", Ultralytics "val"; both mean the package's "valid".
_SPLIT_ALIASES = {"train": "train", "val": "valid", "valid": "valid", "validation": "valid", "test": "test"}
_YOLO_SLACK = 1e-3  # exporters round normalised coordinates: 1.0004 is still on the image
# Words that qualify a YOLO class name without naming the body region.
_FINDING_WORDS = {"positive", "negative", "fracture", "fractures", "fractured", "normal", "abnormal"}


@dataclass
class DataTable:
    "The one table every source turns into, plus what was left out and why."
    df: pd.DataFrame  # columns: file, label, split, group, polygons
    skipped: Counter = field(default_factory=Counter)  # reason -> number of images left out
    notes: list = field(default_factory=list)  # non-fatal remarks (e.g. a split named but missing)
    source: str = ""  # which reader made it: yolo, folders, csv, demo

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

    def summary(self) -> dict:
        return {"splits": self.counts(), "skipped": dict(self.skipped)}


def region_of(class_name: str) -> str:
    "Body region named by a YOLO class name: 'elbow positive' -> 'elbow', 'humerus fracture' -> 'humerus'."
    words = [w for w in re.split(r"[\s_\-]+", class_name.strip().lower()) if w and w not in _FINDING_WORDS]
    if not words:
        raise DataError(f"class name {class_name!r} names no body region; rename it in data.yaml")
    return " ".join(words)


def group_of(path) -> str:
    "The source radiograph of an image: Roboflow's augmented copies share the name before '.rf.'."
    name = Path(path).name
    return name.split(".rf.")[0] if ".rf." in name else Path(name).stem


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def _check_dir(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; pass a YOLO export, a folder tree of classes or a CSV")
    return path


def _parse_yolo_label(text: str, bad: Counter | None = None):
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
    path = _check_dir(path)
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
    rows, skipped, notes = [], Counter(), []
    for key, split in _SPLIT_ALIASES.items():
        if key not in cfg or not cfg[key]:
            continue
        images = _resolve_split_dir(root, yaml_file.parent, str(cfg[key]))
        if images is None:
            notes.append(f"split {key!r} named in data.yaml but {cfg[key]!r} is missing; left out")
            continue
        labels = images.parent / "labels" if images.name == "images" else images
        for img in sorted(p for p in images.iterdir() if _is_image(p)):
            label_file = labels / (img.stem + ".txt")
            ids, polygons = _parse_yolo_label(label_file.read_text(), skipped) if label_file.exists() else ([], [])
            if not ids:
                skipped["unlabelled"] += 1
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
    return DataTable(pd.DataFrame(rows), skipped, notes, source="yolo")


def _resolve_split_dir(root: Path, yaml_dir: Path, entry: str):
    "data.yaml's `train: ../train/images` style entries, tried against the yaml's folder when `path:` points nowhere."
    # Roboflow writes '../train/images' relative to a folder one level down: try it without the '..' too.
    inside = Path(*[p for p in Path(entry).parts if p not in ("..", ".")] or ["."])
    candidates = [root / entry, yaml_dir / entry, yaml_dir / inside]
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


def read_folders(path, valid_pct: float = 0.2, seed: int = 42) -> DataTable:
    "Table of an ImageNet-style tree `{train,valid,test}/<class>/` or of a flat `<class>/` tree split by group."
    path = _check_dir(path)
    subdirs = {p.name.lower(): p for p in path.iterdir() if p.is_dir()}
    split_dirs = {_SPLIT_ALIASES[k]: v for k, v in subdirs.items() if k in _SPLIT_ALIASES}
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
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
        if not images:  # said, not dropped silently: a class that vanishes changes what the model can answer
            notes.append(f"class folder {str(class_dir)!r} holds no images; class {class_dir.name!r} left out of {split}")
        if len(files) > len(images):
            skipped["not an image"] += len(files) - len(images)
        rows += [dict(file=str(p), label=class_dir.name, split=split, group=group_of(p), polygons=[]) for p in images]
    return rows


def read_csv(path, valid_pct: float = 0.2, seed: int = 42) -> DataTable:
    "Table of a CSV with columns file, label[, split]; relative files are taken from the CSV's folder."
    path = _check_dir(path)
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
        df["split"] = df.split.astype(str).str.lower().map(_SPLIT_ALIASES)
        if df.split.isna().any():
            raise DataError(f"{path} has split values other than {sorted(_SPLIT_ALIASES)}; fix the split column")
    else:
        df["split"] = "train"
    df["group"] = df.file.map(group_of)
    df["polygons"] = [[] for _ in range(len(df))]
    df = df[["file", "label", "split", "group", "polygons"]].reset_index(drop=True)
    if not (df.split == "valid").any():
        df = grouped_split(df, valid_pct, seed)
    return DataTable(df, skipped, source="csv")


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


def image_problem(path) -> str | None:
    "None if the image at `path` decodes completely, else why not: 'unreadable image' or 'image too large'."
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # > 89 Mpx: refused, as over 179 Mpx
            with Image.open(path) as im:
                im.load()  # every byte decoded: a truncated file fails here, not in the middle of an epoch
                return None if im.size[0] > 0 and im.size[1] > 0 else "unreadable image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image too large"
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
        return "unreadable image"


def _verdicts_file() -> Path | None:
    from .cache import default_cache_dir
    root = default_cache_dir()
    return None if root is None else root / "image-verdicts-v1.json"


def drop_unreadable(table: DataTable) -> DataTable:
    "Leave out (and count, by reason) files that do not decode completely, so one bad file cannot stop a run mid-epoch."
    import json
    # A full decode of every image takes seconds: the verdicts are kept beside the preprocessing cache, keyed by
    # path, size and modification time, so that a second load of the same data only looks them up.
    store = _verdicts_file()
    try: verdicts = json.loads(store.read_text()) if store is not None and store.is_file() else {}
    except (OSError, ValueError): verdicts = {}
    new, problems = 0, []
    for f in table.df.file:
        try: st = os.stat(f)
        except OSError:
            problems.append("unreadable image")
            continue
        key = f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}"
        if key not in verdicts:
            verdicts[key], new = image_problem(f) or "", new + 1
        problems.append(verdicts[key] or None)
    if new and store is not None:
        try:  # atomic, so two runs sharing the store never leave half a file; a lost update only costs a re-check
            from .files import write_text
            write_text(json.dumps(verdicts), store)
        except OSError:
            pass
    problems = pd.Series(problems, index=table.df.index)
    for reason, n in problems.value_counts().items():
        table.skipped[reason] += int(n)
    table.df = table.df[problems.isna()].reset_index(drop=True)
    if table.df.empty:
        raise DataError("none of the images can be read; check that the files are images (jpg, png, ...)")
    return table


def load_table(path, valid_pct: float = 0.2, seed: int = 42) -> DataTable:
    "Whatever `path` is (YOLO export, folder tree, CSV), its table of readable images. A missing valid split is carved."
    table = drop_unreadable(_read_any(path, valid_pct, seed))
    _note_shared_groups(table)
    return table


def _note_shared_groups(table: DataTable):
    "Say so where the splits a dataset ships with share source radiographs: its validation score is then optimistic."
    groups = {split: set(table.df.group[table.df.split == split]) for split in SPLITS}
    for split in ("valid", "test"):
        shared = groups["train"] & groups[split]
        if shared:
            table.notes.append(f"{len(shared)} of {len(groups[split])} {split} radiographs share a source name with "
                               f"train images (as the dataset ships); {split} accuracy may be optimistic")


def _read_any(path, valid_pct: float, seed: int) -> DataTable:
    path = _check_dir(path)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            table = read_yolo(path)
        elif path.suffix.lower() == ".csv":
            return read_csv(path, valid_pct, seed)
        else:
            raise DataError(f"{str(path)!r} is a file but neither a CSV nor a data.yaml; pass a dataset folder")
    elif (path / "data.yaml").exists():
        table = read_yolo(path)
    elif not any(path.iterdir()):
        raise DataError(f"data folder {str(path)!r} is empty; put class folders or a YOLO export in it")
    else:
        return read_folders(path, valid_pct, seed)
    if not (table.df.split == "valid").any():
        table.df = grouped_split(table.df, valid_pct, seed)
        table.notes.append(f"no validation split: {valid_pct:.0%} of train's radiographs held out, grouped by source")
    return table


def sample_per_class(df: pd.DataFrame, n: int, seed: int = 42) -> pd.DataFrame:
    "At most `n` images per class per split, whole groups first, for quick runs."
    rng = np.random.default_rng(seed)
    parts = []
    for _, part in df.groupby(["split", "label"], sort=True):
        groups = part.group.unique()
        order = rng.permutation(len(groups))
        keep, total = [], 0
        for gi in order:  # whole groups, so a later grouped split stays clean
            size = int((part.group == groups[gi]).sum())
            if total and total + size > n:
                continue
            keep.append(groups[gi]); total += size
            if total >= n:
                break
        parts.append(part[part.group.isin(keep)].head(n))
    return pd.concat(parts).reset_index(drop=True)


def class_weights(dls):
    "Inverse-frequency loss weights of `dls`' training labels, normalised to mean 1, in vocab order."
    import torch
    classes = list(dls.vocab)
    counts = dls.train_ds.items.label.value_counts().reindex(classes, fill_value=0).to_numpy(dtype=float)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def default_workers(device=None) -> int:
    "DataLoader workers for training on `device` (None: CUDA when available): none on the CPU, up to 8 for a GPU."
    import torch
    try: cores = len(os.sched_getaffinity(0))
    except AttributeError: cores = os.cpu_count() or 1
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    # On the CPU the model needs every core: measured on 2 cores, one worker made lr_find 4.7x slower (the model's
    # OpenMP threads spin against the worker process), while the cached pipeline costs ~4 % of a training step.
    # A GPU waits for its batches instead, so there the workers take every core but one.
    return max(0, min(8, cores - 1)) if cuda else 0


def _load_dl_class():
    "`RadiographDL`, defined on first use so that importing this module does not import fastai."
    global RadiographDL
    if "RadiographDL" in globals(): return RadiographDL
    from fastai.data.core import TfmdDL
    from fastcore.meta import delegates

    @delegates()
    class _RadiographDL(TfmdDL):
        "Training DataLoader: each epoch one image per group (source radiograph), a different one each epoch, optionally class-weighted."
        def __init__(self, dataset=None, bs=None,
                     groups=None,  # group of each item; None: every item is its own group
                     wgts=None,  # sampling weight of each item (oversampling); None: uniform
                     **kwargs):
            super().__init__(dataset=dataset, bs=bs, **kwargs)
            self.members = None
            if groups is not None:
                codes = pd.factorize(pd.Series(groups))[0]
                order = np.argsort(codes, kind="stable")
                self.members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
                self.n = len(self.members)  # an epoch is one pass over the radiographs
            self.wgts = None if wgts is None else np.asarray(wgts, dtype=float)

        def get_idxs(self):
            if not self.shuffle or (self.members is None and self.wgts is None): return super().get_idxs()
            # self.rng is reseeded from the DataLoader's seeded rng every epoch: reproducible, and new each epoch.
            if self.members is None: idxs = np.arange(len(self.dataset))
            else: idxs = np.array([m[self.rng.randrange(len(m))] for m in self.members])
            if self.wgts is None: return self.rng.sample(list(idxs), len(idxs))
            p = self.wgts[idxs] / self.wgts[idxs].sum()
            rng = np.random.default_rng(self.rng.randrange(2**32))
            return list(rng.choice(idxs, size=len(idxs), p=p))

    _RadiographDL.__name__ = _RadiographDL.__qualname__ = "RadiographDL"
    RadiographDL = _RadiographDL
    return RadiographDL


def __getattr__(name):
    # `data.RadiographDL` made on first access (pickle's lookup included), so importing data.py needs no fastai.
    if name == "RadiographDL": return _load_dl_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def radiograph_dataloaders(
    table: DataTable,
    size: int = 224,  # side of the square (padded) model input
    bs: int = 32,  # batch size
    seed: int = 42,  # seeds the shuffling, the oversampling and the augmentation
    num_workers: int | None = None,  # DataLoader worker processes; None: `default_workers(device)`
    balance: str = "none",  # class imbalance: 'oversample' draws each class equally often; 'weights' and 'none' leave sampling be
    clahe: bool = True,  # CLAHE + median filter; False keeps only the grayscale conversion
    flip_vert: bool = False,  # add vertical flips to the augmentation
    augment: bool = True,  # fastai aug_transforms with radiograph defaults
    stats: tuple | None = None,  # normalisation (mean, std), e.g. `models.arch_stats(arch)`; None: ImageNet's
    device=None,  # None: fastai's default (CUDA when available)
    copies: str = "one",  # per training epoch: 'one' image of each source radiograph (group), or 'all' images
    cache=True,  # preprocessed images kept on disk: True (the user cache folder), False, or a `PreprocessCache`
    **preprocess,  # clahe_clip, clahe_grid, median, denoise for RadiographPreprocess
):
    "fastai DataLoaders (train, valid[, labelled test as `dls[2]`]) of `table` with radiograph preprocessing."
    from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, IndexSplitter, IntToFloatTensor, Normalize,
                                   TransformBlock, imagenet_stats, set_seed)
    from .cache import PreprocessCache, default_cache_dir
    from .transforms import RadiographLoader, radiograph_aug_transforms

    if balance not in BALANCE:
        raise DataError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
    if copies not in COPIES:
        raise DataError(f"copies must be one of {', '.join(COPIES)}; got {copies!r}")
    df = table.df
    items = df[df.split.isin(["train", "valid"])].reset_index(drop=True)
    for split in ("train", "valid"):
        if not (items.split == split).any():
            raise DataError(f"the data has no {split} images; check the dataset's splits")
    classes = sorted(items.label.unique())
    if len(classes) < 2:
        raise DataError(f"the data has one class only ({classes[0]!r}): a classifier needs at least two; "
                        "add the other classes' images")
    empty_valid = sorted(set(classes) - set(items[items.split == "valid"].label))
    if empty_valid:  # the run goes on, and says which recalls it cannot measure
        table.notes.append(f"class(es) {empty_valid} have no validation images: their validation recall is not measured")
    if set(items[items.split == "train"].label) != set(classes):
        missing = sorted(set(classes) - set(items[items.split == "train"].label))
        raise DataError(f"class(es) {missing} have no training images; add images or drop the class")
    set_seed(seed, reproducible=True)
    stats = stats or imagenet_stats
    batch_tfms = radiograph_aug_transforms(flip_vert=flip_vert, stats=stats) if augment else [Normalize.from_stats(*stats)]
    if cache is True: cache = PreprocessCache() if default_cache_dir() is not None else None
    if not clahe: preprocess = {**preprocess, "clahe_clip": 0, "median": 0}
    loader = RadiographLoader(size, cache=cache or None, **preprocess)
    block = DataBlock(
        blocks=(TransformBlock(type_tfms=loader, batch_tfms=IntToFloatTensor), CategoryBlock(vocab=classes)),
        get_x=ColReader("file"),
        get_y=ColReader("label"),
        splitter=IndexSplitter(items.index[items.split == "valid"]),
        batch_tfms=batch_tfms,
    )
    train = items[items.split == "train"]
    grouped = copies == "one" and train.group.duplicated().any()  # only where some radiograph has several images
    n_epoch = train.group.nunique() if grouped else len(train)
    # fastai drops the last partial training batch: a train set smaller than `bs` would give no batch at all.
    bs = max(1, min(bs, n_epoch))
    train_kwargs = {"groups": train.group.to_numpy()} if grouped else {}
    if balance == "oversample":
        # Each class drawn equally often: weight = 1 / class frequency (of radiographs, when drawing one per group).
        counts = (train.drop_duplicates("group") if grouped else train).label.value_counts()
        train_kwargs["wgts"] = (1.0 / train.label.map(counts)).to_numpy()
    num_workers = default_workers(device) if num_workers is None else num_workers
    # Persistent workers: lr_find and short epochs would otherwise fork a new worker for every epoch.
    dls = block.datasets(items).dataloaders(
        bs=bs, num_workers=num_workers, persistent_workers=num_workers > 0, device=device,
        dl_type=_load_dl_class(), dl_kwargs=[train_kwargs, {}], after_batch=block.batch_tfms, after_item=block.item_tfms)
    test = df[df.split == "test"]
    if len(test):
        unknown = sorted(set(test.label) - set(classes))
        if unknown:
            raise DataError(f"test class(es) {unknown} never occur in train; the model cannot predict them")
        dls.loaders.append(dls.test_dl(test.reset_index(drop=True), with_labels=True))
    return dls


def save_batch(dls, path, max_n: int = 9, split: int = 0) -> Path:
    "Save `show_batch` of the train (0) or valid (1) DataLoader as a PNG; works without a display."
    from .evaluate import plt  # pyplot on the file backend, or a notebook's own
    dls[split].show_batch(max_n=max_n, figsize=(9, 9))
    from .files import save_figure
    path = save_figure(plt.gcf(), path)
    plt.close("all")
    return path
