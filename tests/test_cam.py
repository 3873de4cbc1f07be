"""Grad-CAM: a known-answer model, every registered arch, frozen pretrained bodies, polygon mapping through the real pad
Resize, localisation scores with analytic answers, the run-folder plot and the command line."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from fracture_fastai.cam import (_batch, _binary_picks, _eval_mode, _gradcam, _right_and_wrong, gradcam, gradcam_grid, localisation_scores, main, polygon_mask,
                                 polygon_to_input, score_localisation)
from fracture_fastai.errors import UserError
from fracture_fastai.evaluate import accuracy_ci

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a model whose Grad-CAM is known


class QuadrantBody(nn.Module):
    "Half-resolution feature map: channel k is the image's brightness in quadrant k (TL, TR, BL, BR), 0 elsewhere."
    def forward(self, x):
        bright = nn.functional.avg_pool2d(x.mean(1, keepdim=True), 2)
        h, w = bright.shape[-2:]
        masks = torch.zeros(4, h, w)
        masks[0, :h // 2, :w // 2] = masks[1, :h // 2, w // 2:] = masks[2, h // 2:, :w // 2] = masks[3, h // 2:, w // 2:] = 1
        return bright * masks


def _quadrant_learner():
    "A Learner whose class-k logit is the mean of feature channel k: the brightness of quadrant k."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    dl = DataLoader([(torch.zeros(3, 32, 32), 0)], bs=1)
    model = nn.Sequential(QuadrantBody(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return Learner(DataLoaders(dl, dl), model, loss_func=CrossEntropyLossFlat())


def _square(img, quadrant, value, side=6):
    "A bright `side`-px square in the middle of `quadrant` (0 TL, 1 TR, 2 BL, 3 BR) of a CHW image."
    h, w = img.shape[-2:]
    cy, cx = (h // 4) * (1 + 2 * (quadrant // 2)), (w // 4) * (1 + 2 * (quadrant % 2))
    img[:, cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2] = value


def _quadrant_of(cam):
    h, w = cam.shape
    y, x = np.unravel_index(int(cam.argmax()), cam.shape)
    return 2 * int(y >= h // 2) + int(x >= w // 2)


def test_gradcam_peaks_in_the_quadrant_that_decides_the_class():
    learn = _quadrant_learner()
    x = torch.zeros(4, 3, 32, 32)
    for q in range(4):
        _square(x[q], q, 1.0)  # the class: a bright square in quadrant q
        _square(x[q], (q + 1) % 4, 0.6)  # a dimmer distractor in the next quadrant
    cams = gradcam(learn, x)
    assert cams.shape == (4, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    assert [_quadrant_of(c) for c in cams] == [0, 1, 2, 3]
    # Asked about the distractor's class, Grad-CAM moves to the distractor: the weights follow the target.
    cams = gradcam(learn, x, target=[(q + 1) % 4 for q in range(4)])
    assert [_quadrant_of(c) for c in cams] == [1, 2, 3, 0]
    # Analytically the map is the target channel itself (one non-zero channel weight), upsampled and peak-scaled.
    expected = nn.functional.interpolate(QuadrantBody()(x)[torch.arange(4), [1, 2, 3, 0]][:, None], size=(32, 32),
                                         mode="bilinear", align_corners=False)[:, 0]
    expected = expected / expected.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(cams, expected, atol=1e-5)


def test_gradcam_target_by_name_or_index_and_bad_targets():
    from fracture_fastai.errors import UserError
    learn = _quadrant_learner()
    x = torch.zeros(2, 3, 32, 32)
    _square(x[0], 3, 1.0)
    _square(x[1], 3, 1.0)
    assert [_quadrant_of(c) for c in gradcam(learn, x, target=3)] == [3, 3]
    with pytest.raises(UserError, match="index in 0..3"):
        gradcam(learn, x, target=7)
    with pytest.raises(UserError, match="one per image"):
        gradcam(learn, x, target=[0, 1, 2])


class TwoLevelBody(nn.Sequential):
    "Brightness at full resolution (a 1x1 conv averaging the channels), then 2x2 average pooling: two levels of one map."
    def __init__(self):
        conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(conv.weight, 1 / 3)
        super().__init__(conv, nn.AvgPool2d(2))


def _two_level_learner():
    "Class 0's logit is the mean brightness, class 1's its negative: Grad-CAM at either level is the brightness there."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad(): head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model = nn.Sequential(TwoLevelBody(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head))
    dl = DataLoader([(torch.zeros(3, 32, 32), 0)], bs=1)
    return Learner(DataLoaders(dl, dl), model, loss_func=nn.CrossEntropyLoss())


def _peak_scaled(maps): return maps / maps.flatten(1).amax(1)[:, None, None]


def test_two_levels_average_the_coarse_and_the_fine_map():
    learn = _two_level_learner()
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, 9, 21] = 1.0  # one bright pixel: the fine map finds it exactly, the coarse one only its 2x2 cell
    x[1, :, 4:8, 20:30] = 0.5
    x[1, :, 25, 3] = 1.0
    fine = x.mean(1)
    coarse = nn.functional.interpolate(nn.functional.avg_pool2d(fine[:, None], 2), size=(32, 32), mode="bilinear",
                                       align_corners=False)[:, 0]
    assert torch.allclose(gradcam(learn, x, target=0), _peak_scaled(coarse), atol=1e-6)
    cams = gradcam(learn, x, target=0, levels=2)
    assert torch.allclose(cams, _peak_scaled((_peak_scaled(coarse) + _peak_scaled(fine)) / 2), atol=1e-6)
    assert np.unravel_index(int(cams[0].argmax()), (32, 32)) == (9, 21)
    assert torch.equal(gradcam(learn, x, target=1, levels=2), torch.zeros(2, 32, 32))  # no positive evidence
    # The model is mirror-symmetric, so a mirror-averaged map is the image's own: each half mirrored back in place
    assert torch.allclose(gradcam(learn, x, target=0, levels=2, flip=True), cams, atol=1e-6)
    with pytest.raises(UserError, match="no stage that halves"):
        gradcam(learn, x, levels=3)  # the image itself is no feature map


def test_gradcam_of_a_blank_image_is_all_zeros_not_nan():
    cams = gradcam(_quadrant_learner(), torch.zeros(1, 3, 32, 32))
    assert torch.equal(cams, torch.zeros(1, 32, 32))


# ---------------------------------------------------------------- real learners


@pytest.fixture(scope="module")
def demo_dls(demo_export):
    from fracture_fastai.data import load_table, radiograph_dataloaders
    return radiograph_dataloaders(load_table(demo_export), size=64, bs=4, device="cpu")


def test_batches_by_index_are_validation_batches_on_a_fresh_dataloader(demo_export, tmp_path):
    "Before a DataLoader is first iterated its pipelines have no split: Resize pads at random and augmentations run."
    from PIL import Image
    from fracture_fastai.data import load_table, radiograph_dataloaders
    dls = radiograph_dataloaders(load_table(demo_export), size=32, bs=4, device="cpu")  # never iterated
    rng = np.random.default_rng(0)
    files = [tmp_path / "wide.png", tmp_path / "tall.png"]
    for f, shape in zip(files, [(30, 70), (70, 30)]):  # non-square, so where the pad goes shows
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(f)
    test = dls.test_dl(files)
    assert torch.equal(_batch(test, [0, 1])[0], test.one_batch()[0])
    assert torch.equal(_batch(dls.valid, [0, 1, 2, 3])[0], dls.valid.one_batch()[0])


def _model_state(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_gradcam_on_a_frozen_pretrained_body(demo_dls):
    from fracture_fastai.models import create_learner
    learn = create_learner("tf_efficientnet_lite0", demo_dls, pretrained="auto")
    if not learn.pretrained:
        pytest.skip(f"no offline weights for tf_efficientnet_lite0: {learn.weights_info.note}")
    learn.model.train()
    body = learn.model[0]
    # fastai's freeze leaves BatchNorm trainable (train_bn): the convolutions are what is frozen.
    assert not any(m.weight.requires_grad for m in body.modules() if isinstance(m, nn.Conv2d))
    x = demo_dls.valid.one_batch()[0][:2]
    maps = {}
    for fully_frozen in (False, True):
        if fully_frozen: body.requires_grad_(False)  # nothing in the body needs grad: its output has no autograd history
        before = _model_state(learn.model)
        for levels in (1, 3):  # finer levels too: their stage inputs have no autograd history either
            cams = gradcam(learn, x, levels=levels)
            assert cams.shape == (2, 64, 64) and torch.isfinite(cams).all()
            assert cams.min() >= 0 and cams.max() <= 1 and all(c.max() > c.min() for c in cams)
            assert _model_state(learn.model) == before
            assert all(p.grad is None for p in learn.model.parameters())  # no gradient left behind
            maps[fully_frozen, levels] = cams
    for levels in (1, 3):
        assert torch.allclose(maps[True, levels], maps[False, levels], atol=1e-5)  # the same maps either way
    assert not torch.allclose(maps[True, 1], maps[True, 3], atol=1e-2)


def _archs():
    from fracture_fastai.models import list_archs
    return list_archs()


@pytest.mark.parametrize("arch", _archs())
def test_gradcam_runs_for_every_arch(arch, demo_dls):
    from fracture_fastai.models import create_learner
    learn = create_learner(arch, demo_dls, pretrained="none")
    before = _model_state(learn.model)
    x = demo_dls.valid.one_batch()[0][:1]
    cams = gradcam(learn, x)
    assert cams.shape == (1, 64, 64) and torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    # Three levels, mirror-averaged: as valid, and the mirror of a mirror-averaged map is the mirror's own
    cams = gradcam(learn, x, levels=3, flip=True)
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert torch.allclose(gradcam(learn, x.flip(-1), levels=3, flip=True), cams.flip(-1), atol=1e-5)
    assert _model_state(learn.model) == before
    probs = _gradcam(learn, x, flip=True)[1]  # the probabilities are flip TTA's, as predict_probs gives them
    with _eval_mode(learn.model), torch.no_grad():
        expected = (learn.model(x).softmax(1) + learn.model(x.flip(-1)).softmax(1)) / 2
    assert torch.allclose(probs, expected, atol=1e-5)


# ---------------------------------------------------------------- polygons through fastai's pad Resize


@pytest.mark.parametrize("orig, size", [((64, 64), 32), ((203, 100), 64), ((90, 151), 64), ((203, 100), (48, 64))])
def test_polygon_mapping_matches_fastai_point_transform(orig, size):
    "fastai moves TensorPoints exactly as it moves pixels: our mapping must agree with it to float precision."
    from fastai.vision.augment import Resize
    from fastai.vision.core import TensorPoint
    polygon = np.array([[0.1, 0.2], [0.7, 0.15], [0.9, 0.8], [0.3, 0.95], [0.0, 1.0]])
    points = TensorPoint.create(torch.tensor(polygon * 2 - 1), img_size=orig)  # fastai points live in [-1, 1]
    moved = Resize(size, method="pad", pad_mode="zeros")(points, split_idx=1)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    expected = (moved.numpy() + 1) / 2 * [out_w, out_h]
    (mapped,) = polygon_to_input([polygon.tolist()], orig, size)
    np.testing.assert_allclose(mapped, expected, atol=1e-4)


def _iou(a, b): return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("orig", [(80, 80), (203, 100), (100, 203)])
def test_polygon_mask_covers_the_pixels_the_real_resize_moves(orig):
    "A white polygon on a black image, through the real pad Resize: the mapped polygon's mask covers the white pixels."
    from fastai.vision.augment import Resize
    from fastai.vision.core import PILImage
    w, h = orig
    polygon = [[0.35, 0.3], [0.65, 0.35], [0.6, 0.7], [0.3, 0.6]]  # normalised, YOLO style
    canvas = np.zeros((h, w), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.array(polygon) * [w, h] - 0.5).astype(np.int32)], 255)
    resized = Resize(64, method="pad", pad_mode="zeros")(PILImage.create(np.stack([canvas] * 3, -1)), split_idx=1)
    white = np.asarray(resized)[..., 0] > 127
    mask = polygon_mask(polygon_to_input([polygon], orig, 64), 64)
    assert _iou(mask, white) > 0.9
    if w != h:  # the test can tell: ignoring the padding (a plain stretch) misses the white pixels
        squished = polygon_mask([np.array(polygon) * 64], 64)
        assert _iou(squished, white) < 0.6


def test_polygon_mask_keeps_a_thin_polygon():
    mask = polygon_mask([np.array([[2.0, 5.0], [30.0, 5.2], [30.0, 5.4], [2.0, 5.2]])], (16, 32))
    assert mask.shape == (16, 32) and mask.sum() >= 20 and mask[:, :2].sum() == 0


# ---------------------------------------------------------------- scores with known answers


def _square_mask(n=20, y0=4, x0=4, side=4):
    mask = np.zeros((n, n), bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def test_localisation_scores_known_answers():
    mask = _square_mask()  # rows/cols 4..7
    inside = np.full((20, 20), 0.25)
    inside[mask] = 1.0  # peak inside; mass inside = 16 / (16 + 0.25 * 384) = 1/7
    near = np.zeros((20, 20))
    near[5, 9] = 1.0  # 2 px right of the mask's last column: inside a 2 px tolerance
    far = np.zeros((20, 20))
    far[5, 11] = 1.0  # 4 px away: a miss
    res = localisation_scores([inside, near, far, np.zeros((20, 20)), inside], [mask, mask, mask, mask, None],
                              tolerance=0.1)  # 0.1 * 20 px = 2 px
    assert res["n"] == 4 and res["n_skipped"] == 1 and res["tolerance_px"] == pytest.approx(2.0)
    assert res["pointing_game"] == 0.5  # inside and near hit; far and the blank map miss
    assert res["pointing_game_ci95"] == pytest.approx(list(accuracy_ci(2, 4)))
    masses = [1 / 7, 0.0, 0.0, 0.0]
    assert res["mass_inside"] == pytest.approx(np.mean(masses))
    half = 1.959964 * np.std(masses, ddof=1) / 2
    assert res["mass_inside_ci95"] == pytest.approx([0.0, np.mean(masses) + half], abs=1e-6)  # clipped at 0


def test_localisation_scores_without_polygons():
    res = localisation_scores([np.ones((8, 8))], [np.zeros((8, 8), bool)])
    assert res["n"] == 0 and res["n_skipped"] == 1 and res["pointing_game"] is None and res["mass_inside_ci95"] is None


def test_right_and_wrong_picks_half_of_each_where_possible():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.55, 0.45]])
    targs = torch.tensor([0, 0, 1, 0, 1])  # right: 0, 1, 2; wrong: 3, 4
    assert _right_and_wrong(probs, targs, 4) == [0, 2, 3, 4]  # most confident first within each
    assert _right_and_wrong(probs, targs, 8) == [0, 2, 1, 3, 4]  # fewer than asked: all of them
    assert _right_and_wrong(probs, torch.tensor([0, 0, 1, 1, 0]), 4) == [0, 2, 3, 1]  # no wrong ones: all right


def test_binary_picks_true_positives_first_then_false_positives_and_misses():
    p = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.95, 0.05, 0.4])
    pos = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    # at 0.5: TP 0, 1, 3 (by p: 0.9, 0.8, 0.6); FP 7, 2 (0.95, 0.7); FN 6, 4, 9 (most confidently missed first: 0.1, 0.3, 0.4)
    assert _binary_picks(p, pos, 0.5, 8) == [0, 1, 3, 7, 2, 6, 4, 9]  # 3 TPs of 4 wanted: a third miss fills in
    assert _binary_picks(p, pos, 0.5, 4) == [0, 1, 7, 6]
    assert _binary_picks(p, pos, 0.25, 4) == [0, 1, 7, 6]  # 0.3 is called now: TP 0, 1, 3, 9, 4; misses: 6 only
    assert _binary_picks(p, pos, 0.99, 3) == [6, 4, 9]  # nothing called: only misses
    assert _binary_picks(p, torch.zeros(10, dtype=torch.bool), 0.99, 3) == []  # nothing to show


# ---------------------------------------------------------------- on the demo export


@pytest.fixture(scope="module")
def cnn_learner(demo_dls):
    from fracture_fastai.models import create_learner
    return create_learner("cnn", demo_dls, pretrained="none")


def test_score_localisation_on_the_demo_valid_and_test_sets(cnn_learner, demo_dls):
    res = score_localisation(cnn_learner, bs=8)
    valid = demo_dls.valid.items
    assert res["target"] == "predicted" and res["n"] == sum(bool(p) for p in valid.polygons) == 12
    assert {"n", "n_skipped", "pointing_game", "pointing_game_ci95", "mass_inside", "mass_inside_ci95",
            "tolerance", "tolerance_px"} <= set(res)
    assert 0 <= res["pointing_game_ci95"][0] <= res["pointing_game"] <= res["pointing_game_ci95"][1] <= 1
    assert 0 <= res["mass_inside_ci95"][0] <= res["mass_inside"] <= res["mass_inside_ci95"][1] <= 1
    assert res["tolerance_px"] == pytest.approx(0.04 * 64)
    assert score_localisation(cnn_learner, demo_dls[2], bs=16)["n"] == len(demo_dls[2].items) == 12


def test_gradcam_grid_writes_a_png(cnn_learner, tmp_path):
    path = gradcam_grid(cnn_learner, tmp_path / "gradcam.png", n=4)
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_gradcam_grid_from_evaluated_probabilities_makes_no_pass(cnn_learner, tmp_path, monkeypatch):
    probs, targets = cnn_learner.get_preds(dl=cnn_learner.dls.valid)[:2]
    monkeypatch.setattr(cnn_learner, "get_preds", lambda *a, **k: pytest.fail("a pass over the data"))
    path = gradcam_grid(cnn_learner, tmp_path / "gradcam.png", n=4, probs=probs, targets=targets)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="probabilities for"):
        gradcam_grid(cnn_learner, tmp_path / "g.png", n=4, probs=probs[:3], targets=targets[:3])


def test_gradcam_grid_of_a_binary_test_draws_the_findings_map(cnn_learner, tmp_path, fracatlas_maker, monkeypatch):
    import fracture_fastai.cam as cam
    from fracture_fastai.data import load_table, radiograph_dataloaders
    from fracture_fastai.models import create_learner
    table = load_table(fracatlas_maker(tmp_path / "fa", n_fractured=8, n_normal=8))
    learn = create_learner("cnn", radiograph_dataloaders(table, size=32, bs=4, device="cpu", cache=False),
                           pretrained="none")
    probs, targets = learn.get_preds(dl=learn.dls.valid)[:2]
    pos = list(learn.dls.vocab).index("fractured")
    real, seen = cam._gradcam, []
    monkeypatch.setattr(cam, "_gradcam", lambda learn, x, *a, **k: seen.append((len(x), k["target"])) or real(learn, x, *a, **k))
    import matplotlib.axes
    outlines, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, y, *a, **k: outlines.append((x, y)) or plot(ax, x, y, *a, **k))
    path = gradcam_grid(learn, tmp_path / "gradcam.png", n=4, probs=probs, targets=targets, positive="fractured",
                        threshold=0.0)  # every image called fractured: true and false positives only
    assert path.read_bytes()[:4] == b"\x89PNG"
    n_positive = int((targets == pos).sum())
    assert seen == [(4, pos)] and 0 < n_positive < len(targets)  # the finding's map, on the four picked images
    # The fractured ones' boxes are outlined on their maps, in the input's pixels (closed: back to the first corner)
    picks = _binary_picks(probs[:, pos], targets == pos, 0.0, 4)
    boxes = cam._input_polygons(learn.dls.valid, picks)
    assert [len(b) > 0 for b in boxes] == [bool(targets[i] == pos) for i in picks] and any(map(len, boxes))
    assert len(outlines) == sum(map(len, boxes))
    drawn = [np.column_stack(o) + 0.5 for o in outlines]
    expected = [poly for b in boxes for poly in b]
    assert all(np.allclose(d[:-1], e) and np.allclose(d[-1], e[0]) for d, e in zip(drawn, expected))
    assert all(0 <= v <= 32 for e in expected for v in e.ravel())  # inside the 32 px input
    with pytest.raises(UserError, match="no true or false positives"):  # nothing fractured, nothing called
        gradcam_grid(learn, tmp_path / "g.png", n=4, probs=probs, targets=torch.full_like(targets, 1 - pos),
                     positive="fractured", threshold=1.01)
    with pytest.raises(UserError, match="needs two classes"):
        gradcam_grid(cnn_learner, tmp_path / "g.png", probs=probs[:1].repeat(len(cnn_learner.dls.valid.items), 3),
                     targets=None, positive="elbow")


def test_localisation_groups_score_each_subset_from_one_map_per_image(cnn_learner, demo_dls, monkeypatch):
    import fracture_fastai.cam as cam
    from fracture_fastai.cam import score_localisation_groups, score_positives
    annotated = [i for i, p in enumerate(demo_dls.valid.items.polygons) if len(p)]
    some, others = annotated[:7], annotated[3:10]  # overlapping subsets
    alone = {name: score_localisation(cnn_learner, bs=4, target=1, rows=rows)
             for name, rows in (("some", some), ("others", others))}
    seen = []
    real = cam._gradcam
    monkeypatch.setattr(cam, "_gradcam", lambda learn, x, *a, **k: seen.append(len(x)) or real(learn, x, *a, **k))
    both = score_localisation_groups(cnn_learner, {"some": some, "others": others}, bs=4, target=1)
    assert sum(seen) == len(set(some) | set(others)) == 10  # each image's map made once
    for name in alone:  # the same scores as scoring each subset on its own (batches differ: floats to rounding)
        assert both[name].keys() == alone[name].keys()
        assert both[name] == {k: pytest.approx(v) if isinstance(v, (float, list)) else v for k, v in alone[name].items()}
    assert both["some"]["n"] == 7 and both["others"]["n"] == 7
    # A binary test's pair: all positives and the true positives among them, one map each
    seen.clear()
    is_positive = np.zeros(len(demo_dls.valid.items), bool); is_positive[some] = True
    called = np.zeros_like(is_positive); called[annotated[:2]] = True; called[annotated[-1]] = True  # one false positive
    pair = score_positives(cnn_learner, demo_dls.valid, 1, is_positive, called, bs=4)
    assert sum(seen) == 7 and pair["localisation"]["images"] == "all positives"
    assert {k: v for k, v in pair["localisation"].items() if k != "images"} == {
        k: pytest.approx(v) if isinstance(v, (float, list)) else v for k, v in alone["some"].items()}
    assert pair["localisation_tp"]["n"] == 2 and pair["localisation_tp"]["images"] == "true positives"
    assert score_positives(cnn_learner, demo_dls.valid, 1, is_positive, np.zeros_like(called)).keys() == {"localisation"}


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cam_export(demo_export, tmp_path_factory):
    "(export.pkl of an untrained cnn at 32 px, folder of 3 demo images + a corrupt one)."
    from fracture_fastai.data import load_table, radiograph_dataloaders
    from fracture_fastai.models import create_learner
    root = tmp_path_factory.mktemp("cam")
    learn = create_learner("cnn", radiograph_dataloaders(load_table(demo_export), size=32, bs=4, device="cpu"),
                           pretrained="none")
    learn.export(root / "export.pkl")
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    for i, src in enumerate(sorted((demo_export / "valid" / "images").iterdir())[:3]):
        (images / ("nested" if i == 2 else "") / src.name).write_bytes(src.read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    return root / "export.pkl", images


def test_cli_writes_one_overlay_per_image_and_skips_the_corrupt_one(cam_export, tmp_path):
    export, images = cam_export
    out = tmp_path / "cams"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.cam", str(export), str(images), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert res.returncode == 1, res.stderr[-2000:]
    written = sorted(out.iterdir())
    assert len(written) == 3 and all(p.name.endswith("_gradcam.png") for p in written)
    assert sorted(res.stdout.split()) == sorted(map(str, written))
    assert "corrupt.png: cannot read image" in res.stderr and "Traceback" not in res.stderr


def test_cli_user_errors_are_one_line(cam_export, tmp_path, capsys):
    export, images = cam_export
    for argv, message in [([str(tmp_path / "missing.pkl"), str(images)], "no such file"),
                          ([str(export), str(images), "--target", "kneecap"], "unknown class 'kneecap'"),
                          ([str(export), str(tmp_path / "nothing")], "no images found"),
                          ([str(export), str(images), "--levels", "0"], "--levels must be at least 1"),
                          ([str(export), str(images), "--levels", "9"], "no stage that halves")]:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and message in err[-1] and err[-1].startswith("error: ")
