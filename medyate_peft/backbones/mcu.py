"""The MCU networks of Lin et al. (MCUNet, MobileNetV2-w0.35, ProxylessNAS-w0.3) as fp32 PyTorch models.

The weights ship inside the package (``medyate_peft/assets/mcu/``, 1.7 MB, MIT licence and
attribution beside them) as int8 + per-channel scales: tiny-training's format, re-packaged as json +
safetensors (see the README there). Fine-tuning them needs plain float ``nn.Conv2d`` / ``nn.Linear``
modules, so they are dequantised here once, at load time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

MCU_MODELS = ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")
MCU_DIR_ENV = "MEDYATE_MCU_DIR"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "assets" / "mcu"
IMAGENET_CLASSES = 1000
_ACTIVATIONS = ("relu6", "exact")
_RELU_ZERO_POINT = -128  # an int8 output with this zero point has lo = 0: a (clipped) ReLU

logger = logging.getLogger(__name__)


class Clamp(nn.Module):
    """Saturation to the calibrated int8 output range, in real units (the exact model's non-linearity)."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo = lo
        self.hi = hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"lo={self.lo:.4g}, hi={self.hi:.4g}"


class ConvAct(nn.Module):
    """One int8 conv of the original network: a float conv followed by its activation."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class MCUBlock(nn.Module):
    """Inverted-residual block: optional 1x1 expansion, depthwise conv, 1x1 projection, optional add."""

    def __init__(
        self, pointwise1: ConvAct | None, depthwise: ConvAct, pointwise2: ConvAct, residual: nn.Module | None
    ) -> None:
        super().__init__()
        self.pointwise1 = pointwise1
        self.depthwise = depthwise
        self.pointwise2 = pointwise2
        self.residual = residual  # the post-add activation; None when the block has no skip connection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise1(x) if self.pointwise1 is not None else x
        y = self.pointwise2(self.depthwise(y))
        return self.residual(x + y) if self.residual is not None else y


class MCUNetwork(nn.Module):
    """First conv, blocks, global average pool and a linear classifier (no feature-mix layer)."""

    def __init__(self, first_conv: ConvAct, blocks: list[MCUBlock], classifier: nn.Linear) -> None:
        super().__init__()
        self.first_conv = first_conv
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier
        self.num_features = classifier.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector, the input of the classifier."""
        return self.pool(self.blocks(self.first_conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _search_dirs() -> list[Path]:
    """Where a bare model name is looked up: ``$MEDYATE_MCU_DIR`` (to override), then the embedded copy."""
    dirs = [Path(os.environ[MCU_DIR_ENV]).resolve()] if os.environ.get(MCU_DIR_ENV) else []
    return [*dirs, EMBEDDED_DIR]


def _strip_suffix(path: str) -> str:
    # Not Path.with_suffix: the stem "mbv2-w0.35" has the "suffix" ".35".
    for suffix in (".json", ".safetensors"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _has_files(stem: Path) -> bool:
    return Path(f"{stem}.json").is_file() and Path(f"{stem}.safetensors").is_file()


def resolve_mcu_files(name_or_path: str) -> Path:
    """The ``<dir>/<name>`` stem whose ``.json`` and ``.safetensors`` hold the model."""
    if name_or_path in MCU_MODELS:
        candidates = [d / name_or_path for d in _search_dirs()]
        for stem in candidates:
            if _has_files(stem):
                if os.environ.get(MCU_DIR_ENV) and stem.parent == EMBEDDED_DIR:
                    logger.warning(
                        "%s=%s holds no %s.json + .safetensors: using the embedded copy in %s",
                        MCU_DIR_ENV, os.environ[MCU_DIR_ENV], name_or_path, EMBEDDED_DIR,
                    )
                return stem
        looked = ", ".join(str(c.parent) for c in candidates)
        raise FileNotFoundError(
            f"MCU model {name_or_path!r} not found (looked in: {looked}); "
            f"set {MCU_DIR_ENV} to the folder holding {name_or_path}.json and {name_or_path}.safetensors"
        )
    path = Path(_strip_suffix(name_or_path))
    if path.is_dir():
        stems = sorted(j.with_name(j.name[: -len(".json")]) for j in path.glob("*.json"))
        stems = [s for s in stems if _has_files(s)]
        if len(stems) != 1:
            found = [s.name for s in stems]
            raise FileNotFoundError(
                f"{path} must hold exactly one <name>.json + .safetensors pair, found {found}"
            )
        return stems[0]
    if _has_files(path):
        return path
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a known MCU model {MCU_MODELS} nor a path to <name>.json + "
        f"<name>.safetensors (or their folder); set {MCU_DIR_ENV} to the folder holding the known models"
    )


def _output_range(t: dict[str, torch.Tensor], key: str) -> tuple[float, float, bool]:
    """Real-valued saturation range of an int8 output, and whether it is a ReLU (lo == 0)."""
    y_scale, y_zero = float(t[f"{key}.y_scale"]), int(t[f"{key}.y_zero"])
    return (-128 - y_zero) * y_scale, (127 - y_zero) * y_scale, y_zero == _RELU_ZERO_POINT


def _activation(t: dict[str, torch.Tensor], key: str, mode: str) -> nn.Module:
    lo, hi, is_relu = _output_range(t, key)
    if mode == "exact":
        return Clamp(lo, hi)
    return nn.ReLU6() if is_relu else nn.Identity()


def _dequantised(t: dict[str, torch.Tensor], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weight and bias: ``w = q_w * w_scales[o]``, ``b = q_b * x_scale * w_scales[o]``."""
    w_scales = t[f"{key}.w_scales"].double()
    weight = t[f"{key}.weight"].double() * w_scales.view(-1, 1, 1, 1)
    bias = t[f"{key}.bias"].double() * t[f"{key}.x_scale"].double() * w_scales
    return weight.float(), bias.float()


def _conv(spec: dict[str, Any], t: dict[str, torch.Tensor], key: str, mode: str) -> ConvAct:
    k = spec["kernel_size"][0]
    conv = nn.Conv2d(
        spec["in_channel"],
        spec["out_channel"],
        k,
        stride=spec["stride"],
        padding=(k - 1) // 2,
        groups=spec["groups"],
    )
    weight, bias = _dequantised(t, key)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return ConvAct(conv, _activation(t, key, mode))


def _block(spec: dict[str, Any], t: dict[str, torch.Tensor], key: str, mode: str) -> MCUBlock:
    if spec.get("se") is not None:
        raise ValueError(f"{key}: squeeze-excitation is not supported")
    residual = spec["residual"]
    if residual is not None and residual["kind"] != "add":
        raise ValueError(f"{key}: residual of kind {residual['kind']!r} is not supported")
    pointwise1 = None
    if spec["pointwise1"] is not None:
        pointwise1 = _conv(spec["pointwise1"], t, f"{key}.pointwise1", mode)
    post_add = None
    if residual is not None:
        post_add = _activation(t, f"{key}.residual", mode) if mode == "exact" else nn.Identity()
    return MCUBlock(
        pointwise1,
        _conv(spec["depthwise"], t, f"{key}.depthwise", mode),
        _conv(spec["pointwise2"], t, f"{key}.pointwise2", mode),
        post_add,
    )


def _classifier(spec: dict[str, Any], t: dict[str, torch.Tensor]) -> nn.Linear:
    """The ImageNet 1x1-conv head as a Linear on the pooled vector, without the int8 logit clamp."""
    linear = nn.Linear(spec["in_channel"], spec["out_channel"])
    weight, bias = _dequantised(t, "classifier")
    with torch.no_grad():
        linear.weight.copy_(weight.flatten(1))
        linear.bias.copy_(bias)
    return linear


def _fresh_head(in_features: int, num_classes: int) -> nn.Linear:
    """New classifier, seeded so that two loads give the same starting point."""
    head = nn.Linear(in_features, num_classes)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    return head


def load_mcu_model(name_or_path: str, num_classes: int | None = None, activation: str = "relu6") -> nn.Module:
    """Build the fp32 model from ``<name>.json`` + ``<name>.safetensors``.

    ``activation="relu6"`` (default, what one fine-tunes) uses ReLU6 where the int8 output starts
    at 0 and identity elsewhere; ``"exact"`` reproduces every calibrated int8 saturation range.
    ``num_classes`` other than 1000 replaces the ImageNet classifier by a fresh one.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    stem = resolve_mcu_files(name_or_path)
    arch = json.loads(Path(f"{stem}.json").read_text())["model"]
    if arch.get("feature_mix") is not None:
        raise ValueError(f"{stem}: a feature_mix layer is not supported")
    tensors = load_file(f"{stem}.safetensors")
    model = MCUNetwork(
        _conv(arch["first_conv"], tensors, "first_conv", activation),
        [_block(b, tensors, f"blocks.{i}", activation) for i, b in enumerate(arch["blocks"])],
        _classifier(arch["classifier"], tensors),
    )
    if num_classes is not None and num_classes != IMAGENET_CLASSES:
        model.classifier = _fresh_head(model.num_features, num_classes)
    return model


def mcu_transform(
    train: bool, size: int = 128, crop_scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True
):
    """tiny-training's preprocessing (128x128, evaluation crop 128/147); the network sees ``pixel / 127.5 - 1``.

    Training: a random resized crop covering `crop_scale` of the image area, and a horizontal flip
    unless `hflip` is False (mirrored signs, text or digits are other classes).
    """
    from torchvision import transforms  # lazy: keeps ``import medyate_peft.backbones`` light

    normalise = [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    if train:
        flip = [transforms.RandomHorizontalFlip()] if hflip else []
        return transforms.Compose([transforms.RandomResizedCrop(size, scale=crop_scale), *flip, *normalise])
    return transforms.Compose([transforms.Resize(round(size * 147 / 128)), transforms.CenterCrop(size), *normalise])
