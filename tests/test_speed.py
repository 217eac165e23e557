"""Step cost follows the trained channels: flat in the budget, no weight-sized copies, no graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig
from medyate_peft.medyate.layer import Linear

WIDTH, DEPTH = 96, 12


class Allocations(TorchDispatchMode):
    """Bytes of the new storages every op returns, and how often each op ran (views allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.calls: dict[str, int] = {}
        self.copies: list[int] = []  # numel of every clone/copy an op made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
            self.copies.append(out.numel())
        fresh = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                 for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        self.bytes += sum(n for ptr, n in fresh.items() if ptr not in inputs)
        return out


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 4))


def wrapped(budget_kb: float, selected: torch.Tensor | None = None) -> nn.Module:
    config = MeDyateConfig(budget_kb=budget_kb, input_size=[WIDTH], strategy="full_random", seed=0,
                           modules_to_save=[str(2 * DEPTH)])
    model = get_peft_model(mlp(), config)
    if selected is not None:  # hold the selection fixed while the budget grows
        tuner = model.base_model
        tuner.plans["default"].selected = selected.clone()
        tuner._apply_selection("default")
    return model


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_step_allocation_and_time_stay_flat_as_the_budget_grows_with_the_selection_fixed() -> None:
    small = wrapped(2.0)
    selected = small.base_model.plans["default"].selected
    models = {kb: small if kb == 2.0 else wrapped(kb, selected) for kb in (2.0, 32.0, 512.0)}
    x, y = torch.randn(8, WIDTH), torch.randint(0, 4, (8,))
    optimizers = {kb: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
                  for kb, m in models.items()}
    capacity = {kb: m.base_model.medyate_values["default"].numel() for kb, m in models.items()}
    layers = len(small.base_model.selection())
    assert layers > 3 and capacity[512.0] > 8 * capacity[2.0]
    allocated, ops = {}, {}
    for kb, model in models.items():
        step(model, optimizers[kb], x, y)  # warm-up: the kept effective weights are built here
        with Allocations() as counter:
            step(model, optimizers[kb], x, y)
        allocated[kb], ops[kb] = counter.bytes, counter.calls
    # The work is the same ops on the same selection, whatever the budget (wall time on a shared machine
    # says less than this); the bytes grow by the flat vector's own gradient (.grad has its shape), made
    # once per step: a scatter into the whole vector in each selected layer would add `layers` times that.
    assert ops[512.0] == ops[2.0]
    vector_bytes = 4 * (capacity[512.0] - capacity[2.0])
    assert vector_bytes <= allocated[512.0] - allocated[2.0] < 1.05 * vector_bytes, (allocated, vector_bytes)


def test_effective_weight_is_kept_and_refreshed_in_place_bit_exact(monkeypatch) -> None:
    # The kept weight of Conv2d layers, and of Linear ones whose stored channels exceed `compact_fraction`.
    monkeypatch.setattr(Linear, "compact_fraction", 0.0)
    model = wrapped(4.0)
    tuner = model.base_model
    layer = next(m for m in tuner.medyate_layers().values() if "default" in m.live)
    x, y = torch.randn(8, WIDTH), torch.randint(0, 4, (8,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    step(model, optimizer, x, y)
    kept = layer.effective_weight()
    assert layer.effective_weight() is kept  # no change, no work
    with Allocations() as counter:
        step(model, optimizer, x, y)
    # Forward and backward rebuilt no weight (the old path cloned it twice per layer per step): the only
    # copies are the live channels' slices, selection-sized.
    assert counter.copies and max(counter.copies) < WIDTH * WIDTH, counter.copies
    refreshed = layer.effective_weight()  # after the optimizer step: the live slices rewritten in place
    assert refreshed is kept
    adapters = tuple(a for a in layer._contributing_adapters() if len(layer.medyate_index[a]))
    rebuilt = layer._build_weight(layer.get_base_layer().weight.detach(), adapters)
    assert torch.equal(refreshed, rebuilt) and not torch.equal(refreshed, layer.get_base_layer().weight)
    tuner.resample(optimizer)  # folded into the deltas: a new weight, equal to a rebuild
    assert torch.equal(layer.effective_weight(), rebuilt)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = F.relu(self.pw(self.dw(x))) + x
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("lean", [False, True], ids=["lean-off", "lean-on"])
def test_torch_compile_meets_no_graph_break_in_the_tuner_layers_and_kernels(lean: bool) -> None:
    torch.manual_seed(0)
    config = MeDyateConfig(budget_kb=2.0, input_size=[3, 8, 8], strategy="full_random", lean_backward=lean,
                           modules_to_save=["head"])
    model = get_peft_model(ConvNet(), config)
    model.train()
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()  # eager first: planned, weights kept
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    ours = ("medyate_peft/kernels.py", "medyate_peft/medyate/layer.py", "medyate_peft/medyate/model.py")
    breaks = [(r.reason.splitlines()[0], [f"{f.filename}:{f.lineno}" for f in r.user_stack])
              for r in explained.break_reasons]
    from_us = [b for b in breaks if any(f.startswith(ours) or any(o in f for o in ours) for f in b[1])]
    assert not from_us, from_us
    if not lean:
        assert explained.graph_break_count == 0, breaks
