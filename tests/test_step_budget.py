"""budget_scope="step": the budget bounds the whole step per sample, measured (step_budget.py, measure.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from test_ranking import INPUT, net
from torch import nn

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig
from medyate_peft.strategies import channel_order, get_strategy


class Deeper(nn.Module):
    """BatchNorm + ReLU6 + dropout between the layers, so the frozen path keeps masks, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(), nn.Dropout(0.1),
            nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU6(),
            nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def measured_step_per_sample(model, x, optimizer=None) -> tuple[float, object]:
    """Saved activations / batch + the weight-gradient vector as allocated + head gradients (+ optimizer state)."""
    report = model.base_model.memory_report(x, compare_lean=False, optimizer=optimizer)
    saved = report.measured_selected_saved_bytes + report.measured_frozen_path_saved_bytes
    step = saved / len(x) + report.measured_weight_grad_bytes_allocated + report.measured_head_grad_bytes
    step += report.optimizer_state_bytes or 0
    assert step == report.measured_step_bytes_per_sample
    return step, report


@pytest.mark.parametrize("make", [net, Deeper], ids=["mixed-layers", "bn-relu-dropout"])
@pytest.mark.parametrize("budget_kb", [3.0, 4.0, 8.0])
@pytest.mark.parametrize("strategy", ["full_random", "static_random"])
def test_a_step_holds_no_more_than_the_budget(make, budget_kb, strategy):
    size = INPUT if make is net else [3, 12, 12]
    x = torch.randn(4, *size)
    for seed in range(3):
        torch.manual_seed(seed)
        config = MeDyateConfig(budget_kb=budget_kb, input_size=size, strategy=strategy, seed=seed,
                               budget_scope="step", modules_to_save=["classifier"])
        model = get_peft_model(make(), config)
        step, report = measured_step_per_sample(model, x)
        assert report.measured_frozen_path_saved_bytes > 0  # there is a frozen path to account for
        # the gradient allocated for weights is the vector the plan fixed, not the budget (a static draw fills it)
        vector = 4 * model.base_model.plans["default"].step.vector
        assert report.measured_weight_grad_bytes_allocated == vector >= report.measured_weight_grad_bytes_used > 0
        assert strategy != "static_random" or vector == report.measured_weight_grad_bytes_used
        assert step <= budget_kb * 1024, f"seed {seed}: {step / 1024:.2f} kB per sample"
        assert report.step_slots * 4 <= budget_kb * 1024
        assert "budget scopes (budget_scope='step')" in str(report)
        # the papers' accounting trains more channels at the same budget, and its step holds more than it
        papers = get_peft_model(make(), MeDyateConfig(budget_kb=budget_kb, input_size=size, strategy=strategy,
                                                      seed=seed, modules_to_save=["classifier"]))
        assert report.used_slots <= papers.base_model.memory_report(x, compare_lean=False).used_slots


def test_the_smallest_workable_budget_is_said_and_works():
    size = [3, 12, 12]
    with pytest.raises(ValueError, match=r"smallest workable budget is budget_kb >= ([\d.]+)") as info:
        get_peft_model(Deeper(), MeDyateConfig(budget_kb=0.5, input_size=size, budget_scope="step",
                                               strategy="full_random", modules_to_save=["classifier"]))
    smallest = float(info.value.args[0].split("budget_kb >= ")[1].split(" ")[0])
    model = get_peft_model(Deeper(), MeDyateConfig(budget_kb=smallest, input_size=size, budget_scope="step",
                                                   strategy="full_random", modules_to_save=["classifier"]))
    assert model.base_model.selection()
    step, _ = measured_step_per_sample(model, torch.randn(2, *size))
    assert step <= smallest * 1024


def test_optimizer_state_is_charged_and_ranking_batches_fit_the_step_budget():
    size = [3, 12, 12]

    def plan(optimizer_slots: int):
        config = MeDyateConfig(budget_kb=6.0, input_size=size, budget_scope="step", strategy="full_random",
                               optimizer_slots=optimizer_slots, modules_to_save=["classifier"])
        return get_peft_model(Deeper(), config).base_model.plans["default"]

    sgd, adam = plan(0), plan(2)
    head = 32 * 5 + 5
    assert adam.step.fixed == 3 * head and sgd.step.fixed == head
    assert adam.step.used(adam.pool, adam.selected) <= adam.budget
    weights = [int(p.pool.slots[p.selected].sum()) for p in (sgd, adam)]
    assert weights[1] < weights[0]  # fewer channels once their optimizer state is paid for
    with pytest.raises(ValueError, match="budget_scope must be 'selection'"):
        MeDyateConfig(budget_scope="everything")


def test_every_budgeted_ranking_batch_holds_no_more_than_the_step_budget():
    """Measured per ranking batch: all saved bytes / batch + the slice's weight gradients + head gradients."""
    import torch.nn.functional as F

    from medyate_peft.measure import record_saved_tensors
    from medyate_peft.sparse_probe import SparseGradientProbe

    size, budget_kb = [3, 12, 12], 6.0
    config = MeDyateConfig(budget_kb=budget_kb, input_size=size, budget_scope="step", strategy="medyate",
                           modules_to_save=["classifier"])
    model = get_peft_model(Deeper(), config)
    tuner = model.base_model
    head = sum(p.numel() * 4 for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    model.train()
    measured = 0
    probe = None
    for _ in range(40):
        x, y = torch.randn(4, *size), torch.randint(0, 5, (4,))
        with record_saved_tensors(tuner.model, owner=model) as saved:
            loss = F.cross_entropy(model(x), y)
        probe = tuner.plans["default"].probe or probe
        if not tuner.is_planned("default"):
            assert isinstance(probe, SparseGradientProbe)
            slice_weights = 4 * sum(s.numel for layer in tuner.medyate_layers().values()
                                    for a, (_, s) in layer.live.items() if a == "default")
            activations = sum(saved.values()) - probe.values.nbytes  # the zero vector is saved by reference
            assert activations / len(x) + slice_weights + head <= budget_kb * 1024
            measured += 1
        loss.backward()
    assert tuner.is_planned("default") and measured == probe.batches_needed > 1


def _train(model, optimizer, size, steps=2):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, *size)), torch.randint(0, 5, (4,))).backward()
        optimizer.step()


def test_the_vector_fixed_at_the_first_batch_holds_over_resamples_with_one_optimizer():
    """Planned lazily (no input_size): the optimizer (momentum) is built on the budget-sized vector, the first
    training batch fixes it to the first draw's weight slots, and every epoch's step, momentum included, holds
    within the budget while the selection changes."""
    size, budget_kb = [3, 12, 12], 6.0
    config = MeDyateConfig(budget_kb=budget_kb, budget_scope="step", strategy="full_random", optimizer_slots=1,
                           modules_to_save=["classifier"])
    model = get_peft_model(Deeper(), config)
    tuner = model.base_model
    values = tuner.medyate_values["default"]
    assert values.numel() == min(int(budget_kb * 1024 / 4), sum(
        m.in_channels * m.slice_shape[0] * m.slice_shape[1] for m in tuner.medyate_layers().values()))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    _train(model, optimizer, size)
    plan = tuner.plans["default"]
    vector = plan.step.vector
    assert values.numel() == vector < budget_kb * 1024 / 4  # the parameter the optimizer holds, resized
    head = 32 * 5 + 5
    selections = set()
    for _ in range(4):
        layout = plan.layout
        assert 0 < layout.used <= vector
        assert plan.step.used(plan.pool, plan.selected) <= plan.budget
        step, report = measured_step_per_sample(model, torch.randn(4, *size), optimizer)
        assert report.optimizer_state_bytes == 4 * (vector + head)  # momentum of the whole vector and the head
        assert report.measured_weight_grad_bytes_allocated == 4 * vector
        assert step <= budget_kb * 1024, f"{step / 1024:.2f} kB per sample"
        selections.add(str(tuner.selection()))
        model.resample(optimizer)
        _train(model, optimizer, size)
        assert values.numel() == vector
    assert len(selections) > 1, "the selection never changed"


def test_with_the_vector_fixed_a_draw_of_its_size_is_unchanged_and_others_fit_it():
    """Charging a vector of a draw's weight slots up front takes exactly the channels the per-channel charge took;
    any other order fills at most the vector's weight slots, within the budget."""
    from medyate_peft.budget import LayerCost
    from medyate_peft.sampling import ChannelPool
    from medyate_peft.step_budget import StepCosts

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        count = int(torch.randint(1, 5, (1,), generator=g))
        costs = [LayerCost(f"l{i}", "conv", int(torch.randint(1, 6, (1,), generator=g)),
                           int(torch.randint(1, 9, (1,), generator=g)), 1, 9,
                           int(torch.randint(1, 60, (1,), generator=g))) for i in range(count)]
        pool = ChannelPool.build(costs)
        step = StepCosts(reserve={c.name: int(torch.randint(0, 50, (1,), generator=g)) for c in costs},
                         order=tuple(c.name for c in costs), fixed=int(torch.randint(0, 30, (1,), generator=g)),
                         optimizer_slots=int(torch.randint(0, 3, (1,), generator=g)))
        budget = int(torch.randint(100, 600, (1,), generator=g))
        order = torch.randperm(len(pool), generator=g)
        first = step.fill(order, pool, budget)
        fixed = dataclasses.replace(step, vector=int(step.pool_weights(pool)[first].sum()))
        assert torch.equal(fixed.fill(order, pool, budget), first), f"trial {trial}"
        assert fixed.used(pool, first) == step.used(pool, first) <= budget or not len(first)
        later = fixed.fill(torch.randperm(len(pool), generator=g), pool, budget)
        assert int(fixed.pool_weights(pool)[later].sum()) <= fixed.vector
        assert fixed.used(pool, later) <= budget or not len(later)


def test_the_vector_is_sized_on_the_strategys_draws():
    """Static: the one draw is the per-channel charge's. Dynamic: the size trains more, over the strategy's next
    draws, than the first draw's size would, and no draw exceeds it."""
    from medyate_peft import planner

    def plan(strategy):
        config = MeDyateConfig(budget_kb=8.0, input_size=INPUT, strategy=strategy, budget_scope="step", seed=1)
        return get_peft_model(net(), config).base_model.plans["default"], config

    static, _ = plan("static_random")
    per_channel = dataclasses.replace(static.step, vector=None)
    order = torch.randperm(len(static.pool), generator=torch.Generator().manual_seed(1))
    assert torch.equal(static.selected, per_channel.fill(order, static.pool, static.budget))
    assert static.step.vector == int(static.step.pool_weights(static.pool)[static.selected].sum())
    dynamic, config = plan("full_random")
    step = dataclasses.replace(dynamic.step, vector=None)
    orders = [channel_order(get_strategy("full_random"), dynamic.pool.slots, g, None, None)
              for g in [torch.Generator().manual_seed(1)] for _ in range(planner.VECTOR_DRAWS)]
    first = int(step.pool_weights(dynamic.pool)[step.fill(orders[0], dynamic.pool, dynamic.budget)].sum())

    def trained(size):
        capped = dataclasses.replace(step, vector=size)
        return sum(step.used(dynamic.pool, capped.fill(o, dynamic.pool, dynamic.budget)) for o in orders)

    assert trained(dynamic.step.vector) >= trained(first)
    for o in orders:
        assert int(step.pool_weights(dynamic.pool)[dynamic.step.fill(o, dynamic.pool, dynamic.budget)].sum()) \
            <= dynamic.step.vector


def test_state_dicts_and_training_states_move_between_a_planned_and_an_unplanned_model():
    """The flat vector reads as zeros in a state dict, of whatever size it had; a resumed run takes its size."""
    size = [3, 12, 12]

    def build(**extra):
        torch.manual_seed(0)
        return get_peft_model(Deeper(), MeDyateConfig(budget_kb=6.0, budget_scope="step", strategy="full_random",
                                                      modules_to_save=["classifier"], **extra))

    planned, fresh = build(input_size=size), build()
    sizes = planned.base_model.medyate_values["default"].numel(), fresh.base_model.medyate_values["default"].numel()
    assert sizes[0] < sizes[1]
    fresh.load_state_dict(planned.state_dict())
    planned.load_state_dict(build().state_dict())
    optimizer = torch.optim.SGD([p for p in planned.parameters() if p.requires_grad], lr=0.1)
    planned.train()
    _train(planned, optimizer, size, steps=1)
    state = planned.base_model.training_state_dict()
    resumed = build()
    resumed.load_state_dict(planned.state_dict())  # the head and BatchNorm statistics
    resumed.base_model.load_training_state_dict(state)
    assert resumed.base_model.medyate_values["default"].numel() == sizes[0]
    assert torch.equal(resumed.base_model.medyate_values["default"], planned.base_model.medyate_values["default"])
    x = torch.randn(2, *size)
    planned.eval(), resumed.eval()
    assert torch.equal(planned(x), resumed(x))


def test_the_papers_scope_keeps_the_budget_sized_vector():
    model = get_peft_model(Deeper(), MeDyateConfig(budget_kb=6.0, input_size=[3, 12, 12], strategy="full_random",
                                                   modules_to_save=["classifier"]))
    tuner = model.base_model
    assert tuner.plans["default"].step is None
    assert tuner.medyate_values["default"].numel() == 6 * 1024 // 4 > tuner.plans["default"].layout.used


def test_the_strict_scope_refuses_longer_inputs_by_the_step_charge():
    """Planned at 16 tokens, a batch of 20 grows every selected channel's activations: the step charge (which the
    plan filled) overshoots, though the papers' slots of the selection stay far below the budget."""
    from test_transformers import _bert, batch

    from medyate_peft.sampling import ChannelPool

    model = get_peft_model(_bert(), MeDyateConfig(task_type="SEQ_CLS", budget_kb=24, strategy="full_random",
                                                  input_size=[16], budget_scope="step"))
    model.train()
    plan = model.base_model.plans["default"]
    inputs, labels = batch("SEQ_CLS", 16)
    model(**inputs, labels=labels).loss.backward()
    inputs, labels = batch("SEQ_CLS", 20)
    with pytest.raises(ValueError, match="strict budget refuses"):
        model(**inputs, labels=labels)
    longer = ChannelPool.build([dataclasses.replace(c, activation_slots=c.activation_slots * 20 // 16)
                                for c in plan.pool.costs])
    assert int(longer.slots[plan.selected].sum()) < plan.budget / 2
