"""The channel-selection strategies of the papers, as data (spec section 4).

Each strategy is: which layers form the pool, how the channel order is drawn, and whether the draw
is repeated every epoch. The oracles need a full gradient (impractical on device: they are upper
bounds for comparison): the first from `plan(full_gradient=closure)` or, without it, from the first
`ranking_batches` training batches; the dynamic ones another at every `resample(full_gradient=...)`.
A closure is called `full_gradient_batches` times per full gradient, each call the loss of the next batch.

`channel_order` turns a strategy and what was measured into the order that `greedy_fill` walks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import deterministic_order, uniform_order, weighted_order

DRAW_WEIGHTS = ("norm", "norm_per_cost")


@dataclass(frozen=True)
class Strategy:
    name: str
    layers: str  # "all": every candidate layer | "lara": MeDyate's alpha rule | "rgn": TraDy's 97 % rule
    order: str  # "uniform" | "weighted" (by measured norms) | "det_rgn" | "det_raw" | "prob_raw" (full-gradient oracles)
    dynamic: bool  # re-draw every epoch
    summary: str

    @property
    def needs_full_gradient(self) -> bool:
        return self.order in ("det_rgn", "det_raw", "prob_raw")


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("medyate", "lara", "weighted", True,
                 "MeDyate: LaRa top-K layers, channels ∝ measured gradient norm each epoch; no extra backward."),
        Strategy("trady", "rgn", "uniform", True,
                 "TraDy (D-TopK Random): RGN 97 % layers, uniform channels re-drawn each epoch; no extra cost."),
        Strategy("topk_random", "rgn", "uniform", False,
                 "S-TopK Random: RGN 97 % layers, uniform channels drawn once; no extra cost."),
        Strategy("full_random", "all", "uniform", True,
                 "D-FullRandom: uniform channels over all candidate layers, re-drawn each epoch; no extra cost."),
        Strategy("static_random", "all", "uniform", False,
                 "S-FullRandom: uniform channels over all candidate layers, drawn once; no extra cost."),
        Strategy("det_rgn", "all", "det_rgn", True,
                 "D-DetRGN oracle: top channels by RGN from a full gradient each epoch; one dense backward/epoch."),
        Strategy("static_det_rgn", "all", "det_rgn", False,
                 "S-DetRGN oracle: top channels by RGN from one full gradient at the start; one dense backward."),
        Strategy("prob_raw", "lara", "prob_raw", True,
                 "LaRa ProbRaw oracle: LaRa layers, channels ∝ raw full-gradient norm each epoch; one dense backward/epoch."),
        # The ablations of MeDyate's Fig. 8: one of its two parts (pool, draw) swapped at a time.
        Strategy("lara_trady", "lara", "uniform", True,
                 "LaRa TraDy: LaRa top-K layers (alpha rule), uniform channels re-drawn each epoch; no extra cost."),
        Strategy("prev_medyate", "rgn", "weighted", True,
                 "Prev MeDyate: RGN 97 % layers, channels ∝ measured gradient norm each epoch; no extra backward."),
        Strategy("lara_det_raw", "lara", "det_raw", True,
                 "LaRa DetRaw oracle: LaRa layers, top channels by raw full-gradient norm each epoch; one dense "
                 "backward/epoch."),
    )
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def channel_order(
    strategy: Strategy,
    slots: torch.Tensor,
    generator: torch.Generator,
    measured: torch.Tensor | None,
    full_norms: torch.Tensor | None,
    draw_weights: str = "norm",
) -> torch.Tensor:
    """Pool positions in the order a draw takes them (before the budget's greedy fill).

    `measured`: N[c] from the sparse backward (None before the first epoch ended: a uniform draw);
    `full_norms`: n(i, c) of every pool channel from a full gradient (oracles). `draw_weights`
    "norm_per_cost" draws ∝ N[c] / cost(i, c) [ours]: raw norms are ~50x larger in the early,
    activation-heavy layers, so ∝ N[c] spends the budget on few, expensive channels (spec section 8).
    """
    if draw_weights not in DRAW_WEIGHTS:
        raise ValueError(f"draw_weights must be one of {DRAW_WEIGHTS}, got {draw_weights!r}")
    if strategy.needs_full_gradient and full_norms is None:
        raise RuntimeError(f"strategy {strategy.name!r} draws from a full gradient, and none was measured")
    if strategy.order == "det_rgn":
        return deterministic_order(full_norms / slots)
    if strategy.order == "det_raw":
        return deterministic_order(full_norms)
    if strategy.order == "prob_raw":
        return weighted_order(full_norms, generator)
    if strategy.order == "weighted" and measured is not None:
        return weighted_order(measured / slots if draw_weights == "norm_per_cost" else measured, generator)
    return uniform_order(len(slots), generator)


def resample_due(every: int | None, step: int | None = None) -> bool:
    """Whether to re-draw now: at an epoch end (`step` None) by default, every `every` optimizer steps if set.

    `step` counts optimizer steps from the start of training (1 after the first), so a resumed run
    re-draws at the same steps as an uninterrupted one.
    """
    if every is None:
        return step is None
    return step is not None and step % every == 0
