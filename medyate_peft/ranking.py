"""Layer importance (LaRa, RGN) and the pre-selection of the K layers that form the channel pool.

Spec section 3. LaRa_i = ||dL/dW_i|| / sum_c cost(i, c); RGN_i = sum_c ||dL/dW_i[:, c]|| / cost(i, c);
both cumulated over a short preliminary fine-tuning with full gradients.
"""

from __future__ import annotations

from .budget import LayerCost


def select_by_alpha(costs: list[LayerCost], lara: dict[str, float], budget: int, alpha_opt: float) -> list[str]:
    """MeDyate: layers by LaRa descending; the smallest K with B / M_K <= alpha_opt (all if none)."""
    by_name = {c.name: c for c in costs}
    ranked = sorted((n for n in by_name if n in lara), key=lambda n: lara[n], reverse=True)
    chosen, total = [], 0
    for name in ranked:
        chosen.append(name)
        total += by_name[name].layer_slots
        if budget / total <= alpha_opt:
            break
    return chosen


def select_by_rgn(costs: list[LayerCost], rgn: dict[str, float], coverage: float) -> list[str]:
    """TraDy: layers by RGN descending; the smallest top-K holding `coverage` of the cumulative RGN."""
    names = [c.name for c in costs if c.name in rgn]
    ranked = sorted(names, key=lambda n: rgn[n], reverse=True)
    total = sum(rgn[n] for n in ranked)
    chosen, acc = [], 0.0
    for name in ranked:
        chosen.append(name)
        acc += rgn[name]
        if acc >= coverage * total:
            break
    return chosen
