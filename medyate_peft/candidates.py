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
    partner = tied_partner(name, module, model)
    if partner is not None:
        return (
            f"its weight is tied to {partner!r} (e.g. tie_word_embeddings): its channel deltas would apply to one "
            "module only in training but to both once merged. Untie it first (give it its own weight: "
            "module.weight = nn.Parameter(module.weight.clone()) and model.config.tie_word_embeddings = False)"
        )
    custom_forward = type(module).forward not in _KNOWN_FORWARDS
    if custom_forward and type(module).__name__ != "Conv2dSame":
        return f"{type(module).__name__} overrides forward(); its semantics are unknown to MeDyate"
    return None


def tied_partner(name: str, module: nn.Module, model: nn.Module) -> str | None:
    """Another parameter name that holds this module's very weight tensor (a tied LM head), if any."""
    weight = getattr(module, "weight", None)
    for other, param in model.named_parameters(remove_duplicate=False):
        if param is weight and other != f"{name}.weight":
            return other
    return None


def output_head_name(model: nn.Module) -> str | None:
    """Name of a transformers model's vocabulary projection (lm_head), None for other models."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return None if head is None else next((n for n, m in model.named_modules() if m is head), None)


def in_modules_to_save(name: str, modules_to_save: list[str] | tuple[str, ...] | set[str] | None) -> bool:
    """Whether PEFT wraps the module (or one above it) as modules_to_save: a dotted prefix ends with an entry.

    PEFT matches modules_to_save by plain name suffix, so "classifier" also takes DistilBERT's
    `pre_classifier`; such a module is trained in full, so it must not also be a target.
    """
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(prefix.endswith(entry) for prefix in prefixes for entry in modules_to_save or ())


def default_targets(model: nn.Module, heads: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(names taken with target_modules=None, {skipped layer: why}).

    Every supported Conv2d/Linear outside modules_to_save, except a language model's output head,
    which PEFT's all-linear leaves frozen too (untied, it can still be named in target_modules).
    """
    lm_head = output_head_name(model)
    names, skipped = [], {}
    for name, module in model.named_modules():
        if not is_candidate_type(module) or in_modules_to_save(name, heads):
            continue
        reason = "the output (vocabulary) head, frozen as with PEFT's all-linear" if name == lm_head else None
        reason = reason or unsupported_reason(name, module, model)
        if reason:
            skipped[name] = reason
        else:
            names.append(name)
    return names, skipped


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
    if output_head_name(model) is not None:
        return None  # a language model: its head is the vocabulary projection, frozen as in LoRA
    for candidate in HEAD_NAMES:
        if candidate in names and any(p.numel() for p in names[candidate].parameters()):
            return [candidate]
    return None
