"""Which layers form the channel pool: each strategy's K rule, the cost-aware variants, and a pool's make-up.

The papers' rules (spec section 3): MeDyate's alpha rule over LaRa, TraDy's 97 % of cumulative RGN.
Two options beyond the papers [ours], because at larger budgets the alpha rule reaches the early,
high-resolution layers where a channel is almost all stored activation (spec section 8):

- `lara_within_rgn`: the alpha rule walks LaRa's order over the RGN-coverage set only;
- `max_activation_share`: walking the ranking, a layer is skipped where it would lift the pool's
  activation share (stored-activation slots / all slots of the pool's layers) above the cap; the K
  rule then applies to the layers kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .budget import LayerCost
from .ranking import select_by_alpha, select_by_rgn
from .strategies import Strategy


def activation_slots(cost: LayerCost) -> int:
    """C^A of every input channel of the layer: what training all of it stores."""
    return cost.in_channels * cost.activation_slots


def activation_share(costs: list[LayerCost]) -> float:
    """Share of the layers' full training cost that is stored activation (0 for no layer)."""
    total = sum(c.layer_slots for c in costs)
    return sum(activation_slots(c) for c in costs) / total if total else 0.0


def cap_activation_share(ranked: list[LayerCost], cap: float) -> list[LayerCost]:
    """Layers in ranking order, skipping each one that would lift the kept set's activation share above `cap`."""
    kept: list[LayerCost] = []
    stored, total = 0, 0
    for cost in ranked:
        if (stored + activation_slots(cost)) / (total + cost.layer_slots) <= cap:
            kept.append(cost)
            stored, total = stored + activation_slots(cost), total + cost.layer_slots
    if not kept:
        lowest = min(activation_slots(c) / c.layer_slots for c in ranked)
        raise ValueError(
            f"max_activation_share={cap} admits no layer: the lowest activation share of a ranked layer is "
            f"{lowest:.3f}; raise max_activation_share (or leave it None)"
        )
    return kept


def preselect(
    strategy: Strategy,
    costs: list[LayerCost],
    ranking: Mapping[str, Any] | None,
    budget: int,
    alpha_opt: float,
    rgn_coverage: float,
    lara_within_rgn: bool = False,
    max_activation_share: float | None = None,
) -> list[LayerCost]:
    """The pool's layers, in network order (`costs` order)."""
    if strategy.layers == "all":
        return costs
    score = ranking[strategy.layers]
    candidates = costs
    if lara_within_rgn:
        inside = set(select_by_rgn(costs, ranking["rgn"], rgn_coverage))
        candidates = [c for c in costs if c.name in inside]
    if max_activation_share is not None:
        ranked = sorted(candidates, key=lambda c: score[c.name], reverse=True)
        kept = {c.name for c in cap_activation_share(ranked, max_activation_share)}
        candidates = [c for c in candidates if c.name in kept]
    if strategy.layers == "lara":
        names = select_by_alpha(candidates, score, budget, alpha_opt)
    else:
        names = select_by_rgn(candidates, score, rgn_coverage)
    chosen = set(names)
    return [c for c in costs if c.name in chosen]


@dataclass(frozen=True)
class PoolSummary:
    """What a pool holds: its layers, their full cost, the share of it that is activation, the earliest layer."""

    layers: int
    candidate_layers: int
    slots: int
    activation_share: float
    earliest_layer: str
    earliest_position: int  # 0-based, among the candidate layers in network order

    def describe(self) -> str:
        return (
            f"pool: {self.layers} of {self.candidate_layers} layers, {self.slots:,} slots, "
            f"{self.activation_share:.1%} of them stored activation; earliest layer {self.earliest_layer} "
            f"(candidate {self.earliest_position + 1} of {self.candidate_layers} in network order)"
        )


def summarize_pool(pool: list[LayerCost] | tuple[LayerCost, ...], candidates: list[LayerCost]) -> PoolSummary:
    names = [c.name for c in candidates]
    pool = list(pool)
    earliest = min(pool, key=lambda c: names.index(c.name))
    return PoolSummary(
        layers=len(pool),
        candidate_layers=len(candidates),
        slots=sum(c.layer_slots for c in pool),
        activation_share=activation_share(pool),
        earliest_layer=earliest.name,
        earliest_position=names.index(earliest.name),
    )
