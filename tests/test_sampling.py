"""Channel sampling (spec section 4): frequencies, budget fill, exploration, measured norms, reproducibility."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig
from medyate_peft.kernels import gather_channels
from medyate_peft.sampling import NormTracker, greedy_fill, uniform_order, weighted_order

# chi-square critical values at p = 0.001 (a correct sampler fails once in a thousand seeds; the seeds are fixed)
CHI2_999 = {5: 20.52, 7: 24.32}


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def first_draw_counts(order_fn, n: int, trials: int) -> torch.Tensor:
    counts = torch.zeros(n, dtype=torch.float64)
    for _ in range(trials):
        counts[order_fn()[0]] += 1
    return counts


def test_weighted_first_draw_follows_the_weights():
    weights = torch.arange(1, 9, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    trials = 8000
    counts = first_draw_counts(lambda: weighted_order(weights, g), 8, trials)
    assert chi_square(counts, trials * weights / weights.sum()) < CHI2_999[7]
    assert chi_square(counts, torch.full((8,), trials / 8.0)) > 10 * CHI2_999[7]  # the test can tell


def test_weighted_second_draw_is_without_replacement_and_renormalised():
    """P(second = k | first = 0) = w_k / (W - w_0): the Efraimidis-Spirakis keys give sequential sampling."""
    weights = torch.tensor([6.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(6000):
        order = weighted_order(weights, g)
        assert sorted(order.tolist()) == [0, 1, 2, 3]
        if order[0] == 0:
            counts[order[1]] += 1
    rest = weights[1:]
    assert chi_square(counts[1:], counts.sum() * rest / rest.sum()) < 13.82  # df 2, p = 0.001
    assert counts[0] == 0


def test_zero_weight_channels_come_last_in_random_order():
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(2)
    tails = set()
    for _ in range(50):
        order = weighted_order(weights, g).tolist()
        assert set(order[:2]) == {1, 3}
        tails.add(tuple(order[2:]))
    assert len(tails) > 5
    with pytest.raises(ValueError, match="finite and >= 0"):
        weighted_order(torch.tensor([1.0, -1.0]), g)


def test_uniform_first_draw_is_uniform():
    g = torch.Generator().manual_seed(3)
    trials = 6000
    counts = first_draw_counts(lambda: uniform_order(6, g), 6, trials)
    assert chi_square(counts, torch.full((6,), trials / 6.0)) < CHI2_999[5]


@pytest.mark.parametrize("seed", range(20))
def test_greedy_fill_never_over_budget_and_nothing_left_fits(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 60, (1,), generator=g))
    slots = torch.randint(1, 500, (n,), generator=g)
    budget = int(torch.randint(0, int(slots.sum()) + 100, (1,), generator=g))
    order = torch.randperm(n, generator=g)
    taken = greedy_fill(order, slots, budget)
    used = int(slots[taken].sum())
    assert used <= budget
    assert len(set(taken.tolist())) == len(taken)
    left = torch.ones(n, dtype=torch.bool)
    left[taken] = False
    if left.any():
        assert int(slots[left].min()) > budget - used  # every skipped channel would overflow
        assert used >= budget - int(slots.max())


def test_greedy_fill_skips_an_overflowing_channel_and_goes_on():
    slots = torch.tensor([6, 8, 3, 1])
    taken = greedy_fill(torch.tensor([0, 1, 2, 3]), slots, budget=10)
    assert taken.tolist() == [0, 2, 3]  # 6 taken, 8 skipped, then 3 and 1: 10 slots


def test_exploration_rule_applies_at_epoch_two_only():
    tracker = NormTracker(6)
    first = torch.tensor([0, 1])
    tracker.record(first, torch.tensor([2.0, 4.0]))
    tracker.record(first, torch.tensor([4.0, 8.0]))
    tracker.end_epoch(first)
    assert tracker.norms.tolist() == [3.0, 6.0, 6.0, 6.0, 6.0, 6.0]  # means; unseen get the max
    second = torch.tensor([2, 3])
    tracker.record(second, torch.tensor([20.0, 0.5]))
    tracker.end_epoch(second)
    assert tracker.norms.tolist() == [3.0, 6.0, 20.0, 0.5, 6.0, 6.0]  # no second exploration
    third = torch.tensor([0])
    tracker.end_epoch(third)  # selected but no gradient recorded: keeps its last norm
    assert tracker.norms[0] == 3.0


class Tokens(nn.Module):
    """A conv, a depthwise conv and a token Linear, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.proj = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(torch.relu(self.conv(x)))
        return self.classifier(torch.tanh(self.proj(x.flatten(2).transpose(1, 2))).mean(1))


INPUT = [3, 6, 6]
RANKING = {"lara": {"conv": 1.0, "depthwise": 2.0, "proj": 3.0}, "rgn": {"conv": 1.0, "depthwise": 2.0, "proj": 3.0}}


def tokens_model(seed: int = 0, budget_kb: float = 0.5, strategy: str = "medyate", **kw) -> nn.Module:
    torch.manual_seed(0)
    config = MeDyateConfig(budget_kb=budget_kb, input_size=INPUT, strategy=strategy, seed=seed,
                           layer_ranking=RANKING, alpha_opt=0.1, **kw)
    return get_peft_model(Tokens(), config)


def data(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *INPUT, generator=g), torch.randint(0, 4, (n,), generator=g)


def run_epochs(model, optimizer, epochs: int, steps: int = 2, first_epoch: int = 0) -> list[dict]:
    selections = []
    model.train()
    for epoch in range(first_epoch, first_epoch + epochs):
        for step in range(steps):
            x, y = data(seed=100 * epoch + step)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.resample(optimizer)
        selections.append({k: v.tolist() for k, v in model.selection().items()})
    return selections


def test_draw_frequencies_follow_the_norm_vector():
    """End to end through the tuner: one channel fits the budget, so the selection is the first draw."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 4)
            self.classifier = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.body(x))

    ranking = {"lara": {"body": 1.0}, "rgn": {"body": 1.0}}
    model = get_peft_model(Flat(), MeDyateConfig(budget_kb=5 * 4 / 1024, input_size=[6], layer_ranking=ranking,
                                                   strategy="medyate"))
    tuner = model.base_model
    plan = tuner.plans["default"]
    assert plan.pool.slots.tolist() == [5] * 6  # C^W = 4 outputs + C^A = 1 token
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0], dtype=torch.float64)
    plan.tracker.norms.copy_(norms)
    plan.tracker.epochs_done = 2  # past the exploration epoch; nothing recorded, so norms stay
    trials = 3000
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(trials):
        tuner.resample()
        (chosen,) = tuner.selection()["body"].tolist()
        counts[chosen] += 1
    assert counts[5] == 0
    expected = trials * norms[:5] / norms.sum()
    assert chi_square(counts[:5], expected) < 18.47  # df 4, p = 0.001


def test_measured_norms_are_the_sparse_backward_compact_gradient_norms():
    """N[c] after an epoch = mean over steps of ||dL/dW[:, c]||, as dense autograd computes it; no dense backward."""
    model = tokens_model(budget_kb=1.0)
    tuner = model.base_model
    torch.manual_seed(0)
    reference = Tokens()  # the same weights as the wrapped model
    plan = tuner.plans["default"]
    selection = tuner.selection()
    assert set(selection) == {"conv", "depthwise", "proj"}
    offsets = plan.pool.offsets()
    expected = torch.zeros(len(plan.pool), dtype=torch.float64)
    model.train()
    batches = [data(seed=s) for s in range(2)]
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()  # no optimizer step: the weights stay at the reference
        dense = copy.deepcopy(reference)
        F.cross_entropy(dense(x), y).backward()
        for name, idx in selection.items():
            module = dict(dense.named_modules())[name]
            grad = gather_channels(module.weight.grad, getattr(module, "groups", 1), idx)
            expected[offsets[name] + idx] += grad.flatten(1).norm(dim=1).double() / len(batches)
    for layer in tuner.medyate_layers().values():
        assert not layer.get_base_layer().weight.requires_grad
    tuner.resample()
    positions = torch.cat([offsets[name] + idx for name, idx in selection.items()])
    torch.testing.assert_close(plan.tracker.norms[positions], expected[positions], rtol=1e-4, atol=1e-7)


def test_same_seed_same_selections_other_seed_other_selections():
    runs = []
    for seed in (0, 0, 1):
        model = tokens_model(seed=seed)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        runs.append(run_epochs(model, optimizer, epochs=3))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_resumed_run_continues_identically():
    """A mid-training checkpoint restores the norm vector and the RNG: the next draws are the same."""
    model = tokens_model()
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    optimizer = torch.optim.SGD(params(model), lr=0.1)
    run_epochs(model, optimizer, epochs=2)
    state = copy.deepcopy(model.training_state_dict())
    head = copy.deepcopy(model.base_model.model.classifier.modules_to_save["default"].state_dict())
    expected = run_epochs(model, optimizer, epochs=3, first_epoch=2)

    resumed = tokens_model()
    resumed.load_training_state_dict(state)
    resumed.base_model.model.classifier.modules_to_save["default"].load_state_dict(head)
    tracker = resumed.base_model.plans["default"].tracker
    assert tracker.epochs_done == 2 and tracker.norms.max() > 0
    got = run_epochs(resumed, torch.optim.SGD(params(resumed), lr=0.1), epochs=3, first_epoch=2)
    assert got == expected
    torch.testing.assert_close(resumed.base_model.medyate_values["default"], model.base_model.medyate_values["default"])
