"Metrics against analytically known values; plots and evaluation on a tiny Learner trained on synthetic images."
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fracture_fastai.errors import UserError
from fracture_fastai.evaluate import (accuracy_ci, classification_metrics, evaluate_learner, interpretation_plots,
                                      plot_confusion_matrix, plot_curves, plot_top_losses, write_json)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLOURS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def _write_images(folder, n, rng, size=32):
    "n noisy solid-colour PNGs per class under folder/<class>/."
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(folder / name / f"{name}_{i}.png")


def _tiny_learner(root):
    "A tiny CNN trained one epoch on root/train, validated on root/valid; labels from the parent folder."
    from fastai.vision.all import (Adam, CategoryBlock, CrossEntropyLossFlat, DataBlock, GrandparentSplitter,
                                   ImageBlock, Learner, Resize, accuracy, get_image_files, parent_label, set_seed)
    set_seed(0)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=GrandparentSplitter(train_name="train", valid_name="valid"), item_tfms=Resize(32))
    dls = block.dataloaders(root, bs=8, num_workers=0, device="cpu")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, len(dls.vocab)))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    return learn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "(learn, root): the tiny Learner and its image tree with train (6/class), valid (2/class), test (3/class)."
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("valid", 2), ("test", 3)):
        _write_images(root / split, n, rng)
    return _tiny_learner(root), root


# --- accuracy_ci -------------------------------------------------------------------------------------------

def test_accuracy_ci_known_wilson_values():
    assert accuracy_ci(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 0/n and n/n: the Wilson bound on the open side is z^2 / (n + z^2), closed form.
    z2 = 1.959963984540054 ** 2
    assert accuracy_ci(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert accuracy_ci(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    lo, hi = accuracy_ci(0, 83)
    assert lo == 0.0 and hi < 0.05
    lo, hi = accuracy_ci(83, 83)
    assert hi == 1.0 and lo > 0.95


def test_accuracy_ci_level_and_edges():
    lo95, hi95 = accuracy_ci(50, 83)
    lo99, hi99 = accuracy_ci(50, 83, level=0.99)
    assert lo99 < lo95 < 50 / 83 < hi95 < hi99
    assert accuracy_ci(0, 0) == (0.0, 1.0)
    for bad in [(11, 10), (-1, 10), (5, 10, 1.0)]:
        with pytest.raises(ValueError):
            accuracy_ci(*bad)


# --- classification_metrics --------------------------------------------------------------------------------

# rows actual, cols predicted: a [2,1,0], b [1,3,0], c [0,1,0] -> c is never predicted (precision 0/0).
TARGETS = [0, 0, 0, 1, 1, 1, 1, 2]
PREDS = [0, 0, 1, 0, 1, 1, 1, 1]


def test_classification_metrics_hand_made_confusion():
    m = classification_metrics(np.array(TARGETS), torch.tensor(PREDS), ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 3, 0], [0, 1, 0]]
    assert m["n"] == 8 and m["accuracy"] == pytest.approx(5 / 8)
    assert m["accuracy_ci95"] == pytest.approx(list(accuracy_ci(5, 8)))
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3, 4))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert m["macro_f1"] == pytest.approx(4 / 9)
    assert m["classes"] == ["a", "b", "c"]
    assert json.loads(json.dumps(m)) == m  # plain Python types only


def test_classification_metrics_matches_sklearn_and_skips_absent_class():
    from sklearn.metrics import f1_score
    m = classification_metrics(TARGETS, PREDS, ["a", "b", "c", "d"])  # d: neither actual nor predicted
    assert m["macro_f1"] == pytest.approx(f1_score(TARGETS, PREDS, average="macro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(4 / 9)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert np.array(m["confusion_matrix"]).shape == (4, 4)


def test_classification_metrics_zero_division_and_errors():
    m = classification_metrics([0, 0], [1, 1], ["a", "b"])  # nothing right: every ratio is 0/x or x/0
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [], ["a"])
    with pytest.raises(ValueError, match="length"):
        classification_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 2], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="ints"):
        classification_metrics([0.0, 1.0], [0, 1], ["a", "b"])


# --- evaluate_learner and plots on a tiny Learner ----------------------------------------------------------

def test_evaluate_learner_valid_and_test(trained):
    from fastai.vision.all import get_image_files
    learn, root = trained
    m, probs, targets = evaluate_learner(learn)
    assert {"n", "accuracy", "accuracy_ci95", "macro_f1", "per_class", "confusion_matrix", "classes", "loss",
            "tta"} <= set(m)
    assert m["n"] == 6 and m["classes"] == ["blue", "green", "red"] and m["tta"] == "none"
    assert isinstance(m["loss"], float) and m["loss"] > 0
    assert probs.shape == (6, 3) and torch.allclose(probs.sum(1), torch.ones(6), atol=1e-5)
    assert sorted(targets.tolist()) == [0, 0, 1, 1, 2, 2]
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == targets).float().mean().item())
    json.dumps(m)

    test_dl = learn.dls.test_dl(get_image_files(root / "test"), with_labels=True)
    m, probs, _ = evaluate_learner(learn, dl=test_dl)
    assert m["n"] == 9 and sum(c["support"] for c in m["per_class"].values()) == 9
    m, probs, _ = evaluate_learner(learn, dl=test_dl, tta=True)  # True: fastai's own tta
    assert m["tta"] == "aug" and m["loss"] is None and probs.shape == (9, 3)


def test_flip_tta_averages_each_image_and_its_mirror(trained):
    from fastai.vision.all import get_image_files
    learn, root = trained
    test_dl = learn.dls.test_dl(get_image_files(root / "test"), with_labels=True)
    m, probs, targets = evaluate_learner(learn, dl=test_dl, tta="flip")
    xb = torch.cat([b[0] for b in test_dl])
    learn.model.eval()
    with torch.no_grad():
        expected = (learn.model(xb).softmax(1) + learn.model(xb.flip(-1)).softmax(1)) / 2
    assert m["tta"] == "flip" and torch.allclose(probs, expected, atol=1e-5)
    with pytest.raises(ValueError, match="tta must be one of"):
        evaluate_learner(learn, dl=test_dl, tta="rotate")


def test_augmented_tta_is_seeded(trained):
    import random
    from fastai.vision.all import get_image_files
    learn, root = trained
    test_dl = learn.dls.test_dl(get_image_files(root / "test"), with_labels=True)
    random.seed(1); torch.manual_seed(1)
    first = evaluate_learner(learn, dl=test_dl, tta="aug")[1]
    after = (random.random(), torch.rand(1))  # the caller's generators are left where they were
    random.seed(1); torch.manual_seed(1)
    random.random(); torch.rand(1)  # whatever state the caller is in, the score is the same
    second = evaluate_learner(learn, dl=test_dl, tta="aug")[1]
    assert torch.equal(first, second)
    random.seed(1); torch.manual_seed(1)
    evaluate_learner(learn, dl=test_dl, tta="aug")
    assert (random.random(), torch.rand(1)) == after


def test_evaluate_learner_unlabelled_dl_is_a_user_error(trained):
    from fastai.vision.all import get_image_files
    learn, root = trained
    with pytest.raises(UserError, match="with_labels=True"):
        evaluate_learner(learn, dl=learn.dls.test_dl(get_image_files(root / "test")))


def test_interpretation_plots(trained, tmp_path):
    from fastai.vision.all import get_image_files
    learn, root = trained
    paths = interpretation_plots(learn, tmp_path / "run")
    assert [p.name for p in paths] == ["confusion_matrix.png", "top_losses.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
    test_dl = learn.dls.test_dl(get_image_files(root / "test"), with_labels=True)
    paths = interpretation_plots(learn, tmp_path / "run", dl=test_dl, k=4, prefix="test_")
    assert [p.name for p in paths] == ["test_confusion_matrix.png", "test_top_losses.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_interpretation_from_evaluated_probabilities_makes_no_pass(trained, tmp_path, monkeypatch):
    from fracture_fastai.evaluate import interpretation
    learn, _ = trained
    _, probs, targets = evaluate_learner(learn, tta="flip")
    fastai_own = interpretation(learn)
    evaluated = interpretation(learn, probs=probs, targets=targets)
    assert (evaluated.confusion_matrix() == fastai_own.confusion_matrix()).all()
    nll = -torch.log(probs[torch.arange(len(targets)), targets])
    assert torch.allclose(evaluated.losses, nll, atol=1e-5)
    calls = []
    real = learn.get_preds
    monkeypatch.setattr(learn, "get_preds", lambda *a, **k: calls.append(len(k["dl"].dataset)) or real(*a, **k))
    paths = interpretation_plots(learn, tmp_path / "run", k=4, probs=probs, targets=targets)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
    assert calls == [4]  # only the four top-loss images are read again, to draw them
    with pytest.raises(ValueError, match="probabilities"):
        interpretation(learn, probs=probs[:2], targets=targets[:2])
    with pytest.raises(ValueError, match="both"):
        interpretation(learn, probs=probs)


def test_single_plots_and_k_beyond_the_data(trained, tmp_path):
    import matplotlib.pyplot as plt
    learn, _ = trained
    assert plot_confusion_matrix(learn, tmp_path / "cm.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_top_losses(learn, tmp_path / "tl.png", k=50).read_bytes()[:8] == PNG_MAGIC  # only 6 valid images
    assert plt.get_fignums() == []  # every figure closed


def test_plot_curves_with_and_without_accuracy(tmp_path):
    history = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [1.2, 0.8, 0.5], "valid_loss": [1.1, 0.9, 0.7],
                            "accuracy": [0.4, 0.6, 0.8]})
    two = plot_curves(history, tmp_path / "curves.png")
    one = plot_curves(history.drop(columns="accuracy"), tmp_path / "loss.png")
    for p in (two, one):
        assert p.read_bytes()[:8] == PNG_MAGIC
    with Image.open(two) as a, Image.open(one) as b:
        assert a.width > 1.5 * b.width  # two panels side by side
    nan_valid = history.assign(valid_loss=[None, None, None], accuracy=["0.4", "0.6", "0.8"])
    assert plot_curves(nan_valid, tmp_path / "nan.png").exists()
    with pytest.raises(ValueError, match="valid_loss"):
        plot_curves(history.drop(columns="valid_loss"), tmp_path / "bad.png")


def test_write_json_converts_numpy(tmp_path):
    p = write_json({"n": np.int64(3), "acc": np.float32(0.5), "cm": np.eye(2, dtype=int), "path": tmp_path},
                   tmp_path / "sub" / "metrics.json")
    assert json.loads(p.read_text()) == {"n": 3, "acc": 0.5, "cm": [[1, 0], [0, 1]], "path": str(tmp_path)}


def test_predict_probs_fast_path_matches_get_preds(demo_export):
    "predict's own loop (the RadiographLoader called directly, no identity warps) gives fastai's probabilities."
    from fracture_fastai.data import load_table, radiograph_dataloaders
    from fracture_fastai.evaluate import predict_probs
    from fracture_fastai.train import radiograph_learner
    table = load_table(demo_export)
    dls = radiograph_dataloaders(table, size=32, bs=4, device="cpu")
    learn = radiograph_learner("cnn", dls)
    valid = table.df[table.df.split == "valid"].reset_index(drop=True)
    files_dl = learn.dls.test_dl(list(valid.file), bs=3)  # 3: a last partial batch too
    expected = learn.get_preds(dl=files_dl)[0]
    probs, targets = predict_probs(learn, files_dl)
    assert targets is None and probs.shape == expected.shape
    assert torch.allclose(probs, expected, atol=1e-4)
    labelled = learn.dls.test_dl(valid, with_labels=True)  # a table with labels: fastai's own iteration
    probs, targets = predict_probs(learn, labelled)
    assert torch.allclose(probs, expected, atol=1e-4) and len(targets) == len(valid)


def test_a_notebook_keeps_its_matplotlib_backend(demo_export, tmp_path):
    "Inside Jupyter (ipykernel loaded) the package leaves the notebook's backend alone, also when it plots."
    import subprocess
    import sys
    code = ("import sys, types, matplotlib; sys.modules['ipykernel'] = types.ModuleType('ipykernel'); "
            "matplotlib.use('svg'); import fracture_fastai.evaluate, fracture_fastai.cam, fracture_fastai.train; "
            "from fracture_fastai.data import load_table, radiograph_dataloaders, save_batch; "
            f"save_batch(radiograph_dataloaders(load_table({str(demo_export)!r}), size=32, bs=4, device='cpu'), "
            f"{str(tmp_path / 'b.png')!r}); print(matplotlib.get_backend())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "svg", res.stderr[-500:]
