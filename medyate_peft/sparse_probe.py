"""Layer ranking within the budget: LaRa and RGN measured through the channel-sparse backward.

The dense probe (`oracles.DenseGradientProbe`) keeps the activations of every layer for its batches:
the memory of full fine-tuning. Here each training batch instead trains (in the sense of measuring
n(i, c) = ||dL/dW_i[:, c]||) one *slice* of channels that fits the budget exactly as a selection does,
and the slices rotate through every channel of every candidate layer. A batch so holds no more than
a training step: x[:, S] of its slice, a weight-gradient vector of at most the budget, and the frozen
path down to its lowest layer (charged by `reserve` in the step-scoped budget).

Estimates. Channels are measured on different batches, so per-channel *means* are what is
comparable: n̄(i, c) = mean of n(i, c) over the batches that measured c, and with R rotations
(every channel measured R times)

    Σ_t n_t(i, c)      ~ R * n̄(i, c)                       (RGN's sums)
    Σ_t ||dL/dW_i||_t  ~ R * sqrt(Σ_c mean_t n_t(i, c)^2)  (LaRa's, the root-mean-square layer norm)

The second is exact for one batch (||W||_F^2 = Σ_c ||W[:, c]||^2) and, over several, the same
estimator for every layer whether its channels shared a batch or not, so layers stay comparable.
The slices are stratified (`rotation`): every layer's channels are spread over as many batches as it
has channels (up to all of them), so no layer's estimate rests on one batch's gradient scale. One
rotation takes k = ceil(Σ_i layer slots / budget) batches, or one more (measured on the shipped
backbones), which `describe` reports. `reserve` charges a slice for what it holds beside its channels
(the step-scoped budget's frozen path below its lowest layer), so that this holds in that scope too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .budget import LayerCost
from .guards import HINT, NonFiniteError
from .kernels import SegmentedVector, Selection
from .ranking import GradientStats

logger = logging.getLogger(__name__)

Part = tuple[str, int, int]  # (layer, first channel, end channel) of one slice
Reserve = Callable[[str], int]  # slots a slice holds beside its channels when this layer is its lowest


def rotation(costs: list[LayerCost], budget: int, reserve: Reserve | None = None) -> list[list[Part]]:
    """Slices of channels, each within `budget` slots, covering every measurable channel once: one rotation.

    Stratified: each layer's channels are cut into consecutive chunks spread over as many slices as it
    has channels (up to all of them), so a layer is measured on many batches and every batch measures
    many layers. Measured on the MCU nets, a batch's gradient scale varies by a factor common to all
    layers (75 % of the variance of log layer norms) and the first batches see an untrained head: a
    layer measured whole on one batch carries that batch's scale, and slices in forward order put the
    low layers on the first batches. Chunks are placed large channels first, each in the slice with
    most room, which also packs tighter than whole layers in forward order (10-25 % fewer slices).

    The lowest layer of a slice (in `costs` order, forward) charges `reserve` against that slice's
    budget. If that makes the stratified slices more than forward-order ones (a large reserve below
    the first layers, which stratified slices all hold), the forward-order rotation is used. A layer of
    which not even one channel fits is left out: no selection at this budget can train it (`unmeasurable`).
    """
    measurable = [c for c in costs if c.name not in unmeasurable([c], budget, reserve)]
    if not measurable:
        cheapest = min(c.channel_slots + (reserve(c.name) if reserve else 0) for c in costs)
        raise ValueError(f"a budget of {budget} slots cannot hold one channel of any layer; the cheapest needs "
                         f"{cheapest} slots")
    forward = _forward_rotation(measurable, budget, reserve)
    count = math.ceil(sum(c.layer_slots for c in measurable) / budget)
    while count <= len(forward):
        slices = _stratified(measurable, budget, reserve, count)
        if slices is not None:
            return slices
        count += max(1, count // 50)  # a few tries even where thousands of slices are needed
    return forward


def _stratified(costs: list[LayerCost], budget: int, reserve: Reserve | None, count: int) -> list[list[Part]] | None:
    """`count` slices holding every channel, each layer in chunks of about C / count; None if they do not fit."""
    position = {c.name: i for i, c in enumerate(costs)}
    slices: list[list[Part]] = [[] for _ in range(count)]
    used, lowest = [0] * count, [len(costs)] * count

    def room(s: int, name: str) -> int:
        low = min(lowest[s], position[name])
        return budget - used[s] - (reserve(costs[low].name) if reserve else 0)

    for cost in sorted(costs, key=lambda c: c.channel_slots, reverse=True):
        start, chunk = 0, math.ceil(cost.in_channels / count)
        # placing a chunk changes only its own slice's room: one ordering serves the whole layer
        for s in sorted(range(count), key=lambda s: room(s, cost.name), reverse=True):
            fits = min(chunk, cost.in_channels - start, room(s, cost.name) // cost.channel_slots)
            if fits <= 0:
                break
            slices[s].append((cost.name, start, start + fits))
            used[s] += fits * cost.channel_slots
            lowest[s] = min(lowest[s], position[cost.name])
            start += fits
        if start < cost.in_channels:
            return None
    return [sorted(parts, key=lambda p: position[p[0]]) for parts in slices]


def _forward_rotation(costs: list[LayerCost], budget: int, reserve: Reserve | None) -> list[list[Part]]:
    """Whole layers in forward order into the current slice while they fit; a larger layer in consecutive chunks."""
    slices: list[list[Part]] = []
    room = 0
    for cost in costs:
        start = 0
        if cost.layer_slots > room:  # a fresh slice for this layer
            room = 0
        while start < cost.in_channels:
            if room < cost.channel_slots:
                room = budget - (reserve(cost.name) if reserve else 0)
                slices.append([])
            count = min(cost.in_channels - start, room // cost.channel_slots)
            slices[-1].append((cost.name, start, start + count))
            room -= count * cost.channel_slots
            start += count
    return slices


def unmeasurable(costs: list[LayerCost], budget: int, reserve: Reserve | None = None) -> list[str]:
    """Layers whose single channel (with what a step holds below it) exceeds the budget."""
    return [c.name for c in costs if c.channel_slots + (reserve(c.name) if reserve else 0) > budget]


class SparseGradientProbe:
    """Measures channel norms of every candidate channel over the next training batches, a slice per batch.

    While open, each batch's slice is the live selection of `adapter` in the wrapped layers, its values a
    zero vector outside the model (no optimizer steps it; its gradient is dropped as soon as it is
    accumulated), so the model does not change. A batch whose norms hold NaN/inf is measured again on
    the next batch (with `strict`: NonFiniteError, naming the layer).
    """

    def __init__(self, layers: Mapping[str, nn.Module], costs: list[LayerCost], budget: int, adapter: str,
                 min_batches: int = 1, strict: bool = True, reserve: Reserve | None = None) -> None:
        self.layers, self.costs, self.adapter, self.strict = dict(layers), list(costs), adapter, strict
        self.slices = rotation(self.costs, budget, reserve)
        self.left_out = unmeasurable(self.costs, budget, reserve)
        if self.left_out:
            logger.warning("MeDyate: %d layer(s) have channels larger than the budget, so no selection can train "
                           "them; they rank last: %s", len(self.left_out), self.left_out[:5])
        self.rounds = max(1, math.ceil(min_batches / len(self.slices)))
        self.batches_needed = self.rounds * len(self.slices)
        self.batches = self.measured = self.skipped = 0
        self._sum = {c.name: torch.zeros(c.in_channels, dtype=torch.float64) for c in self.costs}
        self._sq = {c.name: torch.zeros(c.in_channels, dtype=torch.float64) for c in self.costs}
        self._count = {c.name: torch.zeros(c.in_channels, dtype=torch.float64) for c in self.costs}
        self._reads: dict[str, torch.Tensor] = {}
        self._live = False  # a batch has started on the current slice and is not counted yet
        self._current: int | None = None  # the slice whose channels are live in the layers
        slots = {c.name: c.weight_slots for c in self.costs}
        weight = next(iter(self.layers.values())).get_base_layer().weight
        size = max(sum((b - a) * slots[n] for n, a, b in s) for s in self.slices)
        self.values = nn.Parameter(torch.zeros(size, dtype=weight.dtype, device=weight.device))
        self._segments: list[tuple[str, int, int]] = []  # (layer, offset, numel) of the live slice in `values`
        self._hook = self.values.register_post_accumulate_grad_hook(self._read)

    def __len__(self) -> int:
        return len(self.slices)

    # -- one batch ------------------------------------------------------------------------------
    def _read(self, values: torch.Tensor) -> None:
        """The slice's compact gradient, once per backward: per-channel norms of each layer's segment, then dropped."""
        grad, values.grad = values.grad, None
        for name, offset, numel in self._segments:
            part = grad[offset : offset + numel]
            norms = part.view(-1, math.prod(self.layers[name].slice_shape)).norm(dim=1).cpu().to(torch.float64)
            if self.strict and not bool(torch.isfinite(norms).all()):
                raise NonFiniteError(f"non-finite channel gradient in layer {name!r} during layer-ranking batch "
                                     f"{self.batches}. {HINT}")
            self._reads[name] = self._reads[name] + norms if name in self._reads else norms

    def _release(self) -> None:
        """Take the slice out of the layers, and the all-zero delta rows that making it live stored for its channels."""
        for name, start, end in self.slices[self._current] if self._current is not None else ():
            layer = self.layers[name]
            index, delta = layer.medyate_index[self.adapter], layer.medyate_delta[self.adapter].data
            drop = (index >= start) & (index < end) & (delta.flatten(1).abs().amax(dim=1) == 0)
            layer.set_delta(self.adapter, index[~drop], delta[~drop])
        for layer in self.layers.values():
            layer.set_live(self.adapter, self.values, None)
        self._current, self._segments = None, []

    def _settle(self) -> None:
        """Count the finished batch's norms (a layer the loss did not reach: zeros); a non-finite batch is redone."""
        if not self._live:
            return
        reads, self._reads, self._live = self._reads, {}, False
        if not all(bool(torch.isfinite(norms).all()) for norms in reads.values()):
            self.skipped += 1
            logger.warning("MeDyate: layer-ranking batch %d had non-finite gradients (an fp16 overflow the "
                           "GradScaler skips); its channels are measured again", self.batches)
            return
        for name, start, end in self.slices[self.measured % len(self.slices)]:
            norms = reads.get(name, torch.zeros(end - start, dtype=torch.float64))
            self._sum[name][start:end] += norms
            self._sq[name][start:end] += norms.square()
            self._count[name][start:end] += 1
        self.measured += 1

    def count_batch(self) -> None:
        """Settle the previous batch and make the next unmeasured slice live for this one."""
        self._release()
        self._settle()
        self.batches += 1
        self._live, self._current = True, self.measured % len(self.slices)
        entries = self.slices[self._current]
        sizes = [(end - start) * math.prod(self.layers[name].slice_shape) for name, start, end in entries]
        vector, offset = SegmentedVector(self.values, sizes), 0  # one split per forward, as for training
        for slot, ((name, start, end), numel) in enumerate(zip(entries, sizes, strict=True)):
            layer = self.layers[name]
            idx = torch.arange(start, end, device=layer.get_base_layer().weight.device)
            layer.set_live(self.adapter, self.values,
                           Selection(idx=idx, offset=offset, numel=numel, vector=vector, slot=slot))
            self._segments.append((name, offset, numel))
            offset += numel

    def done(self) -> bool:
        self._settle()
        return self.measured >= self.batches_needed

    # -- result ------------------------------------------------------------------------------------
    def close(self) -> GradientStats:
        """Take the slice out and return the estimated sums of `rounds` dense steps (see the module doc)."""
        self._release()
        self._settle()
        self._hook.remove()
        stats = GradientStats()
        rounds = self.measured / len(self.slices)
        for cost in self.costs:
            count = self._count[cost.name].clamp(min=1)
            stats.channel[cost.name] = self._sum[cost.name] / count * rounds
            stats.layer[cost.name] = float((self._sq[cost.name] / count).sum().sqrt()) * rounds
        stats.steps = math.ceil(rounds) if self.measured else 0
        return stats

    def describe(self) -> str:
        left_out = f", {len(self.left_out)} layer(s) larger than the budget ranked last" if self.left_out else ""
        return (f"budgeted probe: {self.measured} training batch(es), {len(self.slices)} slice(s) of the budget, "
                f"every channel measured {self.rounds} time(s){left_out}")

    def state_dict(self) -> dict[str, Any]:
        """What was measured so far (the current batch's reads too), with the costs the slices were cut from."""
        return {"kind": "budgeted", "costs": [asdict(c) for c in self.costs], "batches": self.batches,
                "measured": self.measured, "skipped": self.skipped, "live": self._live, "current": self._current,
                "reads": {k: v.clone() for k, v in self._reads.items()},
                "sum": {k: v.clone() for k, v in self._sum.items()}, "sq": {k: v.clone() for k, v in self._sq.items()},
                "count": {k: v.clone() for k, v in self._count.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if [asdict(c) for c in self.costs] != state["costs"]:
            raise ValueError("the checkpoint's layer-ranking probe measured other layers or shapes; resume with "
                             "the MeDyateConfig and base model of the interrupted run")
        self.batches, self.measured, self.skipped = state["batches"], state["measured"], state["skipped"]
        self._live, self._reads = state["live"], {k: v.clone() for k, v in state["reads"].items()}
        self._current = state["current"]  # its zero rows are in the restored deltas; the next batch drops them
        self._sum = {k: v.clone() for k, v in state["sum"].items()}
        self._sq = {k: v.clone() for k, v in state["sq"].items()}
        self._count = {k: v.clone() for k, v in state["count"].items()}
