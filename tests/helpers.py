"""Shared test utilities: dense-autograd references and selection helpers."""

from __future__ import annotations

import copy

import torch
from torch import nn

from medyate_peft.candidates import linear_layout
from medyate_peft.kernels import gather_channels
from medyate_peft.medyate.layer import MeDyateLayer


def selected_values_grad(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Per selected layer, its compact gradient read out of the flat vector's .grad."""
    tuner = peft_model.base_model
    grad = tuner.medyate_values[adapter].grad
    out = {}
    for name, layer in tuner.medyate_layers().items():
        if adapter in layer.live:
            _, sel = layer.live[adapter]
            out[name] = grad[sel.offset : sel.offset + sel.numel].view(len(sel.idx), *layer.slice_shape)
    return out


def dense_reference(base: nn.Module, forward_loss, names: list[str]) -> dict[str, torch.Tensor]:
    """Full weight gradients of the named layers from plain autograd on a copy of the base model.

    In nn.Linear's (out, in) layout, also for transformers' Conv1D (stored (in, out)).
    """
    dense = copy.deepcopy(base)
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(True)
    forward_loss(dense).backward()
    modules = dict(dense.named_modules())
    return {name: linear_layout(modules[name], modules[name].weight.grad) for name in names}


def assert_grads_match(peft_model, base: nn.Module, forward_loss, atol: float = 1e-5, rtol: float = 1e-4) -> int:
    """Compact gradients of every selected layer equal dense autograd's slices; returns layers checked."""
    peft_model.eval()
    forward_loss(peft_model).backward()
    compact = selected_values_grad(peft_model)
    assert compact, "no layer is selected"
    reference = dense_reference(base, forward_loss, list(compact))
    tuner = peft_model.base_model
    layers = tuner.medyate_layers()
    for name, grad in compact.items():
        layer: MeDyateLayer = layers[name]
        _, sel = layer.live["default"]
        expected = gather_channels(reference[name], layer.groups, sel.idx).to(grad.dtype)  # fp32 adapter, half base
        torch.testing.assert_close(grad, expected, atol=atol, rtol=rtol, msg=f"gradient mismatch in {name}")
    return len(compact)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
