"""The channel-selection strategies of the papers, as data (spec section 4).

Each strategy is: which layers form the pool, how the channel order is drawn, and whether the draw
is repeated every epoch. The oracles need a full gradient (impractical on device: they are upper
bounds for comparison): the first from `plan(full_gradient=closure)` or, without it, from the first
`ranking_batches` training batches; the dynamic ones another at every `resample(full_gradient=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    layers: str  # "all": every candidate layer | "lara": MeDyate's alpha rule | "rgn": TraDy's 97 % rule
    order: str  # "uniform" | "weighted" (by measured norms) | "det_rgn" | "prob_raw" (full-gradient oracles)
    dynamic: bool  # re-draw every epoch
    summary: str

    @property
    def needs_full_gradient(self) -> bool:
        return self.order in ("det_rgn", "prob_raw")


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
    )
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
