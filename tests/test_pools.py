"""Cost-aware options beyond the papers: pools kept off activation-heavy layers, norm/cost draws, rescaled norms."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_ranking import INPUT, net

import medyate_peft  # noqa: F401
from medyate_peft import STRATEGIES, MeDyateConfig
from medyate_peft.budget import LayerCost
from medyate_peft.pools import activation_share, preselect, summarize_pool
from medyate_peft.ranking import select_by_alpha
from medyate_peft.sampling import NormTracker
from medyate_peft.strategies import channel_order


def conv(name: str, in_channels: int, out_channels: int, hw: int) -> LayerCost:
    return LayerCost(name, "conv", in_channels, out_channels, 1, 1, hw)


# Network order: an early high-resolution layer (a channel is 97 % activation), then cheaper later ones.
COSTS = [conv("early", 8, 32, 1024), conv("mid", 16, 64, 64), conv("late", 32, 128, 16), conv("last", 64, 256, 4)]
# LaRa puts the early layer second; RGN ranks it last and leaves it out of its 97 % set.
LARA = {"last": 4.0, "early": 3.0, "late": 2.0, "mid": 1.0}
RGN = {"last": 60.0, "late": 30.0, "mid": 9.0, "early": 0.5}
RANKING = {"lara": LARA, "rgn": RGN}
BUDGET = 4_000


def pool(strategy: str, **options) -> list[str]:
    return [c.name for c in preselect(STRATEGIES[strategy], COSTS, RANKING, BUDGET, 0.2, 0.97, **options)]


def test_papers_alpha_rule_reaches_the_early_layer_and_the_options_keep_it_out():
    assert pool("medyate") == select_by_alpha(COSTS, LARA, BUDGET, 0.2)[::-1] == ["early", "last"]
    assert pool("trady") == ["mid", "late", "last"]
    # the alpha rule inside the RGN set: LaRa's order over {last, late, mid}, smallest K with B / M_K <= 0.2
    assert pool("medyate", lara_within_rgn=True) == ["late", "last"]
    capped = preselect(STRATEGIES["medyate"], COSTS, RANKING, BUDGET, 0.2, 0.97, max_activation_share=0.3)
    assert [c.name for c in capped] == ["late", "last"] and activation_share(capped) <= 0.3
    assert activation_share([c for c in COSTS if c.name in pool("medyate")]) > 0.3
    # a cap on a TraDy pool (mid is skipped too): the K rule then covers 97 % of the RGN of the layers kept
    assert pool("trady", max_activation_share=0.05) == ["late", "last"]


def test_a_cap_that_admits_no_layer_says_so():
    with pytest.raises(ValueError, match=r"max_activation_share=0.01 admits no layer: the lowest .* is 0.015"):
        pool("medyate", max_activation_share=0.01)


def test_pool_summary_names_its_activation_share_and_earliest_layer():
    chosen = [c for c in COSTS if c.name in ("early", "last")]
    summary = summarize_pool(chosen, COSTS)
    stored = 8 * 1024 + 64 * 4
    assert summary.slots == 8 * (32 + 1024) + 64 * (256 + 4)
    assert summary.activation_share == pytest.approx(stored / summary.slots)
    assert (summary.earliest_layer, summary.earliest_position, summary.layers) == ("early", 0, 2)
    assert "earliest layer early (candidate 1 of 4" in summary.describe()


def test_norm_per_cost_draws_follow_norm_over_cost():
    slots = torch.tensor([100, 1])
    measured = torch.tensor([10.0, 1.0], dtype=torch.float64)  # raw: channel 0 ten times likelier
    g = torch.Generator().manual_seed(0)
    trials = 2000
    first = {w: sum(int(channel_order(STRATEGIES["medyate"], slots, g, measured, None, w)[0]) for _ in range(trials))
             for w in ("norm", "norm_per_cost")}
    # P(first = channel 1): 1/11 with raw norms, 1 / 1.1 with norm/cost (0.1 vs 1)
    assert abs(first["norm"] / trials - 1 / 11) < 0.03
    assert abs(first["norm_per_cost"] / trials - 1 / 1.1) < 0.03


def test_rescaled_norms_bring_old_values_and_exploration_to_the_current_scale():
    def run(rescale: bool) -> torch.Tensor:
        tracker = NormTracker(4)
        tracker.record(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
        tracker.end_epoch(torch.tensor([0, 1]), rescale=rescale)  # exploration: channels 2, 3 get 2.0
        tracker.record(torch.tensor([1, 2]), torch.tensor([6.0, 5.0]))  # channel 1 grew 3x
        tracker.end_epoch(torch.tensor([1, 2]), rescale=rescale)
        return tracker.norms

    assert run(False).tolist() == [1.0, 6.0, 5.0, 2.0]
    assert run(True).tolist() == [3.0, 6.0, 5.0, 6.0]  # channel 0 and the exploration value x3; 2 is measured


def test_options_for_the_wrong_strategy_are_errors_not_no_ops():
    with pytest.raises(ValueError, match="act on measured-norm draws"):
        MeDyateConfig(strategy="trady", draw_weights="norm_per_cost")
    with pytest.raises(ValueError, match="act on measured-norm draws"):
        MeDyateConfig(strategy="lara_trady", rescale_norms=True)
    with pytest.raises(ValueError, match="draw_weights must be one of"):
        MeDyateConfig(draw_weights="cost")
    with pytest.raises(ValueError, match="lara_within_rgn applies the alpha rule"):
        MeDyateConfig(strategy="trady", lara_within_rgn=True)
    with pytest.raises(ValueError, match="pools every layer"):
        MeDyateConfig(strategy="full_random", max_activation_share=0.5)
    with pytest.raises(ValueError, match=r"max_activation_share must be in \(0, 1\]"):
        MeDyateConfig(max_activation_share=1.5)
    with pytest.raises(ValueError, match="resample_every must be an int >= 1 or None, got 0"):
        MeDyateConfig(resample_every=0)
    with pytest.raises(ValueError, match="full_gradient_batches must be an int >= 1, got None"):
        MeDyateConfig(strategy="det_rgn", full_gradient_batches=None)
    MeDyateConfig(strategy="prev_medyate", draw_weights="norm_per_cost", rescale_norms=True, max_activation_share=0.6)


def test_options_reach_the_tuner_pool_and_draws():
    """End to end on the test net: the capped pool is what the tuner trains, and the draws re-run per epoch."""
    ranking = {"lara": {"conv": 4.0, "grouped": 3.0, "depthwise": 2.0, "proj": 1.0},
               "rgn": {"conv": 1.0, "grouped": 2.0, "depthwise": 3.0, "proj": 4.0}}
    papers = get_peft_model(net(), MeDyateConfig(budget_kb=1.0, input_size=INPUT, layer_ranking=ranking,
                                                  strategy="medyate"))
    assert {c.name for c in papers.base_model.plans["default"].pool.costs} == {"conv", "grouped", "depthwise"}
    config = MeDyateConfig(budget_kb=1.0, input_size=INPUT, layer_ranking=ranking, max_activation_share=0.6,
                           strategy="medyate", draw_weights="norm_per_cost", rescale_norms=True)
    model = get_peft_model(net(), config)
    plan = model.base_model.plans["default"]
    assert {c.name for c in plan.pool.costs} == {"conv", "grouped"}  # depthwise would lift the share to 0.65
    assert activation_share(list(plan.pool.costs)) <= 0.6
    report = model.memory_report(compare_lean=False)
    assert report.pool.earliest_layer == "conv" and report.pool.activation_share == activation_share(
        list(plan.pool.costs))
    used = report.used_slots
    assert report.used_activation_share == sum(r.activation_slots for r in report.layers) / used
    assert "earliest layer conv" in str(report) and report.to_dict()["pool"]["layers"] == 2
    x = torch.randn(4, *INPUT)
    for _ in range(3):
        model(x).sum().backward()
        model.resample()
    assert plan.tracker.epochs_done == 3 and bool((plan.tracker.norms > 0).any())
