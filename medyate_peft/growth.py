"""Inputs larger than planned: longer sequences or bigger images than the batch the plan was made on.

A plan charges each layer's activation slots per sample as seen when it was made. Training on
larger inputs makes every selected channel store more, so the budget no longer holds. `GrowthWatch`
keeps, per pool layer, the largest per-sample activation seen in training; the tuner warns once
when the live selection overshoots the budget and re-costs the pool at the next `resample()`.
Plain lists: `observe` runs after every training forward and must cost next to nothing.
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

    planned: list[int]
    peak: list[int]  # the largest live activation slots per sample seen
    warned: bool = False

    @classmethod
    def for_pool(cls, pool: ChannelPool) -> GrowthWatch:
        planned = [c.activation_slots for c in pool.costs]
        return cls(planned=planned, peak=list(planned))

    def observe(self, live: list[int | None]) -> list[int] | None:
        """Record one training forward's per-sample activation slots (None: not reached).

        Returns the peaks before it if any grew (to undo a refused batch), else None.
        """
        before = None
        for i, value in enumerate(live):
            if value is not None and value > self.peak[i]:
                before = before or list(self.peak)
                self.peak[i] = value
        return before

    def largest_growth(self) -> int:
        """Pool layer index whose activation grew the most."""
        return max(range(len(self.peak)), key=lambda i: self.peak[i] - self.planned[i])

    def sync(self) -> None:
        """Under DDP, every rank takes the largest peak of any rank (ranks may see different lengths)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            peak = torch.tensor(self.peak, dtype=torch.long, device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            self.peak = peak.tolist()

    def grown(self) -> bool:
        return any(p > q for p, q in zip(self.peak, self.planned, strict=True))

    def grown_costs(self, costs: tuple[LayerCost, ...]) -> list[LayerCost]:
        """The pool's costs at the peak sizes (never below the plan)."""
        return [dataclasses.replace(c, activation_slots=max(c.activation_slots, p))
                for c, p in zip(costs, self.peak, strict=True)]
