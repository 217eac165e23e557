"""Adapter file contents: per layer the indices of changed channels and their delta slices.

Loading validates every entry against the base model before installing anything, so a wrong
adapter fails with a message that names the layer and leaves the model as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .medyate.layer import MeDyateLayer

INDEX_KEY, DELTA_KEY = "medyate_index", "medyate_delta"
PEFT_PREFIX = "base_model.model."


def _layers_by_key_name(model: nn.Module) -> dict[str, MeDyateLayer]:
    """MeDyate layers under both the PeftModel name and the bare-model name."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, MeDyateLayer):
            layers[name] = module
            layers[name.removeprefix(PEFT_PREFIX)] = module
            layers[PEFT_PREFIX + name] = module
    return layers


def check_entry(name: str, layer: MeDyateLayer, index: torch.Tensor, delta: torch.Tensor) -> None:
    hint = "the adapter was made for a different base model"
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: channel indices must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= layer.in_channels):
        raise ValueError(
            f"{name}: channel index out of range [0, {layer.in_channels}) "
            f"(min {int(index.min())}, max {int(index.max())}); {hint}"
        )
    if len(torch.unique(index)) != len(index):
        raise ValueError(f"{name}: repeated channel indices; the adapter file is corrupt")
    expected = (len(index), *layer.slice_shape)
    if tuple(delta.shape) != expected:
        raise ValueError(
            f"{name}: delta of shape {tuple(delta.shape)} does not fit this layer, which needs {expected} "
            f"for {len(index)} channels; {hint}"
        )
    if not torch.is_floating_point(delta) or not torch.isfinite(delta).all():
        raise ValueError(f"{name}: delta values must be finite floating-point numbers; the adapter file is corrupt")


def check_modules_to_save(model: nn.Module, modules_to_save: list[str] | None, adapter_name: str) -> None:
    """Before a save: every module of the model that modules_to_save names is PEFT's trained copy, finite.

    Names that match no module (PEFT's task types add their usual ones, "classifier" and "score") pass.
    """
    from peft.utils import ModulesToSaveWrapper

    from .guards import NonFiniteError

    modules = list(model.named_modules())
    wrappers = [(n, m) for n, m in modules if isinstance(m, ModulesToSaveWrapper)]
    for target in modules_to_save or ():
        copies = [(n, m.modules_to_save[adapter_name]) for n, m in wrappers
                  if names_module(n, target) and adapter_name in m.modules_to_save]
        if not copies and any(names_module(n, target) for n, _ in modules):
            raise ValueError(
                f"modules_to_save names {target!r}, but the model's {target!r} is not PEFT's trained copy of it "
                "(was the module replaced after get_peft_model?), so its weights would be missing from the save; "
                "replace it before get_peft_model"
            )
        for name, copy in copies:
            for key, tensor in [*copy.named_parameters(), *copy.named_buffers()]:
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteError(
                        f"{name}.{key} (modules_to_save of adapter {adapter_name!r}) holds NaN/inf; not saving an "
                        "adapter that cannot be used (the previous save, if any, is kept)"
                    )


def names_module(name: str, target: str) -> bool:
    """PEFT's rule for modules_to_save entries: the module's full name or its last parts."""
    return name == target or name.endswith("." + target)


def _check_other_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The loaded head (modules_to_save) tensors: finite and shaped as the model's."""
    own = model.state_dict()
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{key.removeprefix(PEFT_PREFIX)}: values must be finite; the adapter file is corrupt")
        target = own.get(key, own.get(key.removeprefix(PEFT_PREFIX)))
        if target is not None and target.shape != tensor.shape:
            raise ValueError(
                f"{key.removeprefix(PEFT_PREFIX)}: shape {tuple(tensor.shape)} in the adapter, {tuple(target.shape)} "
                "in the model; the adapter was made for a different base model (or number of classes)"
            )


def install_deltas(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """Install the MeDyate entries of a loaded state dict; return the other entries untouched."""
    layers = _layers_by_key_name(model)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state_dict.items():
        name, _, kind = key.rpartition(".")
        if kind in (INDEX_KEY, DELTA_KEY):
            entries.setdefault(name, {})[kind] = value
        else:
            rest[key] = value
    for name, entry in entries.items():
        if name not in layers:
            raise ValueError(
                f"the adapter holds deltas for layer {name.removeprefix(PEFT_PREFIX)!r}, which this model does not "
                "have as a MeDyate layer; the adapter was made for a different base model"
            )
        if set(entry) != {INDEX_KEY, DELTA_KEY}:
            missing = {INDEX_KEY, DELTA_KEY} - set(entry)
            raise ValueError(f"{name}: the adapter file lacks {sorted(missing)}; it is truncated or corrupt")
        check_entry(name.removeprefix(PEFT_PREFIX), layers[name], entry[INDEX_KEY], entry[DELTA_KEY])
    _check_other_tensors(model, rest)
    for name, entry in entries.items():
        layer = layers[name]
        if adapter_name not in layer.medyate_delta:
            layer.update_layer(adapter_name, layer.lean_backward)
        layer.set_delta(adapter_name, entry[INDEX_KEY].long(), entry[DELTA_KEY])
    return {**rest, **_current_adapter_tensors(model, adapter_name)}


def _current_adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every MeDyate tensor of the adapter under its model key, so PEFT reports no key as missing.

    Layers absent from the file (nothing changed there) keep their empty deltas; the flat
    trainable vector starts at zero, as it does after every resample.
    """
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith(f".{INDEX_KEY}.{adapter_name}") or name.endswith(f".{DELTA_KEY}.{adapter_name}"):
            out[name] = tensor.detach()
        elif name.endswith(f"medyate_values.{adapter_name}"):
            out[name] = torch.zeros_like(tensor)
    return out
