"""budget_scope="step": the budget bounds the whole step per sample, measured (step_budget.py, measure.py)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from test_ranking import INPUT, net
from torch import nn

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig


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


def measured_step_per_sample(model, x) -> tuple[float, object]:
    """Saved activations / batch + the trained channels' weight gradients + the head's gradients, measured."""
    report = model.base_model.memory_report(x, compare_lean=False)
    saved = report.measured_selected_saved_bytes + report.measured_frozen_path_saved_bytes
    return saved / len(x) + report.measured_weight_grad_bytes_used + report.measured_head_grad_bytes, report


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
