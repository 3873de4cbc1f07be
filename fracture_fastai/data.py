"""Data sources -> one table (file, label, split, group, polygons) -> fastai DataLoaders.

The readers of each source format (YOLO export, folder tree, CSV, FracAtlas) live in `fracture_fastai.sources`;
here the table is checked image by image and turned into DataLoaders. The rest of the package only sees the table.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, UserError
from .sources import (IMAGE_EXTS, REGIONS, SPLITS, DataTable, group_of, grouped_split, image_files, read_any, read_csv,
                      read_fracatlas, read_folders, read_yolo, region_of, stratified_split)

__all__ = ["DataError", "DataTable", "IMAGE_EXTS", "image_files", "SPLITS", "REGIONS", "region_of", "group_of", "read_yolo",
           "read_folders", "read_csv", "read_fracatlas", "load_table", "image_problem", "drop_unreadable", "grouped_split",
           "stratified_split", "sample_per_class", "class_weights", "save_batch", "crop_views",
           "radiograph_dataloaders", "BALANCE", "COPIES", "default_workers", "RadiographDL"]

BALANCE = ("none", "oversample", "weights")
COPIES = ("one", "all")  # per training epoch: one image of each source radiograph (group), or every image


def image_problem(path) -> str | None:
    "None if the image at `path` decodes completely, else why not: 'unreadable image', 'image too large', or a DICOM's reason."
    import warnings
    from PIL import Image
    from .dicom import is_dicom
    if is_dicom(path):
        from .preprocess import read_radiograph
        try:
            pixels, _ = read_radiograph(path, dicom=True)  # the reader training uses: what fails here would fail there
            return None if pixels.ndim >= 2 and min(pixels.shape[:2]) > 0 else "unreadable image"
        except DataError as e:  # its reason says what to do (e.g. which decoder to install), counted per reason
            return "unreadable DICOM" if str(e).startswith("cannot read") else f"DICOM not decoded: {str(e).split(': ', 1)[-1]}"
        except UserError:
            raise  # pydicom itself is missing: every DICOM would fail, so say what to install
        except Exception:
            return "unreadable DICOM"
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
    "Whatever `path` is (YOLO export, folder tree, CSV, FracAtlas), its table of readable images. A missing valid split is carved."
    table = drop_unreadable(read_any(path, valid_pct, seed))
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
    crops: bool = False,  # add `crop_views` of the training images: close-ups of each annotated fracture
    masks: bool = False,  # training batches carry each image's fracture mask, for `cam.CamSupervision` (`--cam-loss`)
    **preprocess,  # clahe_clip, clahe_grid, median, denoise, dicom_window, reduce for the RadiographLoader
):
    "fastai DataLoaders (train, valid[, labelled test as `dls[2]`]) of `table` with radiograph preprocessing."
    from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, IndexSplitter, IntToFloatTensor, Normalize,
                                   TransformBlock, imagenet_stats, set_seed)
    from .cache import PreprocessCache, default_cache_dir
    from .transforms import RadiographLoader, SplitMask, radiograph_aug_transforms

    if balance not in BALANCE:
        raise DataError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
    if copies not in COPIES:
        raise DataError(f"copies must be one of {', '.join(COPIES)}; got {copies!r}")
    df = table.df
    items = df[df.split.isin(["train", "valid"])].reset_index(drop=True)
    if crops:
        views = crop_views(items[items.split == "train"], seed=seed) if "polygons" in items else items.iloc[:0]
        if not len(views):
            raise DataError("crops need fracture annotations (polygons or boxes) on training images; this data has none")
        items = pd.concat([items, views], ignore_index=True)
    if masks:
        train_rows = items.split == "train"
        def box(p): return _polygon_box(p) if isinstance(p, (list, tuple, np.ndarray)) else None
        if "polygons" not in items or items.polygons[train_rows].map(box).isna().all():
            raise DataError("fracture masks (--cam-loss) need fracture annotations (polygons or boxes) on training images; this data "
                            "has none: train without them (--cam-loss 0)")
        from .transforms import MaskedRadiograph
        items = items.copy()
        items.loc[train_rows, "file"] = [MaskedRadiograph(f, p) for f, p in zip(items.file[train_rows], items.polygons[train_rows])]
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
    if masks: batch_tfms = [*batch_tfms, SplitMask()]  # ordered before Normalize by its `order`
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


def _polygon_box(polygons) -> tuple | None:
    "(x0, y0, x1, y1): the box around every point of `polygons` (shares of the image), or None without points."
    points = [pt for poly in polygons if isinstance(poly, (list, tuple, np.ndarray)) for pt in poly]
    if not points: return None
    xs, ys = np.clip([pt[0] for pt in points], 0, 1), np.clip([pt[1] for pt in points], 0, 1)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def _square_crop(cx: float, cy: float, side: float, aspect: float) -> tuple:
    "A crop `side` (a share of the image's shorter side) square in pixels, centred on (cx, cy), moved inside the image."
    # aspect = width / height of the image: a square of `side` * shorter side is (sw, sh) in shares of (width, height)
    sw, sh = (side / aspect, side) if aspect >= 1 else (side, side * aspect)
    sw, sh = min(sw, 1.0), min(sh, 1.0)
    x0, y0 = min(max(cx - sw / 2, 0.0), 1.0 - sw), min(max(cy - sh / 2, 0.0), 1.0 - sh)
    return x0, y0, x0 + sw, y0 + sh


def _bright_point(path, rng, side: int = 64) -> tuple:
    "A random point (shares of width and height) among the brightest quarter of the radiograph: bone, not background."
    from .preprocess import read_radiograph, reduce_radiograph
    pixels, _ = read_radiograph(path, reduce_to=side)
    small = reduce_radiograph(pixels, side).astype(np.float32)
    small = small.mean(axis=2) if small.ndim == 3 else small
    ys, xs = np.nonzero(small >= np.quantile(small, 0.75))
    k = int(rng.integers(len(ys)))
    return (xs[k] + 0.5) / small.shape[1], (ys[k] + 0.5) / small.shape[0]


def crop_views(
    train: pd.DataFrame,  # training rows of a table: file, label, group, polygons (shares of the image)
    seed: int = 42,
    context: float = 3.0,  # the crop's side as a multiple of the annotation box's longer side
    min_side: float = 0.25,  # and at least this share of the image's shorter side
) -> pd.DataFrame:
    """Extra training views that show the fracture close up: for each annotated image, a square crop around its
    annotation (fracture boxes or polygons) with the image's label; and, where some training images carry no
    annotation (FracAtlas's normal ones), as many crops of the same sizes at random bright (bone) places of those,
    with their labels, so that a close-up alone does not tell the class. Each view is one more row (its file a `RadiographView`), in a
    group of its own per source radiograph; the validation and test images are never cropped."""
    from .preprocess import image_size
    from .transforms import RadiographView
    rng = np.random.default_rng(seed)
    records = train.to_dict("records")
    boxes = [_polygon_box(r["polygons"]) if isinstance(r["polygons"], (list, tuple, np.ndarray)) else None for r in records]
    plain = [r for r, box in zip(records, boxes) if box is None]
    rows, sides = [], []
    for r, box in zip(records, boxes):
        if box is None: continue
        x0, y0, x1, y1 = box
        w, h = image_size(r["file"])
        side = min(max(context * max((x1 - x0) * w, (y1 - y0) * h) / min(w, h), min_side), 1.0)  # shares of the shorter side
        sides.append(side)
        rows.append({**r, "file": RadiographView(r["file"], _square_crop((x0 + x1) / 2, (y0 + y1) / 2, side, w / h)),
                     "group": f"{r['group']}#crop", "polygons": []})
    for i, side in enumerate(sides if plain else []):  # as many close-ups of unannotated images, of the same sizes
        r = plain[int(rng.integers(len(plain)))]
        w, h = image_size(r["file"])
        cx, cy = _bright_point(r["file"], rng)
        rows.append({**r, "file": RadiographView(r["file"], _square_crop(cx, cy, side, w / h)),
                     "group": f"{r['group']}#crop{i}", "polygons": []})
    return pd.DataFrame(rows, columns=train.columns)


def save_batch(dls, path, max_n: int = 9, split: int = 0) -> Path:
    "Save `show_batch` of the train (0) or valid (1) DataLoader as a PNG; works without a display."
    from .evaluate import plt  # pyplot on the file backend, or a notebook's own
    dls[split].show_batch(max_n=max_n, figsize=(9, 9))
    from .files import save_figure
    path = save_figure(plt.gcf(), path)
    plt.close("all")
    return path
