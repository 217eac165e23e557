"""Layer ranking within the budget (sparse_probe.py) and the rankings that ship with the package."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from test_ranking import INPUT, LAYERS, batches, net

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig, rank_layers
from medyate_peft.budget import LayerCost, budget_slots
from medyate_peft.measure import record_saved_tensors
from medyate_peft.ranking import candidate_shapes, default_loss, rank_in_tuner, shipped_ranking
from medyate_peft.sparse_probe import SparseGradientProbe, rotation


def linear_costs(*spec: tuple[str, int, int]) -> list[LayerCost]:
    """(name, in_channels, C^W) with C^A = 1."""
    return [LayerCost(n, "linear", c, w, 1, 1, 1) for n, c, w in spec]


def test_rotation_covers_every_channel_once_within_the_budget():
    costs = linear_costs(("a", 4, 9), ("b", 10, 19), ("c", 3, 4), ("huge", 2, 200))  # 40, 200, 15, 402 slots
    slices = rotation(costs, budget=50)
    seen = {c.name: [] for c in costs}
    by_name = {c.name: c for c in costs}
    for parts in slices:
        assert sum((end - start) * by_name[n].channel_slots for n, start, end in parts) <= 50
        assert len({n for n, _, _ in parts}) == len(parts)  # one consecutive chunk per layer and slice
        for name, start, end in parts:
            seen[name] += range(start, end)
    assert {n: sorted(v) for n, v in seen.items()} == {"a": list(range(4)), "b": list(range(10)),
                                                        "c": list(range(3)), "huge": []}
    # stratified: k = ceil(255 / 50) = 6 slices (whole layers in forward order need 7), and every layer is
    # spread over min(its channels, k) slices in chunks of ceil(C / k) channels (b: 2 a slice, 5 slices)
    assert len(slices) == 6
    assert {n: sum(n == m for p in slices for m, _, _ in p) for n in "abc"} == {"a": 4, "b": 5, "c": 3}
    # a slice reserve (what the step holds below its lowest layer) shrinks that slice
    reserved = rotation(costs[:1], budget=50, reserve=lambda name: 30)
    assert reserved == [[("a", 0, 2)], [("a", 2, 4)]]
    with pytest.raises(ValueError, match="cannot hold one channel of any layer; the cheapest needs 202 slots"):
        rotation(costs[3:], budget=50, reserve=lambda name: 1)


def test_a_large_reserve_below_the_first_layer_keeps_the_forward_rotation():
    """Stratified slices all hold the first layer, so each pays its reserve: forward order is then fewer slices."""
    costs = linear_costs(("low", 4, 9), ("high", 8, 9))  # 40 + 80 slots
    reserve = {"low": 40, "high": 0}.get
    slices = rotation(costs, budget=60, reserve=reserve)
    assert slices == [[("low", 0, 2)], [("low", 2, 4)], [("high", 0, 6)], [("high", 6, 8)]]
    by_name = {c.name: c for c in costs}
    for parts in slices:
        lowest = parts[0][0]
        assert sum((e - s) * by_name[n].channel_slots for n, s, e in parts) + reserve(lowest) <= 60


def test_budgeted_ranking_equals_the_dense_one_at_fixed_weights():
    """One batch, lr=0: every channel sees the same gradient as the dense step, so the estimates are exact."""
    data = batches(1)
    dense = rank_layers(net(), data, steps=1, lr=0.0, progress=False)
    budgeted = rank_layers(net(), data, steps=1, lr=0.0, progress=False, budget_kb=1.0)
    assert "budgeted probe" in budgeted["source"]
    for name in LAYERS:
        assert budgeted["lara"][name] == pytest.approx(dense["lara"][name], rel=1e-5)
        assert budgeted["rgn"][name] == pytest.approx(dense["rgn"][name], rel=1e-5)
    assert budgeted["shapes"] == dense["shapes"] and budgeted["fingerprint"] == dense["fingerprint"]


@pytest.mark.slow  # ~10 s: a real net, 21 probe batches
def test_on_a_real_net_the_budgeted_pool_is_the_dense_one_at_fixed_weights():
    """mcunet-5fps at 64x64, one batch, lr=0: every slice sees the dense step's gradient, so the stratified
    chunks (pointwise and depthwise convs cut over many batches) add up to the dense probe's LaRa, the
    rotation takes the bound's k batches, and the tuner builds the same alpha-rule pool from either ranking."""
    from medyate_peft.backbones import load_mcu_model

    model = load_mcu_model("mcunet-5fps", num_classes=10)
    data, budget_kb = [(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))], 128.0
    dense = rank_in_tuner(copy.deepcopy(model), data, 1, default_loss, 0.0, False, budget_kb, mode="dense")
    budgeted = rank_layers(model, data, steps=1, lr=0.0, progress=False, budget_kb=budget_kb)
    k = int(re.search(r"(\d+) training batch", budgeted["source"]).group(1))
    assert 10 <= k <= math.ceil(sum(dense["layer_slots"].values()) / budget_slots(budget_kb, 4)) + 1
    assert budgeted["lara"] == pytest.approx(dense["lara"], rel=1e-4)
    assert budgeted["rgn"] == pytest.approx(dense["rgn"], rel=1e-4)
    pools = []
    for ranking in (dense, budgeted):
        config = MeDyateConfig(budget_kb=budget_kb, input_size=[3, 64, 64], layer_ranking=ranking)
        pools.append([c.name for c in get_peft_model(copy.deepcopy(model), config).base_model.plans["default"].pool.costs])
    assert pools[0] == pools[1] and 1 < len(pools[0]) < len(dense["lara"])


def test_every_ranking_batch_holds_no_more_than_the_budget_then_channels_train():
    """Measured per ranking batch: x[:, S] saved + weight-gradient slots <= budget; no base weight gets a gradient."""
    budget_kb = 1.0
    model = get_peft_model(net(), MeDyateConfig(budget_kb=budget_kb, input_size=INPUT, ranking_batches=1))
    tuner = model.base_model
    budget_bytes = budget_slots(budget_kb, 4) * 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    probe, probe_batches, dense_step = None, 0, None
    for x, y in batches(20, size=4):
        optimizer.zero_grad()
        probe = tuner.plans["default"].probe or probe
        with record_saved_tensors(tuner.model, owner=model) as saved:
            loss = F.cross_entropy(model(x), y)
        probe = tuner.plans["default"].probe or probe
        if not tuner.is_planned("default"):
            assert isinstance(probe, SparseGradientProbe)
            live = {n: layer.live["default"][1] for n, layer in tuner.medyate_layers().items() if "default" in layer.live}
            assert live
            activations = sum(saved.get(n, 0) for n in live) - probe.values.nbytes  # the zero vector is saved too
            weights = 4 * sum(sel.numel for sel in live.values())
            assert activations / len(x) + weights <= budget_bytes
            assert probe.values.numel() * 4 <= tuner.medyate_values["default"].numel() * 4
            probe_batches += 1
        loss.backward()
        assert all(layer.get_base_layer().weight.grad is None for layer in tuner.medyate_layers().values())
        if not tuner.is_planned("default"):
            assert tuner.medyate_values["default"].grad is None and probe.values.grad is None
        elif dense_step is None:
            dense_step = tuner.medyate_values["default"].grad.abs().sum()
        optimizer.step()
    assert tuner.is_planned("default") and dense_step > 0
    assert probe_batches == len(probe.slices) == probe.batches_needed
    assert all(len(layer.medyate_index["default"]) == len(tuner.selection().get(n, ()))
               for n, layer in tuner.medyate_layers().items())  # the probe left no zero rows behind
    ranking = tuner.peft_config["default"].layer_ranking
    assert "budgeted probe" in ranking["source"] and all(ranking["lara"][n] > 0 for n in LAYERS)


def test_budgeted_ranking_goes_on_past_a_short_epoch_and_redoes_a_non_finite_batch():
    model = get_peft_model(net(), MeDyateConfig(budget_kb=1.0, input_size=INPUT, detect_anomalies=False))
    tuner = model.base_model
    model.train()
    data = batches(30, size=4)
    x, y = data[0]
    (F.cross_entropy(model(x), y) * float("inf")).backward()  # an fp16 overflow: measured again
    model.resample()  # the epoch ends before the rotation: the ranking goes on
    assert not tuner.is_planned("default") and tuner.plans["default"].probe.skipped == 1
    for x, y in data[1:]:
        F.cross_entropy(model(x), y).backward()
    assert tuner.is_planned("default")
    assert all(v > 0 for v in tuner.peft_config["default"].layer_ranking["lara"].values())


def test_rank_command_style_option_dense_stays_available():
    config = MeDyateConfig(budget_kb=1.0, input_size=INPUT, ranking_mode="dense", ranking_batches=1)
    model = get_peft_model(net(), config)
    model.train()
    for x, y in batches(2):
        F.cross_entropy(model(x), y).backward()
    assert "dense gradients" in config.layer_ranking["source"]
    with pytest.raises(ValueError, match="ranking_mode must be 'budgeted' or 'dense'"):
        MeDyateConfig(ranking_mode="sparse")


# -- shipped rankings ---------------------------------------------------------------------------
def test_a_ranking_of_a_sibling_architecture_is_refused_by_shape():
    timm = pytest.importorskip("timm")
    wide = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=3)
    narrow = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=3)
    ranking = rank_layers(wide, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], steps=1, progress=False)
    assert set(ranking["shapes"]) == set(candidate_shapes(narrow))  # same layer names, other widths
    config = MeDyateConfig(budget_kb=64, input_size=[3, 32, 32], layer_ranking=ranking)
    with pytest.raises(ValueError, match=r"another architecture: \d+ of \d+ layers have other weight shapes, e\.g\."):
        get_peft_model(narrow, config)


def test_the_minilm_ranking_ships_and_is_picked_up_without_a_ranking_run():
    from medyate_peft.backbones import load_minilm

    model, _ = load_minilm(num_labels=3)
    shipped = shipped_ranking(candidate_shapes(model))
    assert shipped is not None and "minilm" in shipped["source"]
    config = MeDyateConfig(budget_kb=1024, input_size=[16], modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    tuner = peft_model.base_model
    assert tuner.is_planned("default") and tuner.plans["default"].probe is None  # planned at once, no probe
    assert config.layer_ranking["fingerprint"] == shipped["fingerprint"]
    # a narrower encoder from config (same names, other shapes) gets no shipped ranking
    from transformers import BertConfig, BertForSequenceClassification

    small = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                                     intermediate_size=128, vocab_size=100, num_labels=3))
    assert shipped_ranking(candidate_shapes(small)) is None


def test_every_shipped_ranking_fits_its_backbone(shared_assets, monkeypatch):
    """The five shipped rankings are those of the five shipped loaders' architectures, heads excluded."""
    from medyate_peft.backbones import MCU_MODELS, load_efficientnet_lite0, load_mcu_model

    monkeypatch.setenv("MEDYATE_MCU_DIR", str(shared_assets / "models" / "mcu"))
    models = [load_mcu_model(name, num_classes=7) for name in MCU_MODELS] + [load_efficientnet_lite0(num_classes=7)]
    found = {shipped_ranking(candidate_shapes(m))["source"].split(" on ")[0] for m in models}
    assert found == {*MCU_MODELS, "efficientnet-lite0"}
