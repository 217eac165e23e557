"""Inputs larger than planned: longer sequences or bigger images than the batch the plan was made on.

A plan charges each layer's activation slots per sample as seen when it was made. Training on
larger inputs makes every selected channel store more, so the budget no longer holds. `GrowthWatch`
keeps, per pool layer, the largest per-sample activation seen in training; the tuner warns once
when the live selection overshoots the budget and re-costs the pool at the next `resample()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .budget import LayerCost
from .sampling import ChannelPool


@dataclass
class GrowthWatch:
    """Per pool layer: planned and largest live activation slots per sample."""

    planned: torch.Tensor  # int64, one per pool layer
    weight: torch.Tensor  # int64, weight slots per channel
    peak: torch.Tensor  # int64, the largest live activation slots per sample seen
    warned: bool = False

    @classmethod
    def for_pool(cls, pool: ChannelPool) -> GrowthWatch:
        planned = torch.tensor([c.activation_slots for c in pool.costs], dtype=torch.long)
        weight = torch.tensor([c.weight_slots for c in pool.costs], dtype=torch.long)
        return cls(planned=planned, weight=weight, peak=planned.clone())

    def observe(self, live: list[int | None]) -> None:
        """Record one training forward's per-sample activation slots (None: layer not reached)."""
        seen = torch.tensor([-1 if v is None else v for v in live], dtype=torch.long)
        torch.maximum(self.peak, seen, out=self.peak)

    def selection_slots(self, pool: ChannelPool, selected: torch.Tensor) -> tuple[int, int]:
        """(slots per sample of the selected pool positions at the peak sizes, at the planned sizes)."""
        counts = torch.bincount(pool.layer[selected], minlength=len(pool.costs))
        return int((counts * (self.weight + self.peak)).sum()), int((counts * (self.weight + self.planned)).sum())

    def sync(self) -> None:
        """Under DDP, every rank takes the largest peak of any rank (ranks may see different lengths)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            peak = self.peak.to(device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            self.peak.copy_(peak)

    def grown(self) -> bool:
        return bool((self.peak > self.planned).any())

    def grown_costs(self, costs: tuple[LayerCost, ...]) -> list[LayerCost]:
        """The pool's costs at the peak sizes (never below the plan)."""
        return [
            dataclasses.replace(c, activation_slots=int(max(c.activation_slots, p)))
            for c, p in zip(costs, self.peak.tolist(), strict=True)
        ]
