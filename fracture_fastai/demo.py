"""The built-in demo datasets: synthetic radiograph-like images of six body regions, written as a YOLO export, and
a tiny fracture-or-not set in FracAtlas's layout (`make_fracatlas_demo`).

It lets every command run anywhere, offline, in minutes. It is synthetic: results on it say
nothing about real radiographs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from .sources import REGIONS
from .sources.fracatlas import CSV_COLUMNS

__all__ = ["demo_dir", "make_demo", "make_fracatlas_demo"]

_DEMO_VERSION = 1


def demo_dir() -> Path:
    "Where the demo dataset is cached: $FRACTURE_FASTAI_HOME/demo-v1, else ~/.cache/fracture_fastai/demo-v1."
    home = Path(os.environ.get("FRACTURE_FASTAI_HOME", Path.home() / ".cache" / "fracture_fastai"))
    return home / f"demo-v{_DEMO_VERSION}"


def _bone(canvas, p0, p1, width, intensity):
    "A long bone: a thick bright line with brighter cortical edges."
    cv2.line(canvas, p0, p1, intensity * 0.8, width, cv2.LINE_AA)
    cv2.line(canvas, p0, p1, intensity, max(1, width // 4), cv2.LINE_AA)
    cv2.circle(canvas, p0, int(width * 0.7), intensity * 0.9, -1, cv2.LINE_AA)
    cv2.circle(canvas, p1, int(width * 0.7), intensity * 0.9, -1, cv2.LINE_AA)


def _region_bones(region: str, rng, s: int) -> list:
    "Bones (p0, p1, width) in a `s`-pixel frame that make each region recognisable by shape."
    c = s / 2
    j = lambda: rng.uniform(-0.04, 0.04) * s  # noqa: E731 - small jitter
    if region == "forearm":  # two long parallel bones
        return [((c - 0.1 * s + j(), 0.05 * s), (c - 0.1 * s + j(), 0.95 * s), 0.07 * s),
                ((c + 0.1 * s + j(), 0.05 * s), (c + 0.1 * s + j(), 0.95 * s), 0.06 * s)]
    if region == "humerus":  # one thick long bone
        return [((c + j(), 0.05 * s), (c + j(), 0.95 * s), 0.13 * s)]
    if region == "fingers":  # four thin short bones side by side
        return [((c + dx * s + j(), 0.15 * s), (c + dx * s + j(), 0.8 * s), 0.045 * s) for dx in (-0.27, -0.09, 0.09, 0.27)]
    if region == "elbow":  # two bones meeting at an angle
        return [((c + j(), 0.05 * s), (c, c), 0.1 * s), ((c, c), (0.9 * s + j(), 0.85 * s), 0.08 * s)]
    if region == "shoulder":  # a round head on a short shaft
        return [((c + j(), c), (c + j(), 0.97 * s), 0.11 * s), ((c, 0.35 * s), (c, 0.35 * s), 0.3 * s)]
    if region == "wrist":  # two bones ending in a cluster of carpals
        bones = [((c - 0.1 * s, 0.55 * s), (c - 0.1 * s, 0.98 * s), 0.07 * s), ((c + 0.1 * s, 0.55 * s), (c + 0.1 * s, 0.98 * s), 0.06 * s)]
        return bones + [((c + dx * s, 0.4 * s + dy * s), (c + dx * s, 0.4 * s + dy * s), 0.08 * s)
                        for dx, dy in ((-0.15, 0), (0, -0.05), (0.15, 0), (-0.07, 0.1), (0.08, 0.1))]
    raise ValueError(f"unknown demo region {region!r}; allowed: {', '.join(REGIONS)}")


def _radiograph(region: str, rng, size: int):
    "One synthetic radiograph and its fracture polygon (normalised xy pairs)."
    s = size
    img = np.zeros((s, s), np.float32)
    cv2.ellipse(img, (s // 2, s // 2), (int(s * 0.42), int(s * 0.6)), 0, 0, 360, 60, -1, cv2.LINE_AA)  # soft tissue
    bones = _region_bones(region, rng, s)
    for (x0, y0), (x1, y1), w in bones:
        _bone(img, (int(x0), int(y0)), (int(x1), int(y1)), max(2, int(w)), float(rng.uniform(170, 230)))
    # A fracture: a dark gap across the first bone, somewhere along its shaft.
    (x0, y0), (x1, y1), w = bones[0]
    t = rng.uniform(0.3, 0.7)
    fx, fy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    half = max(w, 0.05 * s) * 0.9
    angle = rng.uniform(-0.5, 0.5)
    dx, dy = half * np.cos(angle), half * np.sin(angle)
    cv2.line(img, (int(fx - dx), int(fy - dy)), (int(fx + dx), int(fy + dy)), 40, max(1, s // 64), cv2.LINE_AA)
    pad = 0.03 * s
    box = [(fx - abs(dx) - pad, fy - abs(dy) - pad), (fx + abs(dx) + pad, fy - abs(dy) - pad),
           (fx + abs(dx) + pad, fy + abs(dy) + pad), (fx - abs(dx) - pad, fy + abs(dy) + pad)]
    # Pose: random rotation, scale and shift, applied to image and polygon alike.
    m = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(-25, 25), rng.uniform(0.85, 1.1))
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * s
    img = cv2.warpAffine(img, m, (s, s), borderValue=0)
    poly = cv2.transform(np.array([box], np.float32), m)[0] / s
    img = cv2.GaussianBlur(img, (0, 0), s / 160) + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), np.clip(poly, 0, 1)


def make_demo(dest=None, n_train: int = 40, n_valid: int = 10, n_test: int = 10, size: int = 160, seed: int = 0) -> Path:
    "Write (once) the demo YOLO export of six regions to `dest` (default `demo_dir()`) and return its folder."
    dest = Path(dest) if dest is not None else demo_dir()
    if (dest / "data.yaml").exists():
        return dest
    rng = np.random.default_rng(seed)
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")  # two processes making it at once never share one
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        (tmp / split / "images").mkdir(parents=True, exist_ok=True)
        (tmp / split / "labels").mkdir(parents=True, exist_ok=True)
        for cls, region in enumerate(REGIONS):
            for i in range(n):
                img, poly = _radiograph(region, rng, size)
                stem = f"{region}_{split}_{i:03d}"
                cv2.imwrite(str(tmp / split / "images" / f"{stem}.png"), img)
                coords = " ".join(f"{v:.5f}" for v in poly.reshape(-1))
                (tmp / split / "labels" / f"{stem}.txt").write_text(f"{cls} {coords}\n")
    names = ", ".join(f"'{r} fracture'" for r in REGIONS)
    (tmp / "data.yaml").write_text(
        "# fracture_fastai demo: SYNTHETIC radiograph-like images, not real data\n"
        f"train: train/images\nval: valid/images\ntest: test/images\nnc: {len(REGIONS)}\nnames: [{names}]\n")
    try: tmp.rename(dest)  # appears whole or not at all, so an interrupted run never leaves half a dataset
    except OSError:
        if not (dest / "data.yaml").exists(): raise
        shutil.rmtree(tmp)  # another process finished first: the same images (same seed), keep theirs
    return dest


def make_fracatlas_demo(
    dest,  # the folder to write (must not hold a dataset.csv yet)
    n_fractured: int = 6,  # fractured images, half hand and half leg
    n_normal: int = 18,  # normal images, half hand and half leg
    size=(40, 32),  # (w, h) of each image
    seed: int = 0,
) -> Path:
    """A tiny SYNTHETIC fracture-or-not set in FracAtlas's layout: dataset.csv (its real columns), images/{Fractured,
    Non_fractured}/*.jpg, Annotations/YOLO/*.txt; a fractured image has a bright patch where its box says."""
    dest = Path(dest)
    if (dest / "dataset.csv").exists():
        raise FileExistsError(f"{dest} already holds a dataset.csv")
    rng = np.random.default_rng(seed)
    rows = []
    for folder, n in (("Fractured", n_fractured), ("Non_fractured", n_normal)):
        (dest / "images" / folder).mkdir(parents=True, exist_ok=True)
        (dest / "Annotations" / "YOLO").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image_id, part = f"IMG{len(rows):07d}.jpg", ("hand", "leg")[i % 2]
            pixels = rng.integers(40, 90, size[::-1]).astype(np.uint8)
            box = ""
            if folder == "Fractured":
                cx, cy, bw, bh = 0.25 + 0.5 * rng.random(), 0.25 + 0.5 * rng.random(), 0.3, 0.3
                x0, y0 = int((cx - bw / 2) * size[0]), int((cy - bh / 2) * size[1])
                pixels[y0:y0 + int(bh * size[1]), x0:x0 + int(bw * size[0])] = 230
                box = f"0 {cx:.4f} {cy:.4f} {bw:.4f} {bh:.4f}\n"
            cv2.imwrite(str(dest / "images" / folder / image_id), pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
            (dest / "Annotations" / "YOLO" / image_id.replace(".jpg", ".txt")).write_text(box)
            tags = {"image_id": image_id, "hand": int(part == "hand"), "leg": int(part == "leg"),
                    "hardware": int(i % 3 == 0), "fractured": int(folder == "Fractured"),
                    "fracture_count": int(folder == "Fractured"), "frontal": 1}
            rows.append([tags.get(c, 0) for c in CSV_COLUMNS])
    (dest / "dataset.csv").write_text("\n".join([",".join(CSV_COLUMNS)] + [",".join(map(str, r)) for r in rows]) + "\n")
    (dest / "README.txt").write_text("fracture_fastai demo: SYNTHETIC images in FracAtlas's layout, not real data\n")
    return dest
