"The fracture annotations as supervision (`run --cam-loss`): masks that travel with the augmented image, the loss, the callback."
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fracture_fastai.cam import CamSupervision, _image_scores, cam_pointing_loss, hit_cells
from fracture_fastai.data import load_table, radiograph_dataloaders
from fracture_fastai.errors import DataError
from fracture_fastai.transforms import MaskedRadiograph, SplitMask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bright_fractures(tmp_path_factory):
    """A YOLO export of 48x64 and 64x48 dark images (two classes) with one bright rectangle each, exactly where its
    label's polygon says: a mask that follows the image shows bright pixels, one that does not, dark ones."""
    root, rng = tmp_path_factory.mktemp("bright"), np.random.default_rng(0)
    for split, n in (("train", 8), ("valid", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            w, h = (48, 64) if i % 2 else (64, 48)
            a = rng.integers(0, 30, (h, w)).astype(np.uint8)
            x0, y0 = rng.uniform(0.1, 0.6), rng.uniform(0.1, 0.6)
            x1, y1 = x0 + 0.25, y0 + 0.2
            a[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = 250
            Image.fromarray(a).save(root / split / "images" / f"img{i}.png")
            poly = f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1}"
            (root / split / "labels" / f"img{i}.txt").write_text(f"{i % 2} {poly}\n")
    (root / "data.yaml").write_text("train: train/images\nval: valid/images\nnames: ['elbow positive', 'wrist positive']\n")
    return root


def test_the_mask_moves_with_the_augmented_image(bright_fractures):
    table = load_table(bright_fractures)
    dls = radiograph_dataloaders(table, size=32, bs=8, masks=True, device="cpu", cache=False, clahe=False)
    split = next(t for t in dls.train.after_batch.fs if isinstance(t, SplitMask))
    assert all(isinstance(f, MaskedRadiograph) for f in dls.train.items.file)
    assert not any(isinstance(f, MaskedRadiograph) for f in dls.valid.items.file)
    for _ in range(3):  # random flips, rotations and zooms: the mask must follow every one
        xb, yb = dls.train.one_batch()
        masks = split.last
        assert xb.shape == (8, 3, 32, 32) and masks.shape == (8, 1, 32, 32)
        gray = xb[:, 0].as_subclass(torch.Tensor)
        inside, outside = masks[:, 0] > 0.9, masks[:, 0] < 0.1
        assert inside.any(1).any(1).all()  # every image's rectangle is in view
        assert gray[inside].mean() > gray[outside].mean() + 2  # normalised units: bright inside, dark outside
    xb, _ = dls.valid.one_batch()  # validation: 3 channels as before, no mask
    assert xb.shape[1] == 3 and split.last is None
    # A plain file (predict's test_dl) gives 3 channels too.
    assert dls.test_dl([str(bright_fractures / "valid" / "images" / "img0.png")]).one_batch()[0].shape[1] == 3


def test_masks_need_annotations(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2): Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / label / f"{i}.png")
    with pytest.raises(DataError, match=r"fracture masks \(--cam-loss\) need fracture annotations.*--cam-loss 0"):
        radiograph_dataloaders(load_table(tmp_path, valid_pct=0.5), size=32, masks=True, device="cpu", cache=False)


def test_the_loss_is_small_where_the_map_s_peak_is_on_the_fracture():
    torch.manual_seed(0)
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, :4, :4] = 1  # image 0: the fracture in the top-left quarter; image 1: no mask (no loss)
    def loss_of(acts):
        scores = acts.mean((2, 3)).sum(1)  # a linear head: every channel weighs 1, so the map is the channel sum
        return cam_pointing_loss(acts, scores, masks)
    on = torch.zeros(2, 3, 2, 2)
    on[:, :, 0, 0] = 5.0  # the map's peak on the fracture's cell
    off = torch.zeros(2, 3, 2, 2)
    off[:, :, 1, 1] = 5.0
    assert loss_of(on.requires_grad_()) < 0.1 < loss_of(off.requires_grad_())
    acts = off.detach().clone().requires_grad_()
    opt = torch.optim.SGD([acts], lr=1.0)
    for _ in range(20):  # the gradient moves the peak onto the fracture
        opt.zero_grad(); loss_of(acts).backward(); opt.step()
    assert acts.detach()[0].sum(0).argmax() == 0
    assert cam_pointing_loss(on.requires_grad_(), on.sum((1, 2, 3)), torch.zeros(2, 1, 8, 8)) is None


def test_the_features_form_moves_the_peak_but_cannot_scale_the_map_or_reach_the_head():
    torch.manual_seed(0)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, 0, :4, :4] = 1  # the fracture in the top-left cell of a 2 x 2 map
    head = torch.nn.Linear(3, 2)
    def loss_of(acts, form="features", scale=1.0):
        scores = (head(acts.mean((2, 3))) * scale)[:, 1]
        return cam_pointing_loss(acts, scores, masks, form)
    acts = torch.rand(2, 3, 2, 2)
    acts[:, :, 1, 1] += 3  # the peak off the fracture
    acts.requires_grad_()
    # The standardised map does not change with the logits' scale; the graph form falls as they grow (a sharper map).
    assert float(loss_of(acts, scale=10)) == pytest.approx(float(loss_of(acts)), rel=1e-4)
    assert float(loss_of(acts, "graph", scale=10)) != pytest.approx(float(loss_of(acts, "graph")), rel=1e-2)
    # The head gets no gradient from the features form, and does from the graph form.
    loss_of(acts).backward()
    assert head.weight.grad is None and acts.grad is not None and acts.grad.abs().sum() > 0
    loss_of(acts, "graph").backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # Its gradient moves the body's features until the peak is on the fracture.
    body = acts.detach().clone().requires_grad_()
    opt = torch.optim.SGD([body], lr=0.5)
    before = float(loss_of(body))
    for _ in range(50):
        opt.zero_grad(); loss_of(body).backward(); opt.step()
    with torch.no_grad():
        w = head.weight[1]  # Grad-CAM of class 1 of a linear head on average-pooled features: the weights of class 1
        cam = (w[None, :, None, None] * body).sum(1)
    assert float(loss_of(body)) < before and all(int(c.flatten().argmax()) == 0 for c in cam)
    # Only the peak counts: a strong second cell off the fracture costs little once the highest cell is on it.
    def map_loss(values):
        a = torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2).expand(2, 1, 2, 2).clone().requires_grad_()
        return float(cam_pointing_loss(a, a.mean((2, 3)).sum(1), masks, "features"))
    assert map_loss([3.0, 2.0, 0.0, 0.0]) < 0.05 < 0.5 < map_loss([2.0, 3.0, 0.0, 0.0])
    with pytest.raises(Exception, match="form must be one of graph, features"):
        cam_pointing_loss(acts, acts.sum((1, 2, 3)), masks, "sharp")


@pytest.mark.parametrize("size,cells", [(99, 3), (96, 3), (70, 4)])  # whole-pixel peaks, tied pixels, uneven cells
def test_hit_cells_are_the_cells_whose_peak_the_pointing_game_scores_as_a_hit(size, cells):
    rng = np.random.default_rng(size)
    tolerance = 0.04
    masks = torch.zeros(60, 1, size, size)
    for m in masks:  # small boxes anywhere, some near no cell centre
        h, w = rng.integers(1, 12, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        m[0, y:y + h, x:x + w] = 1
    got = hit_cells(masks, (cells, cells), tolerance)
    expected = torch.zeros_like(got)
    for i in range(cells * cells):  # a map peaking on cell i, upsampled as gradcam does, scored by the metric itself
        cam = torch.zeros(1, 1, cells, cells)
        cam.view(-1)[i] = 1.0
        cam = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
        for b, m in enumerate(masks):
            expected[b].view(-1)[i] = _image_scores(cam, m[0].numpy() > 0.5, tolerance * size)[0]
    assert torch.equal(got, expected) and 0 < int(got.flatten(1).any(1).sum()) < len(masks)


def test_the_callback_adds_to_the_training_loss_only(bright_fractures):
    from fracture_fastai.train import radiograph_learner
    table = load_table(bright_fractures)
    dls = radiograph_dataloaders(table, size=32, bs=4, masks=True, device="cpu", cache=False, clahe=False)
    learn = radiograph_learner("cnn", dls)
    cb = CamSupervision(1.0)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=[cb])
    assert len(cb.losses) == 2 and all(np.isfinite(cb.losses))  # two training batches of 4
    assert cb.epoch_means == [pytest.approx(sum(cb.losses) / 2, abs=1e-4)]
    assert not learn.model[0]._forward_hooks  # the hook goes with the fit
    plain = radiograph_learner("cnn", radiograph_dataloaders(table, size=32, bs=4, device="cpu", cache=False))
    with pytest.raises(Exception, match="masks=True"):
        with plain.no_bar(), plain.no_logging(): plain.fit(1, 1e-3, cbs=[CamSupervision(1.0)])


def test_run_with_cam_loss_exports_a_plain_model(bright_fractures, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.run", "--arch", "cnn", "--data", str(bright_fractures),
                          "--size", "32", "--epochs", "1", "--bs", "4", "--lr", "1e-3", "--cam-loss", "0.5",
                          "--cam-form", "features", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["cam_loss"] == 0.5 and config["options"]["cam_form"] == "features"
    assert len(config["training"]["cam_loss_per_epoch"]) == 1 and config["training"]["cam_loss_per_epoch"][0] > 0  # cnn: no frozen epoch
    assert "localisation" in json.loads((out / "metrics.json").read_text())["valid"]
    res = subprocess.run([sys.executable, "-m", "fracture_fastai.predict", str(out),
                          str(bright_fractures / "valid" / "images" / "img1.png")], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "img1.png" in res.stdout, res.stderr[-2000:]

@pytest.mark.parametrize("args,message", [(["--cam-loss", "-1"], "--cam-loss must be 0 (off) or a positive weight"),
                                          (["--cam-form", "features"], "add --cam-loss WEIGHT")])
def test_bad_cam_options_are_one_line_and_exit_2(args, message, tmp_path, cli_exit):
    from fracture_fastai.run import main
    code, err = cli_exit(main, [*args, "--out", str(tmp_path / "never")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "never").exists()
