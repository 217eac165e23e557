"""Which layers MeDyate can train, and which module is the classifier trained in full.

Rules shared by the tuner (what to wrap), the layer ranking (what to measure) and the training
script (what the head is); they look at plain torch modules only. Candidates are nn.Conv2d,
nn.Linear and transformers' Conv1D (GPT-2's linear layer, whose weight is stored (in, out)).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

HEAD_NAMES = ("classifier", "score", "head", "fc")
_KNOWN_FORWARDS = (nn.Conv2d.forward, nn.Linear.forward, Conv1D.forward)


def unsupported_reason(name: str, module: nn.Module, model: nn.Module) -> str | None:
    """Why a candidate-type layer cannot be wrapped (None: it can)."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads out_proj.weight directly, bypassing any wrapper"
    custom_forward = type(module).forward not in _KNOWN_FORWARDS
    if custom_forward and type(module).__name__ != "Conv2dSame":
        return f"{type(module).__name__} overrides forward(); its semantics are unknown to MeDyate"
    return None


def is_candidate_type(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear, Conv1D))


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """Whether the weight is stored (in, out), transposed from nn.Linear's (out, in): transformers' Conv1D."""
    return isinstance(module, Conv1D)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear-like layer (nn.Linear, Conv1D); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return None


def linear_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) in nn.Linear's (out, in) layout: a transposed view for Conv1D."""
    return weight.t() if is_fan_in_fan_out(module) else weight


def detect_head(model: nn.Module) -> list[str] | None:
    """The classifier a user would expect to be trained in full: timm's declared one, else a known name."""
    declared = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = dict(model.named_modules())
    head = declared.get("classifier") if isinstance(declared, dict) else None
    if head in names and any(p.numel() for p in names[head].parameters()):
        return [head]
    for candidate in HEAD_NAMES:
        if candidate in names and any(p.numel() for p in names[candidate].parameters()):
            return [candidate]
    return None
