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


def adapter_entries(state_dict: dict, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer name, the (channel indices, delta slices) entries of an adapter in a model state dict."""
    suffix = f".{DELTA_KEY}.{adapter_name}"
    return {
        key.removesuffix(suffix): (state_dict[f"{key.removesuffix(suffix)}.{INDEX_KEY}.{adapter_name}"], delta)
        for key, delta in state_dict.items()
        if key.endswith(suffix)
    }


def complete_for_load(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """A loaded adapter file's entries, validated and keyed as the model's state dict, for `load_state_dict`.

    Every entry is checked against the model before anything is installed. Layers the file leaves
    out (nothing changed there) get empty entries and the flat trainable vector zeros, so that PEFT
    reports no key as missing and a meta-device (low_cpu_mem_usage) adapter gets real tensors.
    """
    layers = _layers_by_key_name(model)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        name, _, kind = key.rpartition(".")
        if kind in (INDEX_KEY, DELTA_KEY):
            entries.setdefault(name, {})[kind] = value
        else:
            out[key] = value
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
    _check_other_tensors(model, out)
    saved = {id(layers[name]): entry for name, entry in entries.items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, MeDyateLayer) or adapter_name not in layer.medyate_delta:
            continue
        stored = layer.medyate_delta[adapter_name]
        empty = {INDEX_KEY: torch.zeros(0, dtype=torch.long), DELTA_KEY: stored.new_zeros(0, *layer.slice_shape)}
        for kind, tensor in saved.get(id(layer), empty).items():
            out[f"{name}.{kind}.{adapter_name}"] = tensor
    for name, values in model.named_parameters():
        if name.endswith(f"medyate_values.{adapter_name}"):
            device = next(iter(layers.values())).get_base_layer().weight.device
            out[name] = torch.zeros_like(values, device=device)
    return out
