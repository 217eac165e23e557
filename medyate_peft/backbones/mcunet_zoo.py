"""The papers' fp32 MCU networks from mit-han-lab's mcunet model zoo: BatchNorm, feature-mix layer, dropout.

TraDy and MeDyate fine-tune these (spec section 7), not the int8 graphs of tiny-training that
``mcu.py`` dequantises (BN folded, no feature-mix layer). Module names follow the zoo's
``ProxylessNASNets`` (``first_conv.conv``, ``blocks.3.mobile_inverted_conv.depth_conv.bn``,
``feature_mix_layer.conv``, ``classifier.linear``), so its ``.pth`` state dicts load unchanged.

The architectures are written here in the zoo's own JSON config format, so they build offline; the
ImageNet weights (and the zoo's config, which then takes precedence) come from the zoo's URLs or
from a folder holding ``<net_name>.json`` and ``<net_name>.pth``. The zoo code itself (PyPI
``mcunet``) is not needed.
"""

from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .mcu import _fresh_head

ZOO_URL = "https://hanlab.mit.edu/projects/tinyml/mcunet/release/"
# Our name -> the zoo's file stem (the networks are resolution-agnostic; the papers train at 128x128).
ZOO_NETS = {
    "mcunet-5fps": "mcunet-5fps_imagenet",  # MCUNet-in1
    "mbv2-w0.35": "mbv2-w0.35-r144_imagenet",
    "proxyless-w0.3": "proxyless-w0.3-r176_imagenet",
}
ZOO_DIR_ENV = "MEDYATE_MCUNET_ZOO_DIR"
IMAGENET_CLASSES = 1000

# Per block: (expanded channels, output channels, depthwise kernel, stride); input = previous output.
# A block has the residual add where stride is 1 and input and output channels match.
_FIRST_CONV = 16
_BLOCKS: dict[str, list[tuple[int, int, int, int]]] = {
    "mbv2-w0.35": [
        (16, 8, 3, 1), (48, 8, 3, 2), (48, 8, 3, 1), (48, 16, 3, 2), (96, 16, 3, 1), (96, 16, 3, 1),
        (96, 24, 3, 2), (144, 24, 3, 1), (144, 24, 3, 1), (144, 24, 3, 1), (144, 32, 3, 1), (192, 32, 3, 1),
        (192, 32, 3, 1), (192, 56, 3, 2), (336, 56, 3, 1), (336, 56, 3, 1), (336, 112, 3, 1),
    ],
    "proxyless-w0.3": [
        (16, 8, 3, 1), (24, 16, 5, 2), (48, 16, 3, 1), (48, 16, 7, 2), (48, 16, 3, 1), (48, 16, 5, 1),
        (48, 16, 5, 1), (96, 24, 7, 2), (72, 24, 5, 1), (72, 24, 5, 1), (72, 24, 5, 1), (144, 32, 5, 1),
        (96, 32, 5, 1), (96, 32, 5, 1), (96, 32, 5, 1), (192, 64, 7, 2), (384, 64, 7, 1), (192, 64, 7, 1),
        (192, 64, 7, 1), (384, 96, 7, 1),
    ],
    "mcunet-5fps": [
        (16, 8, 3, 1), (32, 16, 3, 2), (48, 16, 3, 1), (48, 24, 7, 2), (120, 24, 3, 1), (120, 40, 3, 2),
        (160, 40, 7, 1), (160, 48, 5, 1), (144, 48, 3, 1), (192, 48, 3, 1), (240, 96, 7, 2), (384, 96, 5, 1),
        (384, 96, 5, 1), (576, 160, 3, 1),
    ],
}
_FEATURE_MIX = {"mbv2-w0.35": 448, "proxyless-w0.3": 384, "mcunet-5fps": None}


def _conv_layer(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> dict[str, Any]:
    return {"name": "ConvLayer", "in_channels": in_channels, "out_channels": out_channels,
            "kernel_size": kernel_size, "stride": stride, "use_bn": True, "act_func": "relu6"}


def zoo_config(name: str, num_classes: int = IMAGENET_CLASSES) -> dict[str, Any]:
    """The network as the zoo's ``ProxylessNASNets`` JSON config describes it."""
    if name not in ZOO_NETS:
        raise ValueError(f"unknown mcunet zoo network {name!r}; choose one of {sorted(ZOO_NETS)}")
    blocks, channels = [], _FIRST_CONV
    for mid, out, kernel, stride in _BLOCKS[name]:
        conv = {"name": "MBInvertedConvLayer", "in_channels": channels, "out_channels": out, "kernel_size": kernel,
                "stride": stride, "expand_ratio": mid / channels, "mid_channels": mid, "act_func": "relu6"}
        shortcut = {"name": "IdentityLayer", "in_channels": out, "out_channels": out} if stride == 1 and channels == out \
            else None
        blocks.append({"name": "MobileInvertedResidualBlock", "mobile_inverted_conv": conv, "shortcut": shortcut})
        channels = out
    mix = _FEATURE_MIX[name]
    return {
        "name": "ProxylessNASNets",
        "bn": {"momentum": 0.1, "eps": 1e-3},
        "first_conv": _conv_layer(3, _FIRST_CONV, 3, 2),
        "blocks": blocks,
        "feature_mix_layer": None if mix is None else _conv_layer(channels, mix, 1, 1),
        "classifier": {"name": "LinearLayer", "in_features": mix or channels, "out_features": num_classes,
                       "bias": True, "dropout_rate": 0.2},
    }


class ConvBNAct(nn.Sequential):
    """conv (no bias), BatchNorm, optional ReLU6: the zoo's ConvLayer and the parts of its MBConv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.act = nn.ReLU6()


class MBInvertedConv(nn.Module):
    """Optional 1x1 expansion, depthwise conv, 1x1 linear projection (the zoo's MBInvertedConvLayer)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        if config.get("use_se"):
            raise ValueError("squeeze-excitation blocks are not supported")
        if config.get("act_func", "relu6") != "relu6":
            raise ValueError(f"activation {config['act_func']!r} is not supported (relu6 only)")
        cin, cout, kernel = config["in_channels"], config["out_channels"], config["kernel_size"]
        mid = config.get("mid_channels") or round(cin * config["expand_ratio"])
        self.inverted_bottleneck = None if config["expand_ratio"] == 1 else ConvBNAct(cin, mid, 1)
        self.depth_conv = ConvBNAct(mid, mid, kernel, config["stride"], groups=mid)
        self.point_linear = ConvBNAct(mid, cout, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MobileInvertedResidualBlock(nn.Module):
    """An MBConv with an optional identity shortcut; a "ZeroLayer" block (skipped by the search) is identity."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        conv = config.get("mobile_inverted_conv")
        skipped = conv is None or conv.get("name") == "ZeroLayer"
        self.mobile_inverted_conv = None if skipped else MBInvertedConv(conv)
        shortcut = config.get("shortcut")
        self.residual = shortcut is not None and shortcut.get("name") == "IdentityLayer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mobile_inverted_conv is None:
            return x
        y = self.mobile_inverted_conv(x)
        return x + y if self.residual else y


class LinearClassifier(nn.Module):
    """Dropout, then the linear layer (the zoo's LinearLayer)."""

    def __init__(self, in_features: int, out_features: int, dropout_rate: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


class ZooNetwork(nn.Module):
    """First conv, MBConv blocks, optional feature-mix 1x1 conv, global average pool, classifier."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        first = config["first_conv"]
        self.first_conv = ConvBNAct(first["in_channels"], first["out_channels"], first["kernel_size"], first["stride"])
        self.blocks = nn.ModuleList(MobileInvertedResidualBlock(b) for b in config["blocks"])
        mix = config.get("feature_mix_layer")
        self.feature_mix_layer = None if mix is None else ConvBNAct(mix["in_channels"], mix["out_channels"], 1)
        head = config["classifier"]
        self.classifier = LinearClassifier(head["in_features"], head["out_features"], head.get("dropout_rate", 0.0))
        self.num_features = head["in_features"]
        bn = config.get("bn", {"momentum": 0.1, "eps": 1e-3})
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum, module.eps = bn["momentum"], bn["eps"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector, the input of the classifier."""
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        if self.feature_mix_layer is not None:
            x = self.feature_mix_layer(x)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _zoo_files(name: str, weights_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """``<net_name>.json`` and ``.pth`` from `weights_dir` (or $MEDYATE_MCUNET_ZOO_DIR), else downloaded once."""
    stem = ZOO_NETS[name]
    folder = weights_dir or os.environ.get(ZOO_DIR_ENV)
    if folder is not None:
        files = Path(folder) / f"{stem}.json", Path(folder) / f"{stem}.pth"
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"mcunet zoo weights of {name!r}: missing {missing}; download {ZOO_URL}{stem}.json "
                                    f"and {ZOO_URL}{stem}.pth into {folder}")
        return files
    cache = Path(torch.hub.get_dir()) / "mcunet_zoo"
    cache.mkdir(parents=True, exist_ok=True)
    files = cache / f"{stem}.json", cache / f"{stem}.pth"
    for path in files:
        if path.is_file():
            continue
        try:
            torch.hub.download_url_to_file(ZOO_URL + path.name, str(path), progress=False)
        except (urllib.error.URLError, OSError) as exc:
            raise OSError(
                f"could not download the ImageNet weights of {name!r} from {ZOO_URL}{path.name} ({exc}); offline, "
                f"download {stem}.json and {stem}.pth elsewhere and pass weights_dir=<folder> (or set "
                f"{ZOO_DIR_ENV}), or build the architecture alone with pretrained=False"
            ) from exc
    return files


def zoo_transform(size: int, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True):
    """The zoo's ImageNet preprocessing (mean/std normalisation, 0.875 centre crop) at `size` pixels.

    Training: a random resized crop over `crop_scale` of the area and, if `hflip`, a horizontal flip.
    """
    from torchvision import transforms  # lazy: keeps ``import medyate_peft.backbones`` light

    normalise = [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    if train:
        flip = [transforms.RandomHorizontalFlip()] if hflip else []
        return transforms.Compose([transforms.RandomResizedCrop(size, scale=crop_scale), *flip, *normalise])
    return transforms.Compose([transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size), *normalise])


def load_zoo_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool = True,
    weights_dir: str | os.PathLike | None = None,
) -> ZooNetwork:
    """The fp32 zoo network `name` (``mcunet-5fps``, ``mbv2-w0.35``, ``proxyless-w0.3``).

    `pretrained` loads its ImageNet weights (strictly: every tensor must match) and builds from the
    zoo's own config; otherwise the architecture alone, from the config written here, with
    PyTorch's default initialisation. `num_classes` other than 1000 replaces the classifier's
    linear layer by a fresh one (dropout kept).
    """
    config = zoo_config(name)
    state = None
    if pretrained:
        config_file, weights_file = _zoo_files(name, weights_dir)
        config = json.loads(config_file.read_text())
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    model = ZooNetwork(config)
    if state is not None:
        model.load_state_dict(state, strict=True)
    if num_classes is not None and num_classes != model.classifier.linear.out_features:
        model.classifier.linear = _fresh_head(model.num_features, num_classes)
    return model
