"""Layer ranking (spec section 3): LaRa/RGN values, K rules, files, and the ranking made from first batches."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig, load_ranking, rank_layers, save_ranking
from medyate_peft.budget import LayerCost
from medyate_peft.ranking import select_by_alpha, select_by_rgn


class Net(nn.Module):
    """Normal, grouped and depthwise convs, a token Linear, a head: every channel-norm layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.proj = nn.Linear(16, 6)
        self.classifier = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        x = self.depthwise(x).flatten(2).transpose(1, 2)
        return self.classifier(torch.tanh(self.proj(x)).mean(1))


INPUT = [3, 8, 8]
LAYERS = ["conv", "grouped", "depthwise", "proj"]


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def batches(n: int = 3, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(size, *INPUT, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def reference_ranking(model: nn.Module, data) -> tuple[dict[str, float], dict[str, float]]:
    """LaRa and RGN at fixed weights, straight from the spec's formulas, with explicit loops over channels."""
    lara, rgn = dict.fromkeys(LAYERS, 0.0), dict.fromkeys(LAYERS, 0.0)
    hw = {"conv": 64, "grouped": 64, "depthwise": 64, "proj": 16}  # C^A: H_in*W_in or tokens
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name in LAYERS:
            module = getattr(model, name)
            grad = module.weight.grad
            groups = getattr(module, "groups", 1)
            in_channels = grad.shape[1] * groups
            out_per_group = grad.shape[0] // groups
            cost = out_per_group * (grad[0, 0].numel()) + hw[name]
            norms = []
            for c in range(in_channels):
                g, col = divmod(c, grad.shape[1])
                norms.append(float(grad[g * out_per_group : (g + 1) * out_per_group, col].norm()))
            lara[name] += float(grad.norm()) / (in_channels * cost)
            rgn[name] += sum(n / cost for n in norms)
    return lara, rgn


def costs(*spec: tuple[str, int, int]) -> list[LayerCost]:
    """(name, in_channels, channel_slots) -> Linear-like costs with C^A = 0."""
    return [LayerCost(n, "linear", c, s, 1, 1, 0) for n, c, s in spec]


def test_alpha_rule_takes_the_smallest_k_under_alpha_opt():
    layers = costs(("a", 10, 10), ("b", 10, 30), ("c", 10, 60))  # M = 100, 300, 600
    lara = {"a": 1.0, "b": 3.0, "c": 2.0}  # order b, c, a
    assert select_by_alpha(layers, lara, budget=60, alpha_opt=0.2) == ["b"]  # 60/300 = 0.2
    assert select_by_alpha(layers, lara, budget=100, alpha_opt=0.2) == ["b", "c"]  # 100/900
    assert select_by_alpha(layers, lara, budget=500, alpha_opt=0.2) == ["b", "c", "a"]  # never <= 0.2: all


def test_rgn_rule_keeps_97_percent_of_cumulative_rgn():
    layers = costs(("a", 1, 1), ("b", 1, 1), ("c", 1, 1), ("d", 1, 1))
    rgn = {"a": 50.0, "b": 40.0, "c": 7.5, "d": 2.5}
    assert select_by_rgn(layers, rgn, 0.97) == ["a", "b", "c"]  # 97.5 %
    assert select_by_rgn(layers, rgn, 0.90) == ["a", "b"]
    assert select_by_rgn(layers, rgn, 1.0) == ["a", "b", "c", "d"]


def test_rank_layers_computes_the_spec_formulas_and_leaves_the_model_alone():
    model, data = net(), batches()
    before = copy.deepcopy(model.state_dict())
    ranking = rank_layers(model, data, steps=3, lr=0.0, progress=False)
    assert set(ranking["lara"]) == set(LAYERS)  # the classifier is not ranked
    lara, rgn = reference_ranking(copy.deepcopy(model), data)
    for name in LAYERS:
        assert ranking["lara"][name] == pytest.approx(lara[name], rel=1e-5), name
        assert ranking["rgn"][name] == pytest.approx(rgn[name], rel=1e-5), name
    assert ranking["steps"] == 3
    trained = rank_layers(model, data[:1], steps=3, lr=0.5, progress=False)  # the loader is cycled
    assert trained["steps"] == 3
    assert trained["lara"] != rank_layers(model, data[:1], steps=3, lr=0.0, progress=False)["lara"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_rank_layers_on_a_peft_model_ranks_its_merged_copy_under_the_same_names():
    model, data = net(), batches(1)
    plain = rank_layers(model, data, steps=1, lr=0.0, progress=False)
    peft_model = get_peft_model(copy.deepcopy(model), MeDyateConfig(budget_kb=1.0, strategy="full_random"))
    wrapped = rank_layers(peft_model, data, steps=1, lr=0.0, progress=False)
    assert set(wrapped["lara"]) == set(plain["lara"])
    for name in LAYERS:
        assert wrapped["lara"][name] == pytest.approx(plain["lara"][name], rel=1e-6)
    assert peft_model.base_model.medyate_layers()  # still a PEFT model


def test_custom_loss_and_dict_batches():
    model, data = net(), batches(1)
    calls = []

    def loss_fn(m, batch):
        calls.append(sorted(batch))
        return F.cross_entropy(m(batch["pixels"]), batch["labels"])

    ranking = rank_layers(model, [{"pixels": data[0][0], "labels": data[0][1]}], steps=2, loss_fn=loss_fn,
                          progress=False)
    assert calls == [["labels", "pixels"]] * 2 and ranking["steps"] == 2
    with pytest.raises(ValueError, match="no .loss"):
        rank_layers(model, [{"x": data[0][0]}], steps=1, loss_fn=None, progress=False)


def test_save_and_load_round_trip_atomically(tmp_path):
    ranking = rank_layers(net(), batches(1), steps=1, progress=False)
    path = save_ranking(ranking, tmp_path / "sub" / "ranking.json")
    assert load_ranking(path) == load_ranking(ranking)
    assert json.loads(path.read_text())["format"] == "medyate-layer-ranking"
    save_ranking({**ranking, "steps": 99}, path)  # replaces in place
    assert load_ranking(str(path))["steps"] == 99
    assert [p.name for p in path.parent.iterdir()] == ["ranking.json"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"rgn": {"a": 1.0}}, "no 'lara' table"),
        ({"lara": {"a": 1.0}, "rgn": {"a": -1.0}}, r"rgn\['a'\] = -1.0 is not a finite score"),
        ({"lara": {"a": float("nan")}, "rgn": {"a": 1.0}}, "not a finite score"),
        ({"lara": {"a": 1.0}, "rgn": {"b": 1.0}}, "rank different layers"),
        ({"format": "lora", "lara": {"a": 1.0}, "rgn": {"a": 1.0}}, "not a MeDyate layer ranking"),
        ({"version": 99, "lara": {"a": 1.0}, "rgn": {"a": 1.0}}, "newer than"),
    ],
)
def test_invalid_rankings_fail_clearly(content, message):
    with pytest.raises(ValueError, match=message):
        load_ranking(content)


def test_unreadable_ranking_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_ranking(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ranking(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="path or a dict"):
        load_ranking(3)


def test_config_ranking_path_plans_at_once_with_the_alpha_rule(tmp_path):
    path = save_ranking(rank_layers(net(), batches(2), steps=2, progress=False), tmp_path / "r.json")
    model = get_peft_model(net(), MeDyateConfig(budget_kb=1.0, input_size=INPUT, layer_ranking=str(path)))
    tuner = model.base_model
    assert tuner.is_planned("default")
    pool = [c.name for c in tuner.plans["default"].pool.costs]
    lara = load_ranking(path)["lara"]
    expected = select_by_alpha(tuner.layer_costs(), lara, tuner.plans["default"].budget, 0.2)
    assert sorted(pool) == sorted(expected) and len(pool) < len(LAYERS)
    assert set(tuner.selection()) <= set(pool)


def test_a_ranking_of_another_architecture_is_rejected():
    other = {"lara": {"features.0": 1.0}, "rgn": {"features.0": 1.0}}
    with pytest.raises(ValueError, match="another architecture"):
        get_peft_model(net(), MeDyateConfig(budget_kb=1.0, input_size=INPUT, layer_ranking=other))


def test_without_ranking_the_first_batches_rank_densely_then_channels_train():
    data = batches(3)
    model = get_peft_model(net(), MeDyateConfig(budget_kb=1.0, input_size=INPUT, ranking_batches=1,
                                                ranking_mode="dense"))
    tuner = model.base_model
    assert not tuner.is_planned("default")
    reference = rank_layers(net(), data[:1], steps=1, lr=0.0, progress=False)
    weights = {n: layer.get_base_layer().weight.detach().clone() for n, layer in tuner.medyate_layers().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # even with every parameter in it
    model.train()
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        values = tuner.medyate_values["default"]
        if step == 0:
            assert values.grad is None  # ranking batch: only the head trains
            assert all(layer.get_base_layer().weight.grad is None for layer in tuner.medyate_layers().values())
        else:
            assert tuner.is_planned("default") and values.grad is not None and values.grad.abs().sum() > 0
        optimizer.step()
    ranking = tuner.peft_config["default"].layer_ranking
    assert ranking["steps"] == 1
    for name in LAYERS:
        assert ranking["lara"][name] == pytest.approx(reference["lara"][name], rel=1e-5)
        assert ranking["rgn"][name] == pytest.approx(reference["rgn"][name], rel=1e-5)
    for name, layer in tuner.medyate_layers().items():
        assert not layer.get_base_layer().weight.requires_grad
        assert torch.equal(layer.get_base_layer().weight, weights[name]), f"base weight of {name} changed"
    expected = select_by_alpha(tuner.layer_costs(), ranking["lara"], tuner.plans["default"].budget, 0.2)
    assert sorted(c.name for c in tuner.plans["default"].pool.costs) == sorted(expected)


def test_an_epoch_shorter_than_the_ranking_batches_plans_at_resample():
    model = get_peft_model(net(), MeDyateConfig(budget_kb=1.0, strategy="trady", ranking_batches=5,
                                                ranking_mode="dense"))
    tuner = model.base_model
    model.train()
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert not tuner.is_planned("default")
    model.resample()
    assert tuner.is_planned("default") and tuner.selection()
    assert tuner.peft_config["default"].layer_ranking["steps"] == 1
    with pytest.raises(RuntimeError, match="before the first training step"):
        get_peft_model(net(), MeDyateConfig(budget_kb=1.0, strategy="trady")).resample()


@pytest.mark.parametrize("mode", ["dense", "budgeted"])
def test_a_layer_the_loss_does_not_reach_ranks_zero(mode):
    class WithSide(Net):
        def __init__(self) -> None:
            super().__init__()
            self.side = nn.Conv2d(3, 3, 1)  # reached by the forward, cut off from the loss

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x + 0 * self.side(x).detach())

    torch.manual_seed(0)
    model = get_peft_model(WithSide(), MeDyateConfig(budget_kb=1.0, input_size=INPUT, ranking_batches=1,
                                                     ranking_mode=mode))
    model.train()
    for x, y in batches(20):  # the budgeted probe needs one batch per slice of channels
        F.cross_entropy(model(x), y).backward()
    tuner = model.base_model
    ranking = tuner.peft_config["default"].layer_ranking
    assert tuner.is_planned("default") and set(ranking["lara"]) == {*LAYERS, "side"}
    assert ranking["lara"]["side"] == ranking["rgn"]["side"] == 0.0 < ranking["lara"]["conv"]
