"Training recipes and callbacks on the tiny synthetic demo (CPU, seconds)."
import pandas as pd
import pytest
import torch

from fracture_fastai.data import load_table, radiograph_dataloaders
from fracture_fastai.errors import UserError
from fracture_fastai.train import fit_warm_restarts, radiograph_learner, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def demo_dls(demo_export):
    return radiograph_dataloaders(load_table(demo_export), size=32, bs=8, device="cpu")


def test_learner_has_adamw_metrics_and_weighted_loss(demo_export):
    dls = radiograph_dataloaders(load_table(demo_export), size=32, bs=8, device="cpu", balance="weights")
    learn = radiograph_learner("cnn", dls, pretrained="none")
    assert [m.name for m in learn.metrics] == ["accuracy", "f1_score"]
    assert learn.loss_func.func.weight is not None and learn.loss_func.func.weight.shape == (6,)
    assert learn.fp16 is False  # CPU: fp32
    plain = radiograph_learner("cnn", radiograph_dataloaders(load_table(demo_export), size=32, bs=8, device="cpu"))
    assert plain.loss_func.func.weight is None
    smooth = radiograph_learner("cnn", dls, label_smoothing=0.1)
    assert type(smooth.loss_func.func).__name__ == "LabelSmoothingCrossEntropy" and smooth.loss_func.func.eps == 0.1
    assert smooth.loss_func.func.weight is not None  # class weights and smoothing combine
    with pytest.raises(UserError, match="label_smoothing"):
        radiograph_learner("cnn", dls, label_smoothing=1.5)


def test_warm_restarts_restart_the_learning_rate(demo_dls):
    learn = radiograph_learner("cnn", demo_dls)
    with learn.no_bar(), learn.no_logging():
        fit_warm_restarts(learn, epochs=4, lr_max=1e-3, cycle_len=2)
    lrs = learn.recorder.lrs
    per_epoch = len(lrs) // 4
    assert lrs[0] == pytest.approx(1e-3) and lrs[2 * per_epoch] == pytest.approx(1e-3)  # the restart
    assert lrs[2 * per_epoch - 1] < 1e-4  # annealed towards 0 at the end of the first cycle
    with pytest.raises(UserError, match="cycle_len"):
        fit_warm_restarts(learn, 2, 1e-3, cycle_len=0)


def test_warm_restarts_with_growing_cycles_cover_exactly_the_epochs(demo_dls):
    learn = radiograph_learner("cnn", demo_dls)
    with learn.no_bar(), learn.no_logging():
        fit_warm_restarts(learn, epochs=3, lr_max=1e-3, cycle_len=1, cycle_mult=2)
    assert len(learn.recorder.values) == 3


@pytest.mark.parametrize("schedule", ["one_cycle", "sgdr"])
def test_train_writes_history_and_lr_find(demo_dls, tmp_path, schedule, capsys):
    learn = radiograph_learner("cnn", demo_dls)
    summary = train(learn, epochs=2, schedule=schedule, out_dir=tmp_path, lr_find_iters=8)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.epoch) == [0, 1] and set(history.phase) == {"train"}
    assert {"train_loss", "valid_loss", "accuracy", "f1_score"} <= set(history.columns)
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "models" / "best.pth").exists()
    assert summary["epochs_run"] == 2 and 1e-5 <= summary["lr"] <= 1e-2
    assert summary["best_epoch"] == int(history.valid_loss.idxmin())
    out = capsys.readouterr().out
    # pytest's capture is not a terminal: plain lines, one per epoch, none from lr_find's sweep
    assert [l for l in out.splitlines() if l.startswith("epoch ")] == [l for l in out.splitlines() if "/2:" in l]
    assert len([l for l in out.splitlines() if l.startswith("epoch ")]) == 2


def test_pretrained_learner_trains_frozen_then_unfrozen(demo_dls, tmp_path):
    learn = radiograph_learner("tf_efficientnet_lite0", demo_dls, pretrained="auto")
    assert learn.weights_info.pretrained
    summary = train(learn, epochs=1, freeze_epochs=1, lr=1e-3, out_dir=tmp_path, lr_find_iters=6)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.phase) == ["frozen", "unfrozen"] and summary["lr"] == 1e-3
    assert all(p.requires_grad for p in learn.model.parameters())  # unfrozen at the end


def test_early_stopping(demo_dls, tmp_path):
    learn = radiograph_learner("cnn", demo_dls)
    # a learning rate this small never improves valid_loss by fastai's margin for long: patience 1 stops it
    summary = train(learn, epochs=6, lr=1e-7, patience=1, monitor="accuracy", out_dir=tmp_path, lr_find_iters=6)
    assert summary["epochs_run"] < 6 and summary["early_stopped"]


def test_bad_options_are_user_errors(demo_dls, tmp_path):
    learn = radiograph_learner("cnn", demo_dls)
    for kwargs, msg in [(dict(schedule="cosine"), "schedule must be one of"), (dict(monitor="f1"), "monitor must be"),
                        (dict(epochs=0), "epochs must be")]:
        with pytest.raises(UserError, match=msg):
            train(learn, out_dir=tmp_path, **kwargs)
