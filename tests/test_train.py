"Training recipes and callbacks on the tiny synthetic demo (CPU, seconds)."
import pandas as pd
import pytest
import torch

from fracture_fastai.data import load_table, radiograph_dataloaders
from fracture_fastai.errors import UserError
from fracture_fastai.models import build_model, early_layers
from fracture_fastai.train import (CPUBFloat16, FreezeEarly, ProgressiveResize, auroc_metric, export_learner,
                                   fit_warm_restarts, load_checkpoint, precision_of, progressive_sizes, radiograph_learner,
                                   resolve_precision, train)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def demo_dls(demo_export):
    return radiograph_dataloaders(load_table(demo_export), size=32, bs=8, device="cpu")


def test_learner_has_adamw_metrics_and_weighted_loss(demo_export):
    dls = radiograph_dataloaders(load_table(demo_export), size=32, bs=8, device="cpu")
    learn = radiograph_learner("cnn", dls, pretrained="none", balance="weights")
    assert [m.name for m in learn.metrics] == ["accuracy", "f1_score"]
    assert learn.loss_func.func.weight is not None and learn.loss_func.func.weight.shape == (6,)
    assert precision_of(learn) == "fp32"  # auto on the CPU
    plain = radiograph_learner("cnn", dls)
    assert plain.loss_func.func.weight is None
    smooth = radiograph_learner("cnn", dls, label_smoothing=0.1, balance="weights")
    assert type(smooth.loss_func.func).__name__ == "LabelSmoothingCrossEntropy" and smooth.loss_func.func.eps == 0.1
    assert smooth.loss_func.func.weight is not None  # class weights and smoothing combine
    with pytest.raises(UserError, match="label_smoothing"):
        radiograph_learner("cnn", dls, label_smoothing=1.5)
    with pytest.raises(UserError, match="balance must be one of"):
        radiograph_learner("cnn", dls, balance="wieghts")


def test_auroc_metric_is_sklearns_for_either_class_and_nan_for_one():
    from types import SimpleNamespace
    from fastai.torch_core import to_detach
    from sklearn.metrics import roc_auc_score
    torch.manual_seed(0)
    logits, targets = torch.randn(40, 2), torch.randint(0, 2, (40,))
    metric = auroc_metric()
    metric.reset()
    for batch in (slice(0, 25), slice(25, 40)):  # accumulated over batches, as fastai's validation feeds it
        metric.accumulate(SimpleNamespace(pred=logits[batch], y=targets[batch], to_detach=to_detach))
    probs = logits.softmax(1)
    assert metric.name == "auroc"
    assert metric.value == pytest.approx(roc_auc_score(targets == 1, probs[:, 1]))
    assert metric.value == pytest.approx(roc_auc_score(targets == 0, probs[:, 0]))  # the same with class 0 positive
    metric.reset()
    metric.accumulate(SimpleNamespace(pred=logits[:5], y=torch.zeros(5, dtype=torch.long), to_detach=to_detach))
    assert metric.value != metric.value  # NaN: one class cannot be ranked; an error would end the training


def test_two_class_learners_record_auroc_and_can_keep_its_best_epoch(demo_export, tmp_path):
    table = load_table(demo_export)
    table.df = table.df[table.df.label.isin(["elbow", "wrist"])].reset_index(drop=True)
    dls = radiograph_dataloaders(table, size=32, bs=8, device="cpu")
    learn = radiograph_learner("cnn", dls)
    assert [m.name for m in learn.metrics] == ["accuracy", "f1_score", "auroc"]
    summary = train(learn, epochs=3, lr=3e-3, monitor="auroc", patience=0, out_dir=tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history.auroc.between(0, 1).all()
    assert summary["best_epoch"] == int(history.auroc.idxmax()) and summary["best"] == {"auroc": history.auroc.max()}
    # the kept weights are that epoch's: validating them again gives its AUROC
    assert learn.validate()[3] == pytest.approx(history.auroc.max(), abs=1e-6)


def test_monitor_none_keeps_the_last_epoch(demo_dls, tmp_path):
    learn = radiograph_learner("cnn", demo_dls)
    # a rate this high makes the validation loss jump about: the best epoch is rarely the last
    summary = train(learn, epochs=3, lr=0.05, monitor="none", patience=1, out_dir=tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert len(history) == 3 and summary["best_epoch"] == 2 and not summary["early_stopped"]  # patience: no monitor
    assert summary["best"] == {"kept": "last", "valid_loss": history.valid_loss.iloc[-1]}
    assert learn.validate()[0] == pytest.approx(history.valid_loss.iloc[-1], rel=1e-5)  # the last epoch's weights
    saved = torch.load(tmp_path / "models" / "best.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in learn.model.state_dict().items())  # and what "best" loads
    # resumed after its last epoch (killed before the evaluation), the run keeps that epoch: the checkpoint's weights
    (tmp_path / "models" / "best.pth").unlink()
    again = radiograph_learner("cnn", demo_dls)
    train(again, epochs=3, lr=0.05, monitor="none", out_dir=tmp_path, resume=load_checkpoint(tmp_path))
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in learn.model.state_dict().items())


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
    assert learn.pretrained and learn.weights_info.pretrained
    summary = train(learn, epochs=1, freeze_epochs=1, lr=1e-3, out_dir=tmp_path, lr_find_iters=6)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.phase) == ["frozen", "unfrozen"] and summary["lr"] == 1e-3
    assert all(p.requires_grad for p in learn.model.parameters())  # unfrozen at the end


def _owners(module): return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def test_early_layers_are_the_high_resolution_front():
    model = build_model("resnet18", 2)
    body = model[0]  # conv1 (1/2), bn1, relu, maxpool (1/4), layer1 (1/4), layer2 (1/8), ...
    bn = body[1]
    stats, mode = bn.running_mean.clone(), [m.training for m in model.modules()]
    assert early_layers(model, 2) == [body[0], body[1]]
    assert early_layers(model, 4) == [body[0], body[1], *_owners(body[4])]
    assert early_layers(model, 8) == [body[0], body[1], *_owners(body[4]), *_owners(body[5])]
    assert torch.equal(bn.running_mean, stats) and [m.training for m in model.modules()] == mode  # the probe left no trace
    net = build_model("tf_efficientnet_lite0", 2)[0].model
    stage2 = net.blocks[2][0]  # its expansion runs at 1/4, its depthwise convolution at 1/8
    assert early_layers(build_model("tf_efficientnet_lite0", 2).to(memory_format=torch.channels_last), 4) != []
    assert early_layers(net, 4) == [net.conv_stem, net.bn1, *_owners(net.blocks[0]), *_owners(net.blocks[1]),
                                    stage2.conv_pw, stage2.bn1]


def test_freeze_early_keeps_the_front_through_both_phases(demo_dls, tmp_path):
    learn = radiograph_learner("tf_efficientnet_lite0", demo_dls, pretrained="auto")
    keep = FreezeEarly(4)
    learn.add_cb(keep)
    front = early_layers(learn.model, 4)
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    in_front = {id(p) for m in front for p in m.parameters(recurse=False)}
    train(learn, epochs=1, freeze_epochs=1, lr=1e-2, out_dir=tmp_path, patience=0)
    changed = {n for n, p in learn.model.named_parameters() if not torch.equal(p, before[n])}
    front_names = {n for n, p in learn.model.named_parameters() if id(p) in in_front}
    assert any(n.endswith("bn1.weight") for n in front_names) and len(front_names) > 20
    assert not changed & front_names  # batch norms' scales and shifts included, in the unfrozen epoch too
    body = {n for n in before if n.startswith("0.") and n not in front_names}
    assert len(changed & body) > len(body) / 2  # the rest of the body did train
    assert keep.summary() == {"stride": 4, "modules": len(front),
                              "params": sum(p.numel() for m in front for p in m.parameters(recurse=False))}
    scratch = radiograph_learner("cnn", demo_dls, cbs=[FreezeEarly(4)])
    with pytest.raises(UserError, match="keeps pretrained weights"):
        with scratch.no_bar(), scratch.no_logging(): scratch.fit(1)
    with pytest.raises(UserError, match="at least 2"):
        FreezeEarly(1)


def test_early_stopping(demo_dls, tmp_path):
    learn = radiograph_learner("cnn", demo_dls)
    # a learning rate this small never improves valid_loss by fastai's margin for long: patience 1 stops it
    summary = train(learn, epochs=6, lr=1e-7, patience=1, monitor="accuracy", out_dir=tmp_path, lr_find_iters=6)
    assert summary["epochs_run"] < 6 and summary["early_stopped"]


def test_bad_options_are_user_errors(demo_dls, tmp_path):
    learn = radiograph_learner("cnn", demo_dls)
    for kwargs, msg in [(dict(schedule="cosine"), "schedule must be one of"), (dict(monitor="f1"), "monitor must be"),
                        (dict(epochs=0), "epochs must be"),
                        (dict(monitor="auroc"), "auroc is for two classes")]:  # six classes: no auroc metric
        with pytest.raises(UserError, match=msg):
            train(learn, out_dir=tmp_path, **kwargs)


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UserError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


def test_bf16_on_the_cpu_trains_and_exports_in_fp32(demo_dls, tmp_path):
    from fastai.callback.channelslast import ChannelsLast
    from fastai.callback.core import Callback

    class _Dtypes(Callback):
        order = 20  # after CPUBFloat16
        def after_pred(self): self.seen = (torch.is_autocast_cpu_enabled(), self.pred.dtype)

    learn = radiograph_learner("cnn", demo_dls, precision="bf16", path=tmp_path)
    assert precision_of(learn) == "bf16" and any(isinstance(cb, CPUBFloat16) for cb in learn.cbs)
    spy = _Dtypes()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=spy)
    assert spy.seen == (True, torch.float32)  # the model ran under autocast; loss and metrics see fp32
    assert not torch.is_autocast_cpu_enabled()  # and autocast is off again after the fit
    assert next(learn.model.parameters()).dtype == torch.float32  # master weights stay fp32
    export = export_learner(learn, tmp_path / "export.pkl")
    assert not list(tmp_path.glob(".export.pkl.tmp"))
    from fastai.learner import load_learner
    loaded = load_learner(export, cpu=True)
    assert not any(isinstance(cb, (CPUBFloat16, ChannelsLast)) for cb in loaded.cbs)
    assert any(isinstance(cb, CPUBFloat16) for cb in learn.cbs)  # the training Learner keeps its callbacks


def test_progressive_sizes():
    assert progressive_sizes(10, 128, 224) == [128, 128, 128, 160, 160, 160, 192, 192, 192, 224]
    assert progressive_sizes(3, 128, 224) == [128, 160, 224]
    assert progressive_sizes(4, 224, 224) == [224] * 4 and progressive_sizes(1, 128, 224) == [224]


def test_progressive_resize_grows_the_input(demo_export, tmp_path):
    from fastai.callback.core import Callback
    dls = radiograph_dataloaders(load_table(demo_export), size=64, bs=4, device="cpu")

    class _Shapes(Callback):
        def before_fit(self): self.shapes = []
        def after_pred(self): self.shapes.append((self.training, self.epoch, self.xb[0].shape[-1]))

    spy = _Shapes()
    learn = radiograph_learner("cnn", dls, path=tmp_path)
    summary = train(learn, epochs=2, lr=1e-3, out_dir=tmp_path, lr_find_iters=4, min_size=32)
    assert summary["sizes"] == [32, 64]
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-3, cbs=[ProgressiveResize([32, 64]), spy])
    assert {s for _, e, s in spy.shapes if e == 0} == {32} and {s for _, e, s in spy.shapes if e == 1} == {64}
    assert {t for t, _, _ in spy.shapes} == {True, False}  # training and validation batches alike
    xb, _ = dls.train.one_batch()
    assert xb.shape[-1] == 64  # the augmentation is back at full size after the fit


def test_learning_rate_default_and_find(demo_dls, tmp_path):
    learn = radiograph_learner("tf_efficientnet_lite0", demo_dls, pretrained="auto")
    summary = train(learn, epochs=1, freeze_epochs=0, out_dir=tmp_path / "a")
    # pretrained: fastai's fine_tune rate, no lr_find (nor its plot)
    assert summary["lr"] == 2e-3 and summary["lr_find_suggestion"] is None and not (tmp_path / "a" / "lr_find.png").exists()
    learn = radiograph_learner("tf_efficientnet_lite0", demo_dls, pretrained="auto")
    summary = train(learn, epochs=1, freeze_epochs=0, lr="find", out_dir=tmp_path / "b", lr_find_iters=5)
    assert summary["lr"] == summary["lr_find_suggestion"] and (tmp_path / "b" / "lr_find.png").exists()
    with pytest.raises(UserError, match="lr must be a positive number"):
        train(radiograph_learner("cnn", demo_dls), epochs=1, lr=-1.0, out_dir=tmp_path / "c")


def test_progressive_keeps_the_best_full_size_epoch(demo_export, tmp_path):
    dls = radiograph_dataloaders(load_table(demo_export), size=64, bs=4, device="cpu")
    learn = radiograph_learner("cnn", dls, path=tmp_path)
    summary = train(learn, epochs=3, lr=1e-3, out_dir=tmp_path, min_size=32)
    assert summary["sizes"] == [32, 32, 64] and summary["best_epoch"] == 2  # the only epoch at full size
    val_loss = learn.validate()[0]
    assert val_loss == pytest.approx(pd.read_csv(tmp_path / "history.csv").valid_loss.iloc[2], rel=1e-4)


def test_the_model_gets_plain_tensors(demo_dls):
    from fastai.callback.core import Callback

    class _Types(Callback):
        order = 2  # after PlainInputs
        def before_batch(self): self.seen = type(self.xb[0])
    learn = radiograph_learner("cnn", demo_dls)
    spy = _Types()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=spy)
    assert type(demo_dls.one_batch()[0]).__name__ == "TensorImage" and spy.seen is torch.Tensor
    preds, targets = learn.get_preds()
    assert preds.shape == (len(demo_dls.valid_ds), demo_dls.c)


def test_snapshots_are_the_weights_at_each_cycle_s_end(demo_dls, tmp_path):
    learn = radiograph_learner("cnn", demo_dls)
    summary = train(learn, epochs=4, lr=1e-3, schedule="sgdr", cycle_len=1, cycle_mult=2, out_dir=tmp_path,
                    snapshots=True)
    assert summary["snapshots"] == ["snapshot0", "snapshot2", "snapshot3"]  # cycles of 1, 2, then the 1 left
    saved = [torch.load(tmp_path / "models" / f"{n}.pth") for n in summary["snapshots"]]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # trained on between the two
    with pytest.raises(UserError, match="add --schedule sgdr"):
        train(learn, epochs=2, schedule="one_cycle", out_dir=tmp_path, snapshots=True)
