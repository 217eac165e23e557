"""Channel sampling within a slot budget (spec section 4).

Channels of the pre-selected layers form one pool. An order over the pool is drawn (uniform, or
without replacement with probability proportional to a weight via Efraimidis-Spirakis keys), then
channels are taken in that order while they fit the remaining budget; a channel that does not fit
is skipped and drawing goes on until nothing fits [ours].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import LayerCost
from .devices import wide_float


@dataclass(frozen=True)
class ChannelPool:
    """All input channels of the candidate layers, flattened: entry j is (layer[j], channel[j])."""

    costs: tuple[LayerCost, ...]
    layer: torch.Tensor  # int64, index into costs
    channel: torch.Tensor  # int64, input channel within its layer
    slots: torch.Tensor  # int64, cost(i, c) of each entry

    @classmethod
    def build(cls, costs: list[LayerCost]) -> ChannelPool:
        layer = torch.cat([torch.full((c.in_channels,), i, dtype=torch.long) for i, c in enumerate(costs)])
        channel = torch.cat([torch.arange(c.in_channels) for c in costs])
        slots = torch.tensor([c.channel_slots for c in costs], dtype=torch.long)[layer]
        return cls(tuple(costs), layer, channel, slots)

    def __len__(self) -> int:
        return len(self.layer)

    def offsets(self) -> dict[str, int]:
        """Position of each layer's first channel in the pool."""
        out, start = {}, 0
        for cost in self.costs:
            out[cost.name] = start
            start += cost.in_channels
        return out

    def to_selection(self, taken: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pool positions -> {layer name: sorted channel indices}, layers with no channel left out."""
        chosen: dict[str, torch.Tensor] = {}
        for i, cost in enumerate(self.costs):
            channels = self.channel[taken[self.layer[taken] == i]]
            if len(channels):
                chosen[cost.name] = torch.sort(channels).values
        return chosen


def uniform_order(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def weighted_order(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Order of a draw without replacement with P ∝ weight (Efraimidis-Spirakis, O(n log n)).

    key = u^(1/w), compared in log space. Zero-weight entries come last, in uniform random order:
    they are reached only once every positive-weight entry is taken, so a budget larger than the
    channels with a measured gradient is still filled [ours].
    """
    u = torch.rand(len(weights), generator=generator, dtype=torch.float64).clamp_min(1e-300)
    w = weights.to(torch.float64)
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("sampling weights must be finite and >= 0")
    positive = w > 0
    keys = torch.where(positive, u.log() / w.clamp_min(1e-300), torch.zeros_like(w))
    drawn = torch.nonzero(positive).squeeze(1)
    drawn = drawn[torch.argsort(keys[drawn], descending=True, stable=True)]
    rest = torch.nonzero(~positive).squeeze(1)
    return torch.cat([drawn, rest[torch.randperm(len(rest), generator=generator)]])


def deterministic_order(scores: torch.Tensor) -> torch.Tensor:
    """Highest score first; ties by pool position (the DetRGN oracles)."""
    return torch.argsort(scores.to(torch.float64), descending=True, stable=True)


def greedy_fill(order: torch.Tensor, slots: torch.Tensor, budget: int) -> torch.Tensor:
    """Pool positions taken in `order` while they fit; overflowing channels are skipped."""
    ordered_slots = slots[order].tolist()
    smallest = min(ordered_slots, default=budget + 1)
    taken, remaining = [], budget
    for pos, cost in zip(order.tolist(), ordered_slots, strict=True):
        if cost <= remaining:
            taken.append(pos)
            remaining -= cost
            if remaining < smallest:
                break
    return torch.tensor(taken, dtype=torch.long)


class NormTracker:
    """Channel importance N[c] over the pool, built from the compact gradients of the sparse backward.

    During an epoch it sums per-step norms of the selected channels; `end_epoch` turns them into the
    mean per-step norm [ours] and applies the exploration rule once (epoch 2: channels never selected
    get the maximum observed norm). An "epoch" here is one sampling period: a dataset epoch by
    default, `resample_every` steps if set.
    """

    def __init__(self, size: int) -> None:
        self.norms = torch.zeros(size, dtype=torch.float64)
        self.ever_selected = torch.zeros(size, dtype=torch.bool)
        self.epoch_sum = torch.zeros(size, dtype=torch.float64)
        self.epoch_count = torch.zeros(size, dtype=torch.long)
        self.epochs_done = 0

    def record(self, positions: torch.Tensor, norms: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """Add one backward's norms; the sums live on the gradients' device (no host sync per step).

        `counted` (bool per entry, default all) says which entries count as a measurement; the others
        must carry a norm of 0.
        """
        wide = wide_float(norms.device)
        if self.epoch_sum.device != norms.device or self.epoch_sum.dtype != wide:
            self.epoch_sum = self.epoch_sum.to(norms.device, wide)
            self.epoch_count = self.epoch_count.to(norms.device)
        positions = positions.to(norms.device)
        self.epoch_sum.index_add_(0, positions, norms.to(self.epoch_sum.dtype))
        ones = torch.ones_like(positions) if counted is None else counted.to(torch.long)
        self.epoch_count.index_add_(0, positions, ones)

    def end_epoch(self, selected: torch.Tensor, rescale: bool = False) -> None:
        """Fold the epoch's sums into N[c]; `rescale` first brings the older values to this epoch's scale."""
        self.epoch_sum, self.epoch_count = self.epoch_sum.cpu().to(torch.float64), self.epoch_count.cpu()
        seen = selected[self.epoch_count[selected] > 0]
        fresh = self.epoch_sum[seen] / self.epoch_count[seen]
        if rescale:
            self.norms *= self.scale_change(seen, fresh)
        self.norms[seen] = fresh
        self.ever_selected[selected] = True
        self.epochs_done += 1
        if self.epochs_done == 1 and bool(self.ever_selected.any()):
            self.norms[~self.ever_selected] = self.norms[self.ever_selected].max()
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    def scale_change(self, seen: torch.Tensor, fresh: torch.Tensor) -> float:
        """How much norms grew since they were last measured: the median of new / old over re-measured channels.

        [ours] Norms grow ~3x in warm-up and from epoch 1 to 2 (spec section 8), so without this a
        channel measured long ago (or the exploration value) competes at a stale, smaller scale.
        Channels measured for the first time say nothing about the change; with none re-measured the
        scale is kept (1.0).
        """
        old = self.norms[seen]
        again = self.ever_selected[seen] & (old > 0) & (fresh > 0)
        if not bool(again.any()):
            return 1.0
        return float((fresh[again] / old[again]).median())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "norms": self.norms.clone(),
            "ever_selected": self.ever_selected.clone(),
            "epoch_sum": self.epoch_sum.cpu().clone(),
            "epoch_count": self.epoch_count.cpu().clone(),
            "epochs_done": torch.tensor(self.epochs_done),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("norms", "ever_selected", "epoch_sum", "epoch_count"):
            getattr(self, key).copy_(state[key])
        self.epochs_done = int(state["epochs_done"])
