"""Full (dense) weight gradients of the wrapped layers, for what the sparse backward cannot measure.

Two users: the layer ranking that MeDyate computes itself when none is given, and the oracle
strategies (det_rgn, static_det_rgn, prob_raw) that need n(i, c) of *every* channel, not only of
the selected ones. Either way the gradient is dense: activations of every wrapped layer are kept
for one backward, i.e. the memory of full fine-tuning. That is why a precomputed ranking
(`rank_layers`) is the recommended path on a device, and why the oracles are upper bounds only.

- `measure_full_gradient(layers, closure, batches)`: now, from a closure returning a loss, called
  `batches` times (one extra forward+backward each; `.grad` of no parameter is touched).
- `DenseGradientProbe`: during the user's own next training batches, via hooks on the base weights
  (no extra pass; the flat trainable vector gets no gradient meanwhile).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .candidates import linear_layout
from .guards import HINT, NonFiniteError
from .ranking import GradientStats

logger = logging.getLogger(__name__)

FullGradient = Callable[[], torch.Tensor]


def _base_weight(layer: nn.Module) -> nn.Parameter:
    return layer.get_base_layer().weight


def _groups(layer: nn.Module) -> int:
    return getattr(layer.get_base_layer(), "groups", 1)


def measure_full_gradient(layers: dict[str, nn.Module], closure: FullGradient, batches: int = 1) -> GradientStats:
    """Dense gradients of the wrapped layers' weights, channel norms summed over `batches` calls of `closure`.

    Each call runs a forward of the model being trained and returns a scalar loss, that of the next
    batch, e.g. `lambda: F.cross_entropy(model(*next(it)), ...)` or `lambda: model(**next(it)).loss`;
    one batch's graph is held at a time. A closure that always returns the same batch's loss gives
    that batch's norms times `batches`: the same order, for `batches` times the cost.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    weights = {name: _base_weight(layer) for name, layer in layers.items()}
    flags = {name: w.requires_grad for name, w in weights.items()}
    stats = GradientStats()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for _ in range(batches):
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("the full-gradient closure must return a scalar loss tensor")
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (name, layer), grad in zip(layers.items(), grads, strict=True):
                if grad is not None:
                    stats.add(name, linear_layout(layer.get_base_layer(), grad), _groups(layer))
            stats.steps += 1
    finally:
        for name, w in weights.items():
            w.requires_grad_(flags[name])
    return stats


class DenseGradientProbe:
    """Measures dense gradients of the wrapped layers during the user's next training batches.

    While open, the base weights require grad, so the layers take their dense autograd path; a
    post-accumulate-grad hook reads each weight gradient into the current batch's statistics and
    frees it at once, so the optimizer never sees it and the base model is not changed.

    A batch whose gradients hold NaN/inf is what an fp16 GradScaler skips on overflow: with
    `strict=False` it is left out of the statistics as well (counted in `skipped`); with `strict=True`
    (`detect_anomalies`) it raises NonFiniteError in that backward, naming the layer.
    """

    def __init__(self, layers: dict[str, nn.Module], strict: bool = True, batches_needed: int = 1) -> None:
        self.stats = GradientStats()
        self.batches_needed = batches_needed
        self.batches = 0  # batches started; all ranks count the same, whatever they skip
        self.skipped = 0
        self.strict = strict
        self._batch = GradientStats()  # the current batch's reads, kept or dropped when the next one starts
        self._weights = {name: _base_weight(layer) for name, layer in layers.items()}
        self._flags = {name: w.requires_grad for name, w in self._weights.items()}
        self._hooks = []
        for name, layer in layers.items():
            weight = self._weights[name]
            weight.requires_grad_(True)
            self._hooks.append(weight.register_post_accumulate_grad_hook(self._reader(name, layer)))

    def _reader(self, name: str, layer: nn.Module) -> Callable[[torch.Tensor], None]:
        base, groups = layer.get_base_layer(), _groups(layer)

        def read(weight: torch.Tensor) -> None:
            if self.strict and not bool(torch.isfinite(weight.grad).all()):
                raise NonFiniteError(
                    f"non-finite dense gradient in layer {name!r} during layer-ranking batch {self.batches}. {HINT}"
                )
            self._batch.add(name, linear_layout(base, weight.grad), groups)
            weight.grad = None

        return read

    def _settle(self) -> None:
        """Keep the finished batch's statistics, unless they are not finite (a skipped fp16 step)."""
        batch, self._batch = self._batch, GradientStats()
        if not batch.channel:
            return
        if batch.is_finite():
            batch.steps = 1
            self.stats.merge(batch)
        else:
            self.skipped += 1
            logger.warning("MeDyate: layer-ranking batch %d had non-finite gradients (an fp16 overflow the "
                           "GradScaler skips); it is left out of the ranking", self.batches)

    def count_batch(self) -> None:
        self._settle()
        self.batches += 1

    def done(self) -> bool:
        return self.batches >= self.batches_needed

    def describe(self) -> str:
        return f"dense gradients of the first {self.stats.steps} training batch(es)"

    def state_dict(self) -> dict[str, Any]:
        """What was measured so far (the current batch's reads apart), so a checkpoint can resume the probe."""
        return {"stats": self.stats.state_dict(), "batch": self._batch.state_dict(), "batches": self.batches,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = GradientStats.from_state_dict(state["stats"])
        self._batch = GradientStats.from_state_dict(state["batch"])
        self.batches, self.skipped = state["batches"], state["skipped"]

    def close(self) -> GradientStats:
        """Remove the hooks and freeze the base weights again; returns what was measured."""
        self._settle()
        for hook in self._hooks:
            hook.remove()
        for name, weight in self._weights.items():
            weight.requires_grad_(self._flags[name])
            weight.grad = None
        self._hooks.clear()
        return self.stats
