"""Linear layers train with a compact term for their changed channels instead of a kept effective weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads_match
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.pytorch_utils import Conv1D

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig

WIDTH, DEPTH, BATCH = 64, 4, 4


class LargestAllocation(TorchDispatchMode):
    """The most elements of a new tensor any op returned (views and in-place results are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0]
                 if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.numel = max([self.numel, *sizes])
        return out


class Conv1DNet(nn.Module):
    """GPT-2 style: transformers' Conv1D layers, weights stored (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(DEPTH) for m in (Conv1D(WIDTH, WIDTH), nn.Tanh())])
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def base_net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        return Conv1DNet()
    return nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())], nn.Linear(WIDTH, 3))


def loss_of(x: torch.Tensor, y: torch.Tensor):
    return lambda m: F.cross_entropy(m(x).float(), y)


def trained(kind: str, dtype: torch.dtype):
    """A wrapped net with stored non-zero deltas (one resample) and non-zero live values on top."""
    base = base_net(kind).to(dtype)
    head = "head" if kind == "conv1d" else str(2 * DEPTH)
    config = MeDyateConfig(budget_kb=2.0, input_size=[WIDTH], strategy="full_random", seed=0, modules_to_save=[head])
    model = get_peft_model(base, config)
    x, y = torch.randn(BATCH, WIDTH, dtype=dtype), torch.randint(0, 3, (BATCH,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for resample in (True, False):
        optimizer.zero_grad(set_to_none=True)
        loss_of(x, y)(model).backward()
        optimizer.step()
        if resample:
            model.base_model.resample(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return model, x, y


@pytest.mark.parametrize(("kind", "dtype"), [("linear", torch.float32), ("linear", torch.bfloat16),
                                             ("conv1d", torch.float32)])
def test_compact_term_trains_like_dense_autograd_of_the_merged_weights(kind, dtype):
    model, x, y = trained(kind, dtype)
    layers = model.base_model.medyate_layers()
    stored = {n: layer.folded_delta("default") for n, layer in layers.items()}
    assert all(0 < len(index) <= WIDTH // 4 for index, _ in stored.values())
    assert sum(int((d != 0).any(dim=(1, 2)).sum()) for _, d in stored.values()) > len(stored)  # changed channels
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():  # inference: the merged arithmetic
        assert torch.equal(model(x), merged(x))
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 5e-2}
    with LargestAllocation() as largest:
        loss_of(x, y)(model).backward()
    assert largest.numel < WIDTH * WIDTH  # no op of the step made a weight-sized tensor
    assert all(layer._weight_cache is None for layer in layers.values())  # and no layer keeps one
    for p in model.parameters():
        p.grad = None
    assert assert_grads_match(model, merged, loss_of(x, y), **tol) >= 2

    inputs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    outputs = model(inputs[0]), merged(inputs[1])
    torch.testing.assert_close(outputs[0], outputs[1], **tol)
    grads = torch.autograd.grad(outputs[0].float().sum(), inputs[0]), torch.autograd.grad(outputs[1].float().sum(), inputs[1])
    torch.testing.assert_close(grads[0], grads[1], **tol)


def test_stored_channels_are_the_changed_and_the_selected_ones():
    model, _, _ = trained("linear", torch.float32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.base_model.resample(optimizer)
    for name, layer in model.base_model.medyate_layers().items():
        index, delta = layer.medyate_index["default"], layer.medyate_delta["default"]
        selected = layer.live["default"][1].idx if "default" in layer.live else index[:0]
        assert bool(((delta != 0).any(dim=(1, 2)) | torch.isin(index, selected)).all()), name
        assert bool(torch.isin(selected, index).all()), name


def test_many_stored_channels_fall_back_to_the_kept_weight():
    model, x, y = trained("linear", torch.float32)
    layer = next(iter(model.base_model.medyate_layers().values()))
    index = torch.arange(WIDTH // 2)
    layer.set_delta("default", index, torch.randn(len(index), WIDTH, 1))
    layer.set_live("default", *layer.live["default"])
    assert layer._compact_delta() is None
    loss_of(x, y)(model).backward()
    assert layer._weight_cache is not None
