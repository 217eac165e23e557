"""Which layers MeDyate can train, and which module is the classifier trained in full.

Rules shared by the tuner (what to wrap), the layer ranking (what to measure) and the training
script (what the head is); they look at plain torch modules only.
"""

from __future__ import annotations

from torch import nn

HEAD_NAMES = ("classifier", "score", "head", "fc")


def unsupported_reason(name: str, module: nn.Module, model: nn.Module) -> str | None:
    """Why a Conv2d/Linear cannot be wrapped (None: it can)."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads out_proj.weight directly, bypassing any wrapper"
    custom_forward = type(module).forward not in (nn.Conv2d.forward, nn.Linear.forward)
    if custom_forward and type(module).__name__ != "Conv2dSame":
        return f"{type(module).__name__} overrides forward(); its semantics are unknown to MeDyate"
    return None


def is_candidate_type(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


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
