"""Grad-CAM: where in a radiograph a class comes from, drawn over the image and scored against the annotated
fracture polygons (pointing game, share of heat-map mass inside the polygon).

`python -m fracture_fastai.cam EXPORT.pkl PATH... --out DIR` draws one overlay per image from an exported Learner.
"""
from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fastai.callback.core import Callback
from fastcore.meta import delegates

from .errors import ArgumentParser, UserError, check_writable, cli_errors
from .files import save_figure
from .evaluate import accuracy_ci, plt  # pyplot on the file backend, or a notebook's own

__all__ = ["DEFAULT_TOLERANCE", "RESIZE_METHODS", "gradcam", "explain_file", "decode_images", "overlay", "gradcam_grid",
           "polygon_to_input", "polygon_mask", "localisation_scores", "score_localisation",
           "score_localisation_groups", "score_positives", "cam_pointing_loss", "CamSupervision", "main"]

# The pointing game's slack, as a share of the input side (9 px at 224 px). A Grad-CAM map comes from a feature map
# 32x coarser than the input (7x7 at 224 px), so its peak is only placed to within about half a cell (~16 px); 4 %
# forgives the upsampling's sub-cell jitter and a tight annotation without crediting a peak on the next bone.
DEFAULT_TOLERANCE = 0.04
RESIZE_METHODS = ("pad", "crop", "squish")  # fastai's ResizeMethod values
_Z95 = 1.959963984540054  # two-sided 95 % normal quantile
_MASS_CI_METHOD = "normal approximation: mean +/- 1.96*sd/sqrt(n), clipped to [0, 1]"


# ---------------------------------------------------------------- Grad-CAM

@contextmanager
def _eval_mode(model):
    "Eval mode (BatchNorm running stats, no dropout) inside; every module's own mode restored after."
    # Restored module by module, not with model.train(): a frozen learner may keep some BatchNorms in another mode.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes: m.training = mode


def _track_grad(module, input, output):
    "Forward-hook function: the body's feature map, made to require grad so Grad-CAM can differentiate through it."
    # A frozen body (pretrained learners) gives a feature map with no autograd history: it is then a leaf, and
    # marking it lets the head's gradient reach it without touching any parameter's requires_grad.
    if isinstance(output, torch.Tensor) and not output.requires_grad: output.requires_grad_(True)
    return output


def _vocab(learn) -> list:
    "The class names of `learn`, or [] when its DataLoaders have none."
    vocab = getattr(learn.dls, "vocab", None)
    return [str(c) for c in vocab] if vocab is not None else []


def _class_name(vocab: list, i: int) -> str: return vocab[i] if i < len(vocab) else str(i)


def _class_index(learn, target, n_classes: int) -> int:
    "Index of `target` (a class name, or an index below `n_classes`); a `UserError` naming the classes otherwise."
    vocab = _vocab(learn)
    if isinstance(target, str):
        if target in vocab: return vocab.index(target)
        if target.strip().isdigit(): target = int(target)
        else: raise UserError(f"unknown class {target!r}; the model knows: {', '.join(vocab) or f'0..{n_classes - 1}'}")
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and 0 <= target < n_classes:
        return int(target)
    raise UserError(f"target class must be a class name or an index in 0..{n_classes - 1}; got {target!r}")


def _targets(learn, target, logits: torch.Tensor) -> torch.Tensor:
    "Class index per image: the predicted class when `target` is None, else `target` (one class, or one per image)."
    bs, n_classes = logits.shape
    if target is None: return logits.argmax(1)
    if isinstance(target, (torch.Tensor, np.ndarray)): target = target.tolist()
    if not isinstance(target, (list, tuple)): target = [target] * bs
    if len(target) != bs:
        raise UserError(f"target has {len(target)} classes for a batch of {bs} images; give one class or one per image")
    return torch.tensor([_class_index(learn, t, n_classes) for t in target], device=logits.device)


def _level_input(store: list):
    "Forward-pre-hook function: keep a stage's input (a finer feature map), made to require grad as `_track_grad` does."
    def hook(module, args):
        if store or not args or not isinstance(args[0], torch.Tensor): return None  # the first call's input only
        x = args[0] if args[0].requires_grad else args[0].detach().requires_grad_(True)
        store.append(x)
        return (x, *args[1:])
    return hook


def _gradcam_pass(learn, x: torch.Tensor, target, entries: list) -> tuple:
    "`(cams, logits, targets)` of one pass: each level's Grad-CAM at the input size, scaled to its peak, averaged."
    from fastai.callback.hook import Hook
    model = learn.model
    stores = [[] for _ in entries]
    handles = [m.register_forward_pre_hook(_level_input(store)) for m, store in zip(entries, stores)]
    try:
        with torch.enable_grad(), Hook(model[0], _track_grad, detach=False) as hook:
            logits = model(x).as_subclass(torch.Tensor)
            maps = [hook.stored] + [store[0] if store else None for store in stores]
            if not all(isinstance(a, torch.Tensor) and a.ndim == 4 for a in maps):
                raise UserError("Grad-CAM needs learn.model[0] to output a feature map (batch, channels, h, w); got "
                                f"{tuple(maps[0].shape) if isinstance(maps[0], torch.Tensor) else type(maps[0]).__name__}")
            targets = _targets(learn, target, logits)
            # Images in a batch don't interact in eval mode, so one backward pass of the summed scores gives each image
            # its own gradient; autograd.grad, unlike backward(), leaves the parameters' .grad untouched.
            grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), maps)
    finally:
        for h in handles: h.remove()
    cams = 0
    for acts, grad in zip(maps, grads):
        weights = grad.mean((2, 3), keepdim=True)  # global-average-pooled gradients: one weight per channel
        cam = F.relu((weights * acts).sum(1, keepdim=True)).detach().float()
        cams = cams + _peak_scaled(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return cams / len(maps), logits.detach().float(), targets


def _peak_scaled(cams: torch.Tensor) -> torch.Tensor:
    "Each map divided by its peak, not min-max: 0 keeps meaning 'no evidence' (a map without any stays all zeros)."
    # So the mass inside a polygon is comparable across images.
    peak = cams.flatten(1).amax(1)[:, None, None]
    return cams / torch.where(peak > 0, peak, torch.ones_like(peak))


def _gradcam(learn, x: torch.Tensor, target=None, levels: int = 1, flip: bool = False) -> tuple:
    """`(cams, probs, targets)`: heat maps (bs, H, W) in [0, 1], softmax probabilities and the classes explained.
    `levels` > 1 averages the Grad-CAMs of finer feature maps in; `flip` averages each image's with its mirror's
    (mirrored back), and its probabilities, as `tta='flip'` does."""
    from .models import feature_map_entries
    model = learn.model
    device = next(model.parameters(), torch.empty(0)).device
    x = x.as_subclass(torch.Tensor).to(device)  # a plain tensor: fastai's TensorImage dispatch has no part here
    with _eval_mode(model):
        entries = feature_map_entries(model[0], levels)
        cams, logits, targets = _gradcam_pass(learn, x, target, entries)
        probs = logits.softmax(1)
        if flip:  # the mirror explains the same class, whatever it predicts itself
            mirror, mirror_logits, _ = _gradcam_pass(learn, x.flip(-1), targets, entries)
            cams, probs = (cams + mirror.flip(-1)) / 2, (probs + mirror_logits.softmax(1)) / 2
            if target is None and (probs.argmax(1) != targets).any():  # a near tie that the mirror tipped: explain
                return _gradcam(learn, x, probs.argmax(1), levels, flip)  # the class the averaged probabilities give
    return _peak_scaled(cams).clamp(0, 1).cpu(), probs.cpu(), targets.cpu()


def gradcam(
    learn,  # a Learner whose `model[0]` is the body (a conv feature map) and `model[1]` the head
    x: torch.Tensor,  # a batch of images, normalised as the Learner's DataLoaders give them
    target=None,  # None: each image's predicted class; else a class (name or index) or one per image
    levels: int = 1,  # 1: the body's output; 2: and the last feature map at twice its resolution, ... (maps averaged)
    flip: bool = False,  # average each image's map with its mirror's (mirrored back), as `tta='flip'` does the probabilities
) -> torch.Tensor:  # (bs, H, W) at the input resolution, each map scaled to a peak of 1 (all 0 without evidence)
    "Grad-CAM of `x` for `target`: ReLU of the body's feature maps weighted by the mean gradient of the class score."
    # Works on frozen bodies and leaves the model as found: training mode restored, requires_grad never changed.
    return _gradcam(learn, x, target, levels, flip)[0]


def explain_file(
    learn,  # a Learner from `model_io.load_any`
    file,  # one radiograph: JPEG, PNG, DICOM, ...
    target=None,  # None: the predicted class; else a class name or index
    tta: str = "none",  # 'flip': the probabilities are the mean of the image's and its mirror's
    levels: int = 1,  # the heat map's feature-map levels (`gradcam`); the model's own: `model_io.read_heat_map`
    flip: bool | None = None,  # the map averaged with its mirror's; None: as `tta` (the model's own: `read_heat_map`)
) -> tuple:
    "`(probs, cam, image)` of one radiograph file: class probabilities (numpy), its Grad-CAM map and the model's input image."
    if tta not in ("none", "flip"): raise UserError(f"explain_file's tta must be 'none' or 'flip'; got {tta!r}")
    flip = tta == "flip" if flip is None else flip
    dl = _set_split(learn.dls.test_dl([str(file)], bs=1))
    x = _after_batch(dl, dl.do_batch([dl.do_item(0)]))[0]
    target = None if target is None else _class_index(learn, target, learn.dls.c)
    cams, probs, _ = _gradcam(learn, x, target, levels, flip)
    if flip != (tta == "flip"):  # a model whose run scored its maps otherwise (older ones): the probabilities its own
        from .evaluate import predict_probs
        probs = predict_probs(learn, dl, tta)[0]
    return probs[0].numpy(), cams[0].numpy(), decode_images(dl, x)[0]


# ---------------------------------------------------------------- drawing

def _set_split(dl):
    "Set `dl`'s transform pipelines to its dataset's split, as fastai's `TfmdDL.before_iter` does when iterating."
    # Until `dl` is first iterated its pipelines have no split: Resize would place the pad at random and the
    # augmentations would run, on validation and test items alike.
    split_idx = getattr(dl.dataset, "split_idx", None)
    for name in ("after_item", "before_batch", "after_batch"):
        pipeline = getattr(dl, name, None)
        if hasattr(pipeline, "split_idx"): pipeline.split_idx = split_idx
    return dl


def _batch(dl, idxs):
    "The batch of `dl`'s items `idxs`, through the item and batch transforms exactly as iterating `dl` would give it."
    _set_split(dl)
    return _after_batch(dl, dl.do_batch([dl.do_item(i) for i in idxs]))


def _after_batch(dl, b):
    "A collated batch `b` moved to `dl`'s device and through its batch transforms, as `DataLoader.__iter__` does."
    from fastai.torch_core import to_device
    if getattr(dl, "device", None) is not None: b = to_device(b, dl.device)
    return dl.after_batch(b)


def decode_images(
    dl,  # the DataLoader `x` came from (its batch transforms hold the Normalize to undo)
    x: torch.Tensor,  # a normalised batch
) -> list:
    "The radiographs of `x` as displayable HxWxC float arrays in [0, 1], normalisation undone by `dl.decode`."
    decoded = dl.decode((x,))[0]
    return [_display_image(img) for img in decoded]


def _display_image(image) -> np.ndarray:
    "HxW or HxWx3 float array in [0, 1] from a CHW tensor (fastai's layout) or an HxW[xC] array, in [0, 1] or 0..255."
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.permute(1, 2, 0) if image.ndim == 3 else image).numpy()
    a = np.asarray(image)
    integer = np.issubdtype(a.dtype, np.integer)  # fastai decodes to 0..255 integers (IntToFloatTensor)
    a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[2] == 1: a = a[..., 0]
    if integer or a.max(initial=0) > 1: a = a / 255.0
    return np.clip(a, 0, 1)


def _show(ax, image, cam=None, alpha: float = 0.5):
    "The radiograph on `ax`, with the heat map blended over it when `cam` is given."
    img = _display_image(image)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    if cam is not None:
        cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
        # The extent pins the map onto the image's pixels even if their resolutions differ.
        ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1,
                  extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    ax.axis("off")


def overlay(
    image,  # the radiograph: a decoded CHW tensor (see `decode_images`) or an HxW[xC] array, in [0, 1] or 0..255
    cam,  # its Grad-CAM map, HxW in [0, 1]
    path,  # the PNG to write
    title: str = "",  # e.g. "elbow (0.93)": the predicted class and its probability
    alpha: float = 0.5,  # opacity of the heat map
) -> Path:
    "Save the radiograph and the radiograph under its jet heat map side by side, titled `title`."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axs = plt.subplots(1, 2, figsize=(6, 3.3))
    _show(axs[0], image)
    _show(axs[1], image, cam, alpha)
    if title: fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)
    return path


def _right_and_wrong(probs: torch.Tensor, targs, n: int) -> list:
    "Indices of up to `n` images: about half wrongly and half rightly classified, the most confident of each first."
    conf, pred = probs.max(1)
    by_conf = conf.argsort(descending=True)
    if targs is None: return by_conf[:n].tolist()
    right = [i for i in by_conf.tolist() if pred[i] == targs[i]]
    wrong = [i for i in by_conf.tolist() if pred[i] != targs[i]]
    n_wrong = min(len(wrong), n // 2)
    n_right = min(len(right), n - n_wrong)
    n_wrong = min(len(wrong), n - n_right)  # too few right ones: fill up with wrong ones
    return right[:n_right] + wrong[:n_wrong]


def _binary_picks(p_positive: torch.Tensor, is_positive: torch.Tensor, threshold: float, n: int) -> list:
    """Indices of up to `n` images of a binary test: about half true positives (the most confident first), the rest
    false positives (most confident) and false negatives (most confidently missed) in turn, each filling in for the
    others where they run short."""
    called = p_positive >= threshold
    order = p_positive.argsort(descending=True).tolist()
    groups = [[i for i in order if is_positive[i] and called[i]],  # true positives
              [i for i in order if not is_positive[i] and called[i]],  # false positives
              [i for i in reversed(order) if is_positive[i] and not called[i]]]  # false negatives
    quota = [n - n // 2, (n // 2 + 1) // 2, n // 4]
    picks = [g[:q] for g, q in zip(groups, quota)]
    for g, taken in zip(groups, picks):  # fill up from whatever is left, in the same order of importance
        taken += g[len(taken):len(taken) + n - sum(map(len, picks))]
    return [i for taken in picks for i in taken]


def _input_polygons(dl, idxs) -> list:
    "Per index of `dl.items`: its fracture polygons in model-input pixels ([] for none, or where `dl` carries none)."
    from .preprocess import image_size
    items = getattr(dl, "items", None)
    if not hasattr(items, "columns") or "polygons" not in items.columns: return [[] for _ in idxs]
    try:
        resize = _find_resize(dl)
    except UserError:  # not one Resize to map them through: draw none rather than draw them wrong
        return [[] for _ in idxs]
    size = (resize.size[1], resize.size[0])
    out = []
    for i in idxs:
        row = items.iloc[i]
        polys = row.polygons if _has_polygons(row.polygons) else []
        out.append(polygon_to_input(polys, image_size(row.file), size, str(resize.method)) if len(polys) else [])
    return out


def gradcam_grid(
    learn,  # a trained Learner
    path,  # the PNG to write (a run's gradcam.png)
    dl=None,  # a validation-style DataLoader; default `learn.dls.valid`
    n: int = 8,  # images to show
    alpha: float = 0.5,  # opacity of the heat map
    levels: int = 1,  # the heat map's feature-map levels (`gradcam`)
    flip: bool = False,  # maps and probabilities averaged with the mirror's, as the run's `tta='flip'` scores them
    probs=None,  # `dl`'s class probabilities in its order, already evaluated (a run's): no pass to pick the images
    targets=None,  # their labels, with `probs` (None: unlabelled)
    positive=None,  # two classes: the finding; its map is drawn on true positives, false positives and misses
    threshold: float = 0.5,  # with `positive`: the decision threshold on its probability
) -> Path:
    """Grid of Grad-CAM overlays of `n` images: the predicted class's map, half right and half wrong where the data
    allow; or, for a binary test (`positive`), the finding's map on true positives, false positives and false
    negatives, each called at `threshold`, as its localisation is scored. Annotated fractures are outlined on the maps."""
    dl = (learn.dls.valid if dl is None else dl).new(shuffle=False, drop_last=False)
    if not len(dl.dataset): raise UserError("no images to draw Grad-CAM for: the DataLoader is empty")
    if probs is None:
        with learn.no_bar():
            probs, targets = learn.get_preds(dl=dl, act=lambda o: F.softmax(o, dim=-1))[:2]
    elif len(probs) != len(dl.dataset):
        raise ValueError(f"{len(probs)} probabilities for {len(dl.dataset)} images")
    vocab = _vocab(learn)
    if positive is not None and probs.shape[1] != 2:
        raise UserError(f"a binary test's Grad-CAM grid (positive={positive!r}) needs two classes; got {probs.shape[1]}")
    pos = None if positive is None else _class_index(learn, positive, probs.shape[1])
    if pos is not None and targets is not None:
        picks = _binary_picks(probs[:, pos].float(), targets == pos, threshold, n)
    else:
        picks = _right_and_wrong(probs.float(), targets, n)
    if not picks: raise UserError("no images to draw Grad-CAM for: no true or false positives and no misses")
    x = _batch(dl, picks)[0]
    cams, shown, _ = _gradcam(learn, x, target=pos, levels=levels, flip=flip)  # the titles give these maps' probabilities
    images = decode_images(dl, x)
    boxes = _input_polygons(dl, picks)
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axs = plt.subplots(rows, 2 * cols, figsize=(4 * cols, 2.3 * rows), squeeze=False)
    for ax in axs.flat: ax.axis("off")
    for j, (i, img, cam, p) in enumerate(zip(picks, images, cams, shown)):
        ax_img, ax_cam = axs[j // cols, 2 * (j % cols)], axs[j // cols, 2 * (j % cols) + 1]
        _show(ax_img, img)
        _show(ax_cam, img, cam, alpha)
        for poly in boxes[j]:  # the annotated fracture, where the map should point (pixel edges -> imshow's centres)
            closed = np.vstack([poly, poly[:1]]) - 0.5
            ax_cam.plot(closed[:, 0], closed[:, 1], color="white", linewidth=1)
        if pos is None:
            pred = int(p.argmax())
            title = f"{_class_name(vocab, pred)} ({p[pred]:.2f})"
        else:  # the call at the threshold, and the finding's probability
            pred = pos if p[pos] >= threshold else 1 - pos
            title = f"{_class_name(vocab, pred)} ({p[pos]:.2f})"
        right = targets is None or int(targets[i]) == pred
        if targets is not None: title = f"{_class_name(vocab, int(targets[i]))} / {title}"
        # Left-aligned over the pair: the title names the image, not one of its two panels.
        ax_img.set_title(title, loc="left", fontsize=9, color="black" if targets is None else "green" if right else "red")
    if pos is not None:
        title = (f"Grad-CAM of {_class_name(vocab, pos)}: actual / called at {threshold:.2f} "
                 f"(probability of {_class_name(vocab, pos)})")
    else:
        title = ("Grad-CAM of the predicted class: actual / predicted (probability)" if targets is not None
                 else "Grad-CAM of the predicted class: predicted (probability)")
    fig.suptitle(title + ("; white: the annotated fractures" if any(map(len, boxes)) else ""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- localisation against fracture polygons

def _out_wh(size) -> tuple:
    "(w, h) of a Resize `size`: an int side, or (h, w) as fastai's Resize takes it."
    if isinstance(size, (int, np.integer)): return int(size), int(size)
    h, w = size
    return int(w), int(h)


def _resize_window(orig_size, size, method: str = "pad") -> tuple:
    "`(tl, crop)`: the window (top-left, (w, h)) of the original that fastai's validation Resize scales to `size`."
    if method not in RESIZE_METHODS:
        raise UserError(f"resize method must be one of {', '.join(RESIZE_METHODS)}; got {method!r}")
    w, h = orig_size
    out_w, out_h = _out_wh(size)
    if method == "squish": return (0, 0), (w, h)
    # fastai's Resize.encodes line by line (pcts 0.5 at validation): the scale picks the larger ratio to pad, the
    # smaller to crop; int() truncates toward zero, so a pad of -51.5 px becomes -51, not -52.
    rw, rh = w / out_w, h / out_h
    m = rw if (rw > rh if method == "pad" else rw < rh) else rh
    crop = (int(m * out_w), int(m * out_h))
    return (int(0.5 * (w - crop[0])), int(0.5 * (h - crop[1]))), crop


def polygon_to_input(
    polygons,  # polygons as lists of [x, y] pairs, normalised to the original image's width and height (YOLO)
    orig_size: tuple,  # (w, h) of the original image in pixels, as PIL's `Image.size`
    size,  # the Resize size: an int side, or (h, w)
    method: str = "pad",  # the Resize method: 'pad' (this package's), 'crop' or 'squish'
) -> list:
    "The polygons in model-input pixels (x right, y down, 0..W on pixel edges), moved as the validation Resize moves pixels."
    (tl_x, tl_y), (crop_w, crop_h) = _resize_window(orig_size, size, method)
    w, h = orig_size
    out_w, out_h = _out_wh(size)
    # Crop/pad moves original pixel x to x - tl in a crop_w-wide canvas, which PIL then scales edge to edge.
    scale = np.array([out_w / crop_w, out_h / crop_h])
    return [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * [w, h] - [tl_x, tl_y]) * scale for p in polygons]


def polygon_mask(
    polygons_px,  # polygons in input pixels, as `polygon_to_input` gives them
    size,  # the mask's size: an int side, or (h, w)
) -> np.ndarray:
    "Boolean (h, w) mask of the pixels the polygons cover, edges included, so a thin polygon still marks its pixels."
    out_w, out_h = _out_wh(size)
    mask = np.zeros((out_h, out_w), np.uint8)
    shift = 8  # sub-pixel vertices: rounding them to whole pixels would shift small polygons by up to half a pixel
    # cv2 puts pixel centres on integer coordinates; ours are on pixel edges, hence the half-pixel offset.
    pts = [np.round((np.asarray(p, np.float64).reshape(-1, 2) - 0.5) * (1 << shift)).astype(np.int32)
           for p in polygons_px if len(p)]
    if pts: cv2.fillPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=shift)
    return mask.astype(bool)


def _image_scores(cam: np.ndarray, mask: np.ndarray, tolerance_px: float) -> tuple:
    "`(hit, mass)`: does the map's peak lie within `tolerance_px` of the mask, and its share of mass inside the mask."
    if cam.shape != mask.shape: raise ValueError(f"cam shape {cam.shape} differs from mask shape {mask.shape}")
    peak = cam.max(initial=0)
    # Distance from every pixel centre to the nearest mask pixel centre: a dilation by any radius, in one pass.
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    hit = bool(peak > 0 and dist[np.unravel_index(np.argmax(cam), cam.shape)] <= tolerance_px)  # no evidence: a miss
    total = float(cam.sum())
    return hit, float(cam[mask].sum()) / total if total > 0 else 0.0


def _aggregate(hits: list, masses: list, n_skipped: int, tolerance: float, tolerance_px) -> dict:
    "The localisation summary of per-image hits and masses, with 95 % intervals."
    n = len(hits)
    res = {"n": n, "n_skipped": int(n_skipped), "pointing_game": None, "pointing_game_ci95": None,
           "mass_inside": None, "mass_inside_ci95": None, "tolerance": float(tolerance),
           "tolerance_px": None if tolerance_px is None else float(tolerance_px),
           "pointing_game_ci95_method": "wilson", "mass_inside_ci95_method": _MASS_CI_METHOD}
    if not n: return res
    mean = float(np.mean(masses))
    if n > 1:
        half = _Z95 * float(np.std(masses, ddof=1)) / math.sqrt(n)
        mass_ci = [max(0.0, mean - half), min(1.0, mean + half)]
    else:
        mass_ci = [0.0, 1.0]  # one image says nothing about the spread
    res.update(pointing_game=sum(hits) / n, pointing_game_ci95=list(accuracy_ci(sum(hits), n)),
               mass_inside=mean, mass_inside_ci95=mass_ci)
    return res


def _check_tolerance(tolerance):
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise UserError(f"tolerance must be a share of the input side in [0, 1) (e.g. {DEFAULT_TOLERANCE}); "
                        f"got {tolerance!r}")
    return float(tolerance)


def localisation_scores(
    cams,  # Grad-CAM maps, each (h, w) (a (n, h, w) tensor or array, or a list)
    masks,  # the fracture mask of each map (`polygon_mask`), or None / an empty mask where there is none
    tolerance: float = DEFAULT_TOLERANCE,  # pointing-game slack as a share of the input's longer side
) -> dict:
    "Pointing game (peak within `tolerance` of the fracture) and heat-map mass inside it, with 95 % intervals."
    tolerance = _check_tolerance(tolerance)
    cams, masks = list(cams), list(masks)
    if len(cams) != len(masks): raise ValueError(f"{len(cams)} cams but {len(masks)} masks")
    hits, masses, skipped, tolerance_px = [], [], 0, None
    for cam, mask in zip(cams, masks):
        if mask is None or not np.any(mask):
            skipped += 1
            continue
        cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
        tolerance_px = tolerance * max(cam.shape)
        hit, mass = _image_scores(cam.astype(np.float32), np.asarray(mask, bool), tolerance_px)
        hits.append(hit)
        masses.append(mass)
    return _aggregate(hits, masses, skipped, tolerance, tolerance_px)


def _find_resize(dl):
    "The fastai `Resize` that sizes `dl`'s inputs: an item transform, or inside a `RadiographLoader`; one, or a `UserError`."
    from fastai.vision.augment import Resize
    from .transforms import find_loader
    found = [t for t in dl.after_item.fs if isinstance(t, Resize)]
    found += [find_loader(dl).resize] if find_loader(dl) is not None else []
    if len(found) != 1:
        raise UserError(f"cannot map fracture polygons onto the model input: the DataLoader has {len(found)} fastai "
                        "Resize transforms, not one")
    return found[0]


def _has_polygons(polygons) -> bool:
    return isinstance(polygons, (list, tuple, np.ndarray)) and any(len(p) for p in polygons)


def score_localisation(
    learn,  # a trained Learner (model[0] body, model[1] head), or several of one input (an ensemble: their maps averaged)
    dl=None,  # a validation or test DataLoader over a table with `file` and `polygons`; default `learn.dls.valid`
    bs: int = 16,  # images per Grad-CAM pass
    tolerance: float = DEFAULT_TOLERANCE,  # pointing-game slack as a share of the input's longer side
    target=None,  # the class whose map is scored (name or index); None: each image's predicted class
    rows=None,  # indices of `dl.items` to score (e.g. the true positives); None: every annotated image
    items=None,  # the table of `dl`'s images in its order, where `dl` holds only their files (a loaded model's test_dl)
    levels=1,  # the heat map's feature-map levels (`gradcam`): one for every learner, or a list with one per learner
    flip=False,  # each map averaged with its mirror's, as a run with `tta='flip'` scores its probabilities (or one per learner)
) -> dict:
    "`localisation_scores` of the `target` class's Grad-CAM against each image's fracture polygons (through the Resize)."
    return score_localisation_groups(learn, {"rows": rows}, dl, bs, tolerance, target, items, levels, flip)["rows"]


def score_localisation_groups(
    learn,  # a trained Learner, or several of one input (an ensemble: their maps averaged)
    groups: dict,  # name -> indices of `dl.items` to score (None: every annotated image), e.g. all and true positives
    dl=None,  # a validation or test DataLoader over a table with `file` and `polygons`; default `learn.dls.valid`
    bs: int = 16,  # images per Grad-CAM pass
    tolerance: float = DEFAULT_TOLERANCE,  # pointing-game slack as a share of the input's longer side
    target=None,  # the class whose map is scored (name or index); None: each image's predicted class
    items=None,  # the table of `dl`'s images in its order, where `dl` holds only their files
    levels=1,  # the heat map's feature-map levels: one for every learner, or a list with one per learner
    flip=False,  # each map averaged with its mirror's (or one per learner)
) -> dict:
    """`score_localisation` of each group of rows, `{name: scores}`: one Grad-CAM per image of their union, so a subset
    (the true positives among all positives) costs no second pass."""
    import pandas as pd
    from .preprocess import image_size
    tolerance = _check_tolerance(tolerance)
    learns = list(learn) if isinstance(learn, (list, tuple)) else [learn]
    per_learner = [list(v) if isinstance(v, (list, tuple)) else [v] * len(learns) for v in (levels, flip)]
    if any(len(v) != len(learns) for v in per_learner):
        raise ValueError(f"levels and flip: one value, or one per learner ({len(learns)}); got {levels!r}, {flip!r}")
    makes = list(zip(*per_learner))  # (levels, flip) of each learner's map
    dl = learns[0].dls.valid if dl is None else dl
    items = getattr(dl, "items", None) if items is None else items
    if not isinstance(items, pd.DataFrame) or not {"file", "polygons"} <= set(items.columns):
        raise UserError("localisation needs a DataLoader over a table with 'file' and 'polygons' columns "
                        "(fracture_fastai.data.radiograph_dataloaders builds one)")
    if len(items) != len(dl.dataset): raise ValueError(f"{len(items)} table rows for {len(dl.dataset)} images")
    if getattr(dl.dataset, "split_idx", None) == 0:
        raise UserError("localisation needs a validation or test DataLoader: the training one pads and augments at random")
    resize = _find_resize(dl)
    size = (resize.size[1], resize.size[0])  # Resize keeps (w, h); polygon_to_input takes (h, w) like Resize's argument
    groups = {name: range(len(items)) if rows is None else [int(i) for i in rows] for name, rows in groups.items()}
    # Iterated by index, not by `dl`, so each map meets its own row whatever the sampler; unannotated rows cost nothing.
    idxs = sorted({i for rows in groups.values() for i in rows if _has_polygons(items.polygons.iloc[i])})
    scored, tolerance_px = {}, None  # row -> (hit, mass); rows whose polygons all fell outside the input are absent
    for start in range(0, len(idxs), bs):
        chunk = idxs[start:start + bs]
        x = _batch(dl, chunk)[0]
        # An ensemble's map: the mean of its members' maps, each scaled to its own peak as one model's would be
        cams = np.mean([_gradcam(member, x, target, *make)[0].numpy() for member, make in zip(learns, makes)], axis=0)
        for i, cam in zip(chunk, cams):
            row = items.iloc[i]
            orig_size = image_size(row.file)  # the header alone, DICOM or not: no pixels decoded
            mask = polygon_mask(polygon_to_input(row.polygons, orig_size, size, str(resize.method)), size)
            if not mask.any(): continue  # every polygon fell outside the input (a bad annotation): nothing to point at
            tolerance_px = tolerance * max(cam.shape)
            scored[i] = _image_scores(cam, mask, tolerance_px)
    made = {"target": "predicted" if target is None else str(target), "levels": levels, "flip": flip}
    out = {}
    for name, rows in groups.items():
        mine = [scored[i] for i in rows if i in scored]
        out[name] = {**_aggregate([h for h, _ in mine], [m for _, m in mine], len(rows) - len(mine), tolerance,
                                  tolerance_px), **made}
    return out


@delegates(score_localisation_groups, but=["groups", "target"])
def score_positives(
    learn,  # a two-class Learner, or several (an ensemble: their maps averaged)
    dl,  # a validation or test DataLoader over a table with `file` and `polygons`
    positive: str,  # the finding's class, whose map is scored
    is_positive,  # per image of `dl`: labelled positive (bools)
    called,  # per image of `dl`: called positive at the decision threshold (bools)
    **kwargs,
) -> dict:
    """A binary test's localisation, from one map per positive: `localisation` on all positives and `localisation_tp` on
    the true positives, each named by its `images`; a group with no annotated image is left out."""
    is_positive = np.asarray(is_positive, bool)
    groups = {"localisation": np.flatnonzero(is_positive),
              "localisation_tp": np.flatnonzero(is_positive & np.asarray(called, bool))}
    scores = score_localisation_groups(learn, groups, dl, target=positive, **kwargs)
    names = {"localisation": "all positives", "localisation_tp": "true positives"}
    return {key: {**s, "images": names[key]} for key, s in scores.items() if s["n"]}


# ---------------------------------------------------------------- command line

def _output_names(files) -> list:
    "One PNG name per image, `<stem>_gradcam.png`, numbered where stems repeat across folders."
    # The suffix keeps an overlay from overwriting its own image when --out is the image folder.
    names, seen = [], set()
    for f in files:
        stem, k = Path(f).stem, 1
        name = f"{stem}_gradcam.png"
        while name in seen:
            k += 1
            name = f"{stem}_gradcam_{k}.png"
        seen.add(name)
        names.append(name)
    return names


def _parser() -> argparse.ArgumentParser:
    from .predict import add_export_and_images
    p = ArgumentParser(
        prog="python -m fracture_fastai.cam",
        description="Grad-CAM overlays of radiographs with an exported fastai Learner (export.pkl from "
                    "python -m fracture_fastai.run): one PNG per image in --out, its path printed.",
        epilog="Exit code: 0 all images drawn, 1 some could not be read or found, 2 usage error. "
               "export.pkl is a pickle: load only exports you trust.")
    add_export_and_images(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the overlays (<image stem>_gradcam.png)")
    p.add_argument("--target", metavar="CLASS", help="explain this class (name or index) instead of the predicted one")
    p.add_argument("--levels", type=int, default=None, metavar="N",
                   help="feature-map levels averaged into the heat map (1: the body's output; 2: and the map at twice "
                        "its resolution); default: the model's own, as its run scored it (model.json), else 1")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average each map with its mirror's, probabilities too; default: the model's own, else no")
    p.add_argument("--bs", type=int, default=16, help="batch size (default: %(default)s)")
    return p


@cli_errors
def main(argv=None) -> int:
    "Command line: draw one Grad-CAM overlay per image, report failures; returns the exit code."
    from .runtime import tune_malloc
    tune_malloc()
    args = _parser().parse_args(argv)
    return _cam_command(args)


def _readable_items(dl, idxs, files) -> tuple:
    "`(items, good)`: the loaded items of `idxs` and their indices; each unreadable file reported on stderr."
    items, good = [], []
    for i in idxs:
        try:
            items.append(dl.do_item(i))
            good.append(i)
        except Exception as e:
            from .predict import unreadable_reason
            print(f"skipped {files[i]}: {unreadable_reason(e)}", file=sys.stderr)
    return items, good


def _cam_command(args) -> int:
    "Draw the overlays of parsed `args`; the exit code."
    from .data import IMAGE_EXTS
    from .model_io import load_any, read_heat_map
    from .predict import find_images
    if args.bs < 1: raise UserError(f"--bs must be at least 1; got {args.bs}")
    if args.levels is not None and args.levels < 1: raise UserError(f"--levels must be at least 1; got {args.levels}")
    files, missing = find_images(args.paths)
    for p in missing: print(f"skipped {p}: no such file or folder", file=sys.stderr)
    if not files:
        raise UserError(f"no images found in {' '.join(args.paths)}; looked for {' '.join(sorted(IMAGE_EXTS))}")
    out = check_writable(args.out, "--out", folder=True)
    learn = load_any(args.export)
    heat_map = read_heat_map(args.export)
    heat_map.update({k: getattr(args, k) for k in heat_map if getattr(args, k) is not None})
    vocab = _vocab(learn)
    target = None if args.target is None else _class_index(learn, args.target, learn.dls.c)
    dl = _set_split(learn.dls.test_dl([str(f) for f in files], bs=args.bs))
    names, n_failed = _output_names(files), len(missing)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(files), args.bs):
        # Each image is read once: the readable ones go on as a batch, a bad one costs only itself.
        items, good = _readable_items(dl, range(start, min(start + args.bs, len(files))), files)
        n_failed += len(range(start, min(start + args.bs, len(files)))) - len(good)
        if not good: continue
        x = _after_batch(dl, dl.do_batch(items))[0]
        cams, probs, targets = _gradcam(learn, x, target, **heat_map)
        for i, image, cam, p, t in zip(good, decode_images(dl, x), cams, probs, targets.tolist()):
            pred = int(p.argmax())
            title = f"{_class_name(vocab, pred)} ({p[pred]:.2f})"
            if target is not None: title += f"; Grad-CAM of {_class_name(vocab, t)}"
            print(overlay(image, cam, out / names[i], title), flush=True)
    if n_failed:
        print(f"{n_failed} of {len(files) + len(missing)} path(s) failed; {len(files) + len(missing) - n_failed} "
              "overlay(s) written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- Grad-CAM as supervision (--cam-loss)

CAM_FORMS = ("graph", "features")  # `run --cam-form`: what the cam loss may change (see `cam_pointing_loss`)
CAM_SHARPNESS = 4.0


def _check_form(form: str):
    if form not in CAM_FORMS: raise UserError(f"cam loss form must be one of {', '.join(CAM_FORMS)}; got {form!r}")


def hit_cells(
    masks: torch.Tensor,  # (bs, 1, H, W) fracture masks in [0, 1] at the input size
    cells: tuple,  # (h, w) of the feature map
    tolerance: float = DEFAULT_TOLERANCE,  # the pointing game's slack, as a share of the input's longer side
) -> torch.Tensor:
    """(bs, h, w) bool: the feature-map cells whose centre lies within `tolerance` of the mask. Upsampled bilinearly
    (as `gradcam` does), a map peaks at its highest cell's centre, so these are the cells whose peak the pointing
    game (`localisation_scores`) counts as a hit."""
    (H, W), (h, w) = masks.shape[-2:], cells
    r = tolerance * max(H, W)
    k = int(math.floor(r))
    dy, dx = torch.meshgrid(torch.arange(-k, k + 1), torch.arange(-k, k + 1), indexing="ij")
    disk = dy.square() + dx.square() <= r * r  # pixel offsets within the slack (the pointing game's L2 distance)
    dy, dx = dy[disk].to(masks.device), dx[disk].to(masks.device)
    # The pixel where argmax finds the peak of cell i after a bilinear upsampling (align_corners=False): nearest its
    # centre (i + 0.5) * H / h - 0.5, the first of two where it falls between them; but the upsampling holds the
    # first and last cells' values flat out to the edges, so there the first pixel of that plateau: 0, and the
    # first pixel at or past the last centre.
    def peaks(n_cells, n_px):
        centre = (torch.arange(n_cells, device=masks.device) + 0.5) * n_px / n_cells - 0.5
        px = (centre - 0.5).ceil()
        px[-1] = centre[-1].ceil()
        px[0] = 0
        return px.long()
    cy, cx = peaks(h, H), peaks(w, W)
    ys = (cy[:, None, None] + dy).clamp(0, H - 1)  # (h, 1, K)
    xs = (cx[None, :, None] + dx).clamp(0, W - 1)  # (1, w, K)
    inside = masks[:, 0] > 0.5
    return inside[:, ys, xs].any(-1)  # (bs, h, w)


def cam_pointing_loss(
    acts: torch.Tensor,  # the body's feature map (bs, k, h, w), part of the autograd graph
    scores: torch.Tensor,  # each image's logit of its labelled class (bs,), computed from `acts`
    masks: torch.Tensor,  # (bs, 1, H, W) fracture masks in [0, 1] at the input size
    form: str = "graph",  # "graph": the Grad-CAM keeps its whole graph; "features": channel weights fixed, map standardised
    sharpness: float = CAM_SHARPNESS,  # "features": the softmax's scale on the standardised map
    tolerance: float = DEFAULT_TOLERANCE,  # "features": the pointing game's slack, as a share of the input's longer side
) -> torch.Tensor | None:
    """Mean over the images with a fracture mask of -log(share of the Grad-CAM's softmax over the feature-map cells
    that falls on cells the fracture touches): small where the map's peak, which the pointing game scores, lies on
    the fracture. None where no image has a mask.

    `form="graph"` differentiates through the Grad-CAM's channel weights too (a double backward through the head),
    so the loss can also fall by sharpening the map's scale, that is by growing the head's logits.
    `form="features"` holds the channel weights fixed (no double backward: the head gets nothing from this loss)
    and standardises each map (zero mean, unit deviation over its cells) before a softmax of scale `sharpness`: the
    loss cannot change with the map's scale, only with where the body's features put its peak. Divided by
    `sharpness`, it is about how many deviations the map's highest cell off the fracture stands above its highest
    cell on it (a soft maximum), and near 0 once the peak is on the fracture: the rest of the map is left to the
    classifier, where the plain softmax keeps pulling all of the map's mass onto the fracture. Its cells "on the
    fracture" are those the pointing game would score as a hit (`hit_cells`), not every cell the fracture touches;
    an image whose fracture lies within `tolerance` of no cell centre keeps the touched cells."""
    _check_form(form)
    graph = form == "graph"
    region = F.adaptive_max_pool2d(masks.float(), acts.shape[-2:])[:, 0] > 0.5  # cells the fracture touches
    if not graph:  # the cells whose peak the pointing game counts as a hit, where an image has any
        hits = hit_cells(masks, acts.shape[-2:], tolerance)
        region = torch.where(hits.flatten(1).any(1)[:, None, None], hits, region)
    known = region.flatten(1).any(1)
    if not known.any(): return None
    (grads,) = torch.autograd.grad(scores.sum(), acts, create_graph=graph, retain_graph=True)
    cam = (grads.mean((2, 3), keepdim=True) * acts).sum(1).float()  # Grad-CAM before its ReLU: (bs, h, w)
    if not graph: cam = sharpness * (cam - cam.mean((1, 2), keepdim=True)) / (cam.std((1, 2), keepdim=True) + 1e-6)
    logp = cam.flatten(1).log_softmax(1)
    inside = logp.masked_fill(~region.flatten(1), float("-inf")).logsumexp(1)
    return -inside[known].mean() / (1.0 if graph else sharpness)


class CamSupervision(Callback):
    """Training callback (`run --cam-loss W --cam-form F`): adds W * `cam_pointing_loss` of each image's labelled class to the
    loss, with the fracture masks that `SplitMask` took off the batch. Validation and the losses fastai records are
    left as they are (`epoch_means` keeps the added loss); where no gradient reaches the feature map (a body frozen
    with its batch norms too) a batch trains as usual."""
    order = 5  # after the batch is made, before the loss that fastai's later callbacks (fp16 scaling) work on

    def __init__(self, weight: float = 1.0, form: str = "graph"):
        if not weight > 0: raise UserError(f"cam loss weight must be > 0, got {weight}")
        _check_form(form)
        self.weight, self.form, self.cam_loss, self.acts = weight, form, None, None
        self.losses, self.epoch_means = [], []  # per training batch; per epoch (None where none was computed), over every fit

    def before_fit(self):
        from .transforms import SplitMask
        found = [t for t in self.dls.train.after_batch.fs if isinstance(t, SplitMask)]
        if not found:
            raise UserError("--cam-loss needs DataLoaders made with masks=True (fracture masks on the training images)")
        self.split = found[0]
        self.hook = self.learn.model[0].register_forward_hook(self._store)
        self._epoch_start = len(self.losses)

    # before_train / after_train: the training half of an epoch of a fit (get_preds and validate fire epoch events too)
    def before_train(self): self._epoch_start = len(self.losses)

    def after_train(self):
        done = self.losses[self._epoch_start:]
        self.epoch_means.append(round(sum(done) / len(done), 4) if done else None)

    def _store(self, module, inp, out): self.acts = out if self.training else None

    def after_pred(self):
        self.cam_loss, acts, self.acts = None, self.acts, None
        masks = self.split.last
        if not self.training or masks is None or acts is None or not acts.requires_grad: return
        scores = self.pred.gather(1, self.yb[0].long()[:, None])[:, 0]
        self.cam_loss = cam_pointing_loss(acts, scores, masks.to(acts.device), self.form)

    def after_loss(self):
        if self.training and self.cam_loss is not None:
            self.learn.loss_grad = self.learn.loss_grad + self.weight * self.cam_loss
            self.losses.append(float(self.cam_loss.detach()))

    def after_fit(self):
        self.hook.remove()
        self.acts = self.cam_loss = None
