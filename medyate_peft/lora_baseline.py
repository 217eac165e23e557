"""PEFT's LoRA as a baseline beside MeDyate, with its rank matched to a MeDyate budget.

The rule (`medyate train --method lora`, scripts/benchmark.py): LoRA adapts the pointwise layers,
every ungrouped 1x1 Conv2d and every Linear outside the classifier head; its rank r gives it about
as many trainable values as MeDyate's flat vector holds at the same budget (`budget_kb * 1024 / 4`
fp32 values): `r = max(1, round(values / sum(in + out over the targets)))`. The budget bounds
MeDyate's gradients *and* stored activations; LoRA's activations are not bounded, which is what
the comparison shows.
"""

from __future__ import annotations

from torch import nn

from .candidates import detect_head


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the pointwise layers: ungrouped 1x1 Conv2d and Linear, the classifier head excluded."""
    head = tuple(detect_head(model) or ())
    names = []
    for name, module in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in head):
            continue
        pointwise_conv = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
        if pointwise_conv or isinstance(module, nn.Linear):
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no 1x1 Conv2d or Linear outside its head for LoRA to adapt")
    return names


def lora_rank(model: nn.Module, targets: list[str], values: int) -> int:
    """The r whose A and B matrices over `targets` hold closest to `values` trainable values (at least 1)."""
    per_rank = 0
    for name in targets:
        m = model.get_submodule(name)
        per_rank += (m.in_channels + m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features + m.out_features)
    return max(1, round(values / per_rank))
