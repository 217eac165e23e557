"""The method's planner: per adapter the channel pool, the budgeted draws and their layout in the flat vector.

Method core only: costs (`budget`), rankings (`ranking`), the pool's layers (`pools`), the draw order
(`strategies`, `sampling`) and the step scope's charges (`step_budget`) go in; a selection and its
place in the flat trainable vector come out. Nothing here knows the PEFT layer: the tuner
(`medyate/model.py`) measures costs on its wrapped layers, calls these functions, and maps the
layout onto its layers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from . import guards
from .budget import LayerCost, slots_to_kb
from .growth import GrowthWatch
from .oracles import DenseGradientProbe
from .pools import preselect
from .ranking import GradientStats, check_architecture, load_ranking, scores_for_costs
from .sampling import ChannelPool, NormTracker, greedy_fill
from .sparse_probe import SparseGradientProbe
from .step_budget import StepCosts
from .strategies import channel_order, get_strategy

logger = logging.getLogger(__name__)
VECTOR_DRAWS = 8  # simulated draws the step scope sizes its flat vector on


class PlanSettings(Protocol):
    """The fields of an adapter's config that planning reads (MeDyateConfig has them)."""

    budget_kb: float
    bytes_per_slot: int
    strategy: str
    layer_ranking: Any
    alpha_opt: float
    rgn_coverage: float
    lara_within_rgn: bool
    max_activation_share: float | None
    draw_weights: str
    rescale_norms: bool


@dataclass(frozen=True)
class SegmentLayout:
    """The live selection in the flat vector: per layer its slot count and channels, in vector order."""

    names: tuple[str, ...]
    sizes: list[int]  # slots of each layer's segment
    channels: tuple[torch.Tensor, ...]  # each layer's selected input channels (CPU)
    positions: torch.Tensor  # pool position of every selected channel, in vector order (on the vector's device)

    @property
    def used(self) -> int:
        return sum(self.sizes)


@dataclass
class AdapterPlan:
    """Sampling state of one adapter: the channel pool, its norms, the RNG and the live selection."""

    budget: int
    generator: torch.Generator
    pool: ChannelPool | None = None
    tracker: NormTracker | None = None
    selected: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    epoch: int = 0
    probe: DenseGradientProbe | SparseGradientProbe | None = None  # open while the first batches rank layers
    full_norms: torch.Tensor | None = None  # oracles: n(i, c) of every pool channel from a full gradient
    step: StepCosts | None = None  # budget_scope="step": the frozen path and head charged beside the channels
    growth: GrowthWatch | None = None  # live activation sizes of the pool's layers against the plan's
    layout: SegmentLayout | None = None  # how the flat vector's slots map to pool channels
    anomalies: guards.ChannelGradientWatch = field(default_factory=guards.ChannelGradientWatch)  # detect_anomalies


def kb_up(slots: int, bytes_per_slot: int) -> float:
    """kB for `slots`, rounded up to 0.01 kB so that the value shown is enough."""
    return math.ceil(slots_to_kb(slots, bytes_per_slot) * 100) / 100


def check_costs(plan: AdapterPlan, settings: PlanSettings, costs: list[LayerCost]) -> None:
    """Refuse a budget that cannot hold one channel (or, in the step scope, one whole step)."""
    if plan.step is not None:  # says the smallest budget a whole step fits in
        plan.step.check(costs, plan.budget, settings.budget_kb, settings.bytes_per_slot)
    smallest = min(c.channel_slots for c in costs)
    if smallest > plan.budget:
        raise ValueError(
            f"budget_kb={settings.budget_kb} ({plan.budget} slots) is too small for any single channel; the "
            f"cheapest channel needs {smallest} slots: use budget_kb >= {kb_up(smallest, settings.bytes_per_slot)}"
        )


def ranking_from_stats(settings: PlanSettings, stats: GradientStats, costs: list[LayerCost],
                       source: str | None = None) -> dict[str, Any] | None:
    """Reduce the measured gradients over ranks; the layer ranking they give if the strategy needs one and has none."""
    stats.all_reduce(costs)
    if stats.steps == 0:  # every measured batch was skipped as non-finite, or none reached backward
        raise RuntimeError(
            "MeDyate measured no finite dense gradient in its first training batch(es) (each had NaN/inf, "
            "e.g. fp16 overflows, and was left out): pass layer_ranking=... from rank_layers (run in fp32), "
            "or raise MeDyateConfig(ranking_batches=...)"
        )
    if get_strategy(settings.strategy).layers == "all" or settings.layer_ranking is not None:
        return None
    return stats.ranking(costs, source=source or f"dense gradients of the first {stats.steps} training batch(es)")


def pool_layers(settings: PlanSettings, costs: list[LayerCost], budget: int,
                weight_shapes: Mapping[str, list[int]]) -> list[LayerCost]:
    """The strategy's pre-selected layers; a ranking is checked against the layers' `weight_shapes` first."""
    strategy = get_strategy(settings.strategy)
    ranking = None
    if strategy.layers != "all":
        ranking = load_ranking(settings.layer_ranking)
        check_architecture(ranking, {c.name: weight_shapes[c.name] for c in costs})
        lara, rgn = scores_for_costs(ranking, costs)
        ranking = {**ranking, "lara": lara, "rgn": rgn}
    return preselect(strategy, costs, ranking, budget, settings.alpha_opt, settings.rgn_coverage,
                     settings.lara_within_rgn, settings.max_activation_share)


def build(plan: AdapterPlan, settings: PlanSettings, costs: list[LayerCost], weight_shapes: Mapping[str, list[int]],
          stats: GradientStats | None = None) -> None:
    """Pre-select the pool's layers, start tracking their norms and draw the first selection."""
    pool_costs = pool_layers(settings, costs, plan.budget, weight_shapes)
    pool_smallest = min(c.channel_slots for c in pool_costs)
    if pool_smallest > plan.budget:
        raise ValueError(
            f"budget_kb={settings.budget_kb} ({plan.budget} slots) is too small for any channel of the layers "
            f"strategy {settings.strategy!r} pre-selected; their cheapest channel needs {pool_smallest} slots: use "
            f"budget_kb >= {kb_up(pool_smallest, settings.bytes_per_slot)}"
        )
    if plan.step is not None:
        plan.step.check(pool_costs, plan.budget, settings.budget_kb, settings.bytes_per_slot)
    plan.pool = ChannelPool.build(pool_costs)
    plan.growth = GrowthWatch.for_pool(plan.pool)
    plan.tracker = NormTracker(len(plan.pool))
    plan.full_norms = stats.pool_vector(pool_costs) if get_strategy(settings.strategy).needs_full_gradient else None
    total = sum(c.layer_slots for c in pool_costs)
    if total <= plan.budget:
        logger.warning(
            "MeDyate: the budget (%d slots) covers every candidate channel (%d slots); all are trained",
            plan.budget, total,
        )
    if plan.step is not None:
        size_vector(plan, settings)
    draw(plan, settings)


def _orders(plan: AdapterPlan, settings: PlanSettings, count: int) -> list[torch.Tensor]:
    """The orders of the strategy's next `count` draws (one for a static strategy), the plan's RNG untouched."""
    strategy = get_strategy(settings.strategy)
    generator = torch.Generator()
    generator.set_state(plan.generator.get_state())
    measured = plan.tracker.norms if plan.tracker.epochs_done > 0 else None
    return [channel_order(strategy, plan.pool.slots, generator, measured, plan.full_norms, settings.draw_weights)
            for _ in range(count if strategy.dynamic else 1)]


def size_vector(plan: AdapterPlan, settings: PlanSettings) -> None:
    """Fix the step scope's flat vector: of the weight slots that `VECTOR_DRAWS` simulated draws take when
    weights are paid per channel, the size under which those draws, capped by it, train the most slots.

    Too small a vector leaves weight-heavy draws short of the budget; too large a one is paid for by
    every draw and left partly unused by light ones. A static strategy draws once: its size is that
    draw's, and the draw is the same as with weights paid per channel.
    """
    step = dataclasses.replace(plan.step, vector=None)
    orders = _orders(plan, settings, VECTOR_DRAWS)
    sizes = {int(step.pool_weights(plan.pool)[step.fill(order, plan.pool, plan.budget)].sum()) for order in orders}

    def trained(size: int) -> int:
        capped = dataclasses.replace(step, vector=size)
        return sum(step.used(plan.pool, capped.fill(order, plan.pool, plan.budget)) for order in orders)

    plan.step = dataclasses.replace(step, vector=max(sorted(sizes), key=trained))  # ties: the smallest


def vector_slots(plan: AdapterPlan, capacity: int) -> int:
    """Slots the flat vector needs: under the step scope the first draw's weights, else `capacity` (the budget's)."""
    return capacity if plan.step is None or plan.step.vector is None else plan.step.vector


def draw(plan: AdapterPlan, settings: PlanSettings) -> None:
    """The next selection: the strategy's order, filled greedily within the budget (or the step's)."""
    measured = plan.tracker.norms if plan.tracker.epochs_done > 0 else None
    order = channel_order(get_strategy(settings.strategy), plan.pool.slots, plan.generator, measured,
                          plan.full_norms, settings.draw_weights)
    if plan.step is not None:
        plan.selected = plan.step.fill(order, plan.pool, plan.budget)
    else:
        plan.selected = greedy_fill(order, plan.pool.slots, plan.budget)


def selected_layers(pool: ChannelPool, selected: torch.Tensor) -> list[tuple[str, torch.Tensor, int]]:
    """(layer name, its selected channels, its weight slots) in the flat vector's order (the pool's)."""
    chosen = pool.to_selection(selected)
    return [(c.name, chosen[c.name], len(chosen[c.name]) * c.weight_slots) for c in pool.costs if c.name in chosen]


def segment_layout(plan: AdapterPlan, capacity: int, device: torch.device | str) -> SegmentLayout:
    """Consecutive segments at the start of a flat vector of `capacity` slots, one per selected layer."""
    entries = selected_layers(plan.pool, plan.selected)
    sizes = [slots for _, _, slots in entries]
    if sum(sizes) > capacity:
        raise AssertionError(f"selection needs {sum(sizes)} weight slots, flat vector holds {capacity}")
    starts = plan.pool.offsets()
    positions = torch.cat([starts[name] + idx for name, idx, _ in entries]) if entries else torch.zeros(0)
    plan.layout = SegmentLayout(
        names=tuple(name for name, _, _ in entries),
        sizes=sizes,
        channels=tuple(idx for _, idx, _ in entries),
        positions=positions.to(device=device, dtype=torch.long),
    )
    return plan.layout


def record_gradient(plan: AdapterPlan, grad: torch.Tensor, strict: bool) -> None:
    """Add one backward's channel norms from the flat vector's gradient; `strict` raises on NaN/inf.

    The norms of all selected channels come out of the one gradient tensor, so nothing moves to the
    host per layer; the sums move once, at `resample()`. The NaN/inf flag is read on the host lazily
    (`guards.ChannelGradientWatch`: every backward on the CPU, every few on an accelerator).
    """
    layout = plan.layout
    if layout is None or plan.tracker is None or not layout.used:
        return
    rows = grad.detach()[: layout.used].split(layout.sizes)
    norms = torch.cat([g.view(len(c), -1).norm(dim=1) for g, c in zip(rows, layout.channels, strict=True)])
    finite = torch.isfinite(norms)
    if strict:
        plan.anomalies.note(layout, norms, finite, plan.epoch)
    # A skipped (GradScaler) step says nothing about its channels: non-finite norms are not counted.
    plan.tracker.record(layout.positions, torch.where(finite, norms, 0.0), counted=finite)


def sync_norms(tracker: NormTracker) -> None:
    """Under DDP, sum the measured channel norms and counts over ranks so every rank draws the same."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        for buf in (tracker.epoch_sum, tracker.epoch_count):
            reduced = buf.to(device=device, dtype=torch.float64)
            dist.all_reduce(reduced)
            buf.copy_(reduced)


def end_epoch(plan: AdapterPlan, settings: PlanSettings) -> None:
    """Fold the epoch's norms (summed over ranks by `sync_norms` first) into the tracker and count the epoch."""
    plan.tracker.end_epoch(plan.selected, rescale=settings.rescale_norms)
    plan.epoch += 1


def charge(plan: AdapterPlan, pool: ChannelPool) -> int:
    """Slots the selection is charged at `pool`'s costs: the papers' per-channel slots, or the step scope's."""
    if plan.step is not None:
        return plan.step.used(pool, plan.selected)
    return int(pool.slots[plan.selected].sum())


def overshoot(plan: AdapterPlan) -> tuple[int, int] | None:
    """(live, planned) slots of the selection if it overshoots the budget at the largest inputs seen, else None."""
    live = charge(plan, ChannelPool.build(plan.growth.grown_costs(plan.pool.costs)))
    return (live, charge(plan, plan.pool)) if live > plan.budget else None


def recost_for_growth(plan: AdapterPlan, adapter_name: str) -> bool:
    """At resample: re-cost the pool at the largest inputs seen; True if the selection no longer fits."""
    plan.growth.sync()  # a collective under DDP: every rank calls it at every resample
    if not plan.growth.grown():
        return False
    plan.pool = ChannelPool.build(plan.growth.grown_costs(plan.pool.costs))  # same channels, same positions
    plan.growth = GrowthWatch.for_pool(plan.pool)
    live = charge(plan, plan.pool)
    logger.info("MeDyate: re-planned adapter %r for the larger training inputs seen (channel costs "
                "re-measured%s)", adapter_name, "; the selection is re-drawn" if live > plan.budget else "")
    return live > plan.budget


def state_dict(plan: AdapterPlan) -> dict[str, Any]:
    """The plan's part of a training state: epoch, RNG, step costs and, once planned, pool, norms and selection."""
    state: dict[str, Any] = {
        "epoch": plan.epoch,
        "generator": plan.generator.get_state(),
        "pool": None,
        "step": None if plan.step is None else dataclasses.asdict(plan.step),
    }
    if plan.pool is not None:
        state["pool"] = [dataclasses.asdict(c) for c in plan.pool.costs]
        state["tracker"] = plan.tracker.state_dict()
        state["selected"] = plan.selected.clone()
    return state


def checked_pool(state: dict[str, Any]) -> ChannelPool | None:
    """The pool of a training state (None: saved before planning), after `check_state`; nothing changes."""
    check_state(state)
    return None if state["pool"] is None else ChannelPool.build([LayerCost(**c) for c in state["pool"]])


def load_state_dict(plan: AdapterPlan, state: dict[str, Any], pool: ChannelPool | None) -> None:
    """Restore the plan's part of a training state (`pool` from `checked_pool`)."""
    plan.epoch = state["epoch"]
    plan.generator.set_state(state["generator"])
    if state.get("step") is not None:
        plan.step = StepCosts(**{**state["step"], "order": tuple(state["step"]["order"])})
    if pool is not None:
        plan.pool = pool
        plan.growth = GrowthWatch.for_pool(pool)
        plan.tracker = NormTracker(len(pool))
        plan.tracker.load_state_dict(state["tracker"])
        plan.selected = state["selected"].clone()


def check_state(state: dict[str, Any]) -> None:
    """A tampered training state must not resume: epoch, trained values and selection are checked."""
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"checkpoint's epoch {epoch!r} is not a count of epochs; the file is damaged")
    if not bool(torch.isfinite(state["values"]).all()):
        raise guards.NonFiniteError("checkpoint's trained values hold NaN/inf; resume from an earlier checkpoint")
    if state["pool"] is None:
        return
    size, selected = sum(c["in_channels"] for c in state["pool"]), state["selected"]
    if (
        selected.dim() != 1
        or selected.is_floating_point()
        or (len(selected) and (int(selected.min()) < 0 or int(selected.max()) >= size))
        or len(torch.unique(selected)) != len(selected)
    ):
        raise ValueError(f"checkpoint's selected channels are not distinct indices into its pool of {size} channels; "
                         "the file is damaged")
