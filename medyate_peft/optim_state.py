"""The optimizer state of MeDyate's flat trainable vector, whose slots change channels at every resample.

Momentum or Adam moments of a slot belong to the channel it trained: carried over, they move the
newly drawn channel even on a step with zero gradient. `resample(optimizer)` resets them. Every
optimizer that steps is remembered weakly (a global post-step hook, one set insertion per step), so
that a `resample()` without its optimizer still finds the stale state, resets it and says so.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

logger = logging.getLogger(__name__)
_STEPPED: weakref.WeakSet[Optimizer] = weakref.WeakSet()
_HOOK: list = []


def _remember(optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
    _STEPPED.add(optimizer)


def track_steps() -> None:
    """Register the post-step hook once per process."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_remember))


def holds(optimizer: Optimizer, values: torch.Tensor) -> bool:
    return any(p is values for group in optimizer.param_groups for p in group["params"])


def check_optimizer(optimizer: object, values: torch.Tensor, adapter: str) -> None:
    """`resample(optimizer)` takes the optimizer that trains the adapter's flat vector, or None."""
    if optimizer is None:
        return
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"resample(optimizer=...) takes the torch.optim.Optimizer that trains the model, got {optimizer!r} "
            f"({type(optimizer).__name__})"
        )
    if values.requires_grad and not holds(optimizer, values):
        raise ValueError(
            f"the optimizer passed to resample() does not hold the trainable vector of adapter {adapter!r} "
            f"(model.base_model.medyate_values[{adapter!r}]), so it trains only the other parameters (the head): "
            "build it after get_peft_model, from [p for p in model.parameters() if p.requires_grad]"
        )


def _moments(state: dict) -> list[str]:
    """Names of the per-element state tensors (momentum, moments), not counters such as `step`."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]


def reset(optimizer: Optimizer | None, values: torch.Tensor, adapter: str) -> None:
    """Forget the state of `values` in `optimizer`; without one, in every optimizer that stepped it."""
    if optimizer is not None:
        optimizer.state.pop(values, None)
        return
    for stepped in list(_STEPPED):
        moments = _moments(stepped.state.get(values, {}))
        if moments:
            stepped.state.pop(values)
            logger.warning(
                "MeDyate: resample() was called without the optimizer; its %s for the trainable vector of adapter "
                "%r belonged to the previous channels and was reset (pass resample(optimizer) to do so explicitly)",
                ", ".join(moments), adapter,
            )


def forget(values: torch.Tensor) -> bool:
    """Drop the state of `values` from every optimizer that stepped it; whether any held some."""
    held = False
    for stepped in list(_STEPPED):
        held |= stepped.state.pop(values, None) is not None
    return held


def warn_if_untrained(values: torch.Tensor, steps: float, adapter: str, epoch: int) -> None:
    """After an epoch with `steps` backward passes: an unchanged vector means no optimizer trains it."""
    if values.requires_grad and steps > 0 and not bool(values.detach().any()):
        logger.warning(
            "MeDyate: no optimizer step changed the trainable vector of adapter %r during epoch %d: is it in the "
            "optimizer? One built before get_peft_model, or from the base model's parameters, trains only the "
            "head; build it from [p for p in model.parameters() if p.requires_grad]", adapter, epoch,
        )
