"""Step cost follows the trained channels: flat in the budget, no weight-sized copies, no graph breaks, no
host waits and nothing float64 on a device that has none."""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

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


class GroupedConvs(nn.Module):
    """One conv of each channel layout the kept weight is refreshed in: dense, depthwise, grouped (2 per group)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.grouped(F.relu(self.depthwise(F.relu(self.dense(x)))))).mean((2, 3)))


def test_kept_conv_weights_follow_each_step_and_a_swapped_vector_bit_exact() -> None:
    torch.manual_seed(0)
    config = MeDyateConfig(budget_kb=64, input_size=[3, 8, 8], strategy="full_random", seed=0, modules_to_save=["head"])
    model = get_peft_model(GroupedConvs(), config)
    tuner = model.base_model
    layers = tuner.medyate_layers()
    assert {name.split(".")[-1] for name in tuner.selection()} == {"dense", "depthwise", "grouped"}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def rebuilt(layer) -> torch.Tensor:
        adapters = tuple(a for a in layer._contributing_adapters() if len(layer.medyate_index[a]))
        return layer._build_weight(layer.get_base_layer().weight.detach(), adapters)

    step(model, optimizer, x, y)
    kept = {name: layer.effective_weight() for name, layer in layers.items()}
    step(model, optimizer, x, y)
    for name, layer in layers.items():  # the live channels rewritten in place, the same values as a rebuild
        assert layer.effective_weight() is kept[name]
        assert torch.equal(kept[name], rebuilt(layer)), name
        assert not torch.equal(kept[name], layer.get_base_layer().weight), name
    values = tuner.medyate_values["default"]
    with torch.no_grad():
        values.data = values.data * 2  # a new storage (as `.data` assignment by some optimizers or users)
    for name, layer in layers.items():
        assert torch.equal(layer.effective_weight(), rebuilt(layer)), name


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
    ours = tuple(f"medyate_peft/{m}"
                 for m in ("kernels.py", "lean.py", "planner.py", "medyate/layer.py", "medyate/model.py"))
    breaks = [(r.reason.splitlines()[0], [f"{f.filename}:{f.lineno}" for f in r.user_stack])
              for r in explained.break_reasons]
    from_us = [b for b in breaks if any(f.startswith(ours) or any(o in f for o in ours) for f in b[1])]
    assert not from_us, from_us
    if not lean:
        assert explained.graph_break_count == 0, breaks


# -- host synchronisation ---------------------------------------------------------------------------
_SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero", "unique")


class HostSyncs:
    """Calls made from medyate_peft that wait for the device on a GPU: reading values on the host, moving to
    the CPU, data-dependent shapes (nonzero/unique/boolean-mask indexing). torch.cuda.set_sync_debug_mode
    needs a GPU; counting the Python calls works on the CPU too."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        for name in _SYNCING:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "unique", "masked_select", "equal"):
            monkeypatch.setattr(torch, name, self._counted(name, getattr(torch, name)))
        to, getitem = torch.Tensor.to, torch.Tensor.__getitem__
        monkeypatch.setattr(torch.Tensor, "to", self._counted("to another device", to, lambda t, *a, **k: any(
            isinstance(d, (str, torch.device)) and torch.device(d) != t.device for d in (*a, *k.values()))))
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._counted("boolean-mask indexing", getitem, lambda t, i: any(
            isinstance(j, torch.Tensor) and j.dtype == torch.bool for j in (i if isinstance(i, tuple) else (i,)))))

    def _counted(self, name: str, fn, when=None):
        def wrapper(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1] if "medyate_peft" in f.filename]
                if ours:
                    self.calls.append((name, ours[-1]))
            return fn(*args, **kwargs)
        return wrapper


class Relu6Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.c2, self.c3, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.c1(x)))
        return self.head(self.act(self.c3(self.c2(x))).mean((2, 3)))


def relu6_model() -> nn.Module:
    torch.manual_seed(0)
    ranking = {"c1": 1.0, "c2": 1.0, "c3": 1.0}
    config = MeDyateConfig(budget_kb=2.0, input_size=[3, 8, 8], strategy="medyate", modules_to_save=["head"],
                           layer_ranking={"lara": ranking, "rgn": ranking})
    model = get_peft_model(Relu6Net(), config)
    model.train()
    return model


def test_a_training_step_waits_for_the_device_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channel norms, the NaN/inf flag, the epoch watch and the kept weights' refresh stay on the device;
    with the host checks at their accelerator interval, a step calls nothing that waits for the device."""
    from medyate_peft import epochs, guards

    monkeypatch.setitem(guards.CHECK_EVERY, "cpu", guards.DEVICE_CHECK_EVERY)  # as on a GPU
    monkeypatch.setitem(epochs.CHECK_EVERY, "cpu", epochs.DEVICE_CHECK_EVERY)
    model = relu6_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(6)]
    for x, y in data[:2]:
        step(model, optimizer, x, y)  # planned, weights kept
    assert model.base_model.plans["default"].layout is not None
    syncs = HostSyncs(monkeypatch)
    for x, y in data[2:]:
        step(model, optimizer, x, y)
    monkeypatch.undo()
    assert not syncs.calls, syncs.calls
    syncs = HostSyncs(monkeypatch)  # the counter sees the checks where they run: every step on the CPU
    step(model, optimizer, *data[0])
    monkeypatch.undo()
    assert {where.split("medyate_peft/")[1].split(":")[0] for _, where in syncs.calls} == {"epochs.py", "guards.py"}


class Float64Ops(TorchDispatchMode):
    """The ops that returned a float64 tensor (MPS has none: each would fail there)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten(out)[0]):
            self.ops.add(str(func))
        return out


def test_a_training_step_on_a_device_without_float64_makes_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a step keeps on the device (channel-norm sums, the epoch watch's fingerprints) is float32 where
    the device has no float64 (Apple's MPS: `wide_float` says so; on the CPU, simulated by patching it).
    BatchNorm's backward has its own test (below): on the CPU it computes in float64 as ATen's kernel does."""
    from medyate_peft import sampling

    def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        config = MeDyateConfig(budget_kb=2.0, input_size=[3, 8, 8], strategy="full_random", seed=0,
                               modules_to_save=["head"])
        model = get_peft_model(GroupedConvs(), config)
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    model, optimizer = model_and_optimizer()
    step(model, optimizer, *data[0])  # planned, weights kept
    with Float64Ops() as cpu:
        step(model, optimizer, *data[1])
    assert cpu.ops  # the norm sums are float64 where the device has it: the check below can fail
    monkeypatch.setattr(sampling, "wide_float", lambda device: torch.float32)
    model, optimizer = model_and_optimizer()
    step(model, optimizer, *data[0])
    with Float64Ops() as mps:
        for x, y in data[1:]:
            step(model, optimizer, x, y)
    assert not mps.ops, mps.ops
    tracker = model.base_model.plans["default"].tracker
    assert tracker.epoch_sum.dtype == torch.float32 and tracker.epoch_sum.sum() > 0
    model.base_model.resample(optimizer)  # on the host, in float64 again
    assert tracker.norms.dtype == torch.float64 and tracker.norms.sum() > 0


def test_eval_batchnorm_backward_off_the_cpu_makes_no_float64() -> None:
    from medyate_peft.lean import EvalBatchNorm

    bn = nn.BatchNorm2d(4).eval().requires_grad_(False).to("meta")
    x = torch.empty(2, 4, 3, 3, device="meta", requires_grad=True)
    with Float64Ops() as meta:
        EvalBatchNorm.apply(x, bn).sum().backward()
    assert x.grad is not None and not meta.ops, meta.ops


def test_non_finite_gradients_are_caught_at_the_next_host_check_on_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from medyate_peft import guards

    monkeypatch.setitem(guards.CHECK_EVERY, "cpu", 3)
    model = relu6_model()
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()  # backward 1
    (model(x).sum() * float("nan")).backward()  # backward 2: noted on the device, not read yet
    last = list(model.base_model.selection())[-1]
    with pytest.raises(guards.NonFiniteError, match=rf"layer '{last}' \(epoch 0\) on all \d+ selected input channels"):
        model(x).sum().backward()  # backward 3 is clean, but its check finds backward 2's NaN
    (model(x).sum() * float("nan")).backward()  # not read before the epoch ends: resample() reads it first
    plan = model.base_model.plans["default"]
    selected = plan.selected.clone()
    with pytest.raises(guards.NonFiniteError, match=rf"layer '{last}' \(epoch 0\)"):
        model.base_model.resample()
    assert plan.epoch == 0 and torch.equal(plan.selected, selected)


def _watch_read_every_4_batches(monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    """A model whose epoch watch reads its verdict every 4 batches (as on an accelerator), its optimizer, 5 batches."""
    from medyate_peft import epochs

    monkeypatch.setitem(epochs.CHECK_EVERY, "cpu", 4)
    model = relu6_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(5)]
    return model, optimizer, data


def test_the_epoch_watch_reads_its_verdict_every_few_batches_on_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, data = _watch_read_every_4_batches(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in data + data[:2]:  # the data comes round at batch 6; batch 8 is the next check
            step(model, optimizer, x, y)
        assert not [w for w in caught if "came round again" in str(w.message)]
        step(model, optimizer, *data[2])
    assert [str(w.message) for w in caught if "came round again" in str(w.message)][0].startswith(
        "MeDyate: the training data came round again after 5 batches")


def test_a_came_round_verdict_still_on_the_device_is_read_at_resample(monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, data = _watch_read_every_4_batches(monkeypatch)
    for x, y in data + data[:2]:  # came round at batch 6, not read yet (next check at batch 8)
        step(model, optimizer, x, y)
    with pytest.warns(UserWarning, match="came round again after 5 batches without resample") as caught:
        model.base_model.resample(optimizer)
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()  # points at the caller's resample()
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        for x, y in data:  # a fresh epoch after the resample: nothing to say
            step(model, optimizer, x, y)
        model.base_model.resample(optimizer)
    assert not [w for w in later if "came round again" in str(w.message)]
