"""Property tests over random layer shapes, budgets and strategies (hypothesis).

For any Conv2d (kernel, groups incl. depthwise, stride, padding incl. 'same'/reflect/replicate/circular,
dilation) or Linear (2-D or token-shaped 3-D input) pair of layers, and any budget:
- a budget below the cheapest channel is refused, naming the cost, and the model is left as it was;
- the selection never costs more than the budget (costs recomputed here from the shapes), and a
  budget covering every channel selects every channel;
- the compact gradients equal dense autograd's on the selected weight slices, at the same weights;
- save_pretrained / PeftModel.from_pretrained round-trips the deltas exactly.
"""

from __future__ import annotations

import copy
import math
import tempfile

import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig
from medyate_peft.medyate.layer import MeDyateLayer

STRATEGIES = ["full_random", "static_random", "trady", "topk_random", "medyate"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_pairs(draw: st.DrawFn) -> tuple[nn.Module, list[int]]:
    groups = draw(st.sampled_from([1, 2, "depthwise"]))
    per_group_in = 1 if groups == "depthwise" else draw(st.integers(1, 3))
    g = draw(st.integers(2, 4)) if groups == "depthwise" else groups
    in_channels = g * per_group_in
    out_channels = g * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding_kind = draw(st.sampled_from(["int", "same", "reflect", "replicate", "circular"]))
    padding: int | str = draw(st.integers(0, 2))
    mode = "zeros"
    if padding_kind == "same":
        padding, stride = "same", 1
    elif padding_kind in ("reflect", "replicate", "circular"):
        mode, padding = padding_kind, max(int(padding), 1)
    size = (draw(st.integers(3, 7)), draw(st.integers(3, 7)))
    for k, s in zip(kernel, size, strict=True):
        pad = dilation * (k - 1) if padding == "same" else 2 * int(padding)
        assume(s + pad - dilation * (k - 1) >= 1)  # a non-empty output
    first = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=g, padding_mode=mode)
    second = nn.Conv2d(out_channels, draw(st.integers(1, 3)), 1)
    return nn.Sequential(first, nn.Tanh(), second), [in_channels, *size]


@st.composite
def linear_pairs(draw: st.DrawFn) -> tuple[nn.Module, list[int]]:
    features = [draw(st.integers(1, 6)) for _ in range(3)]
    tokens = draw(st.sampled_from([None, 1, 3]))
    model = nn.Sequential(nn.Linear(features[0], features[1]), nn.Tanh(), nn.Linear(features[1], features[2]))
    return model, ([features[0]] if tokens is None else [tokens, features[0]])


def _channel_costs(model: nn.Module, input_size: list[int]) -> dict[str, tuple[int, int]]:
    """Per layer (in_channels, slots per input channel) from the shapes alone: C^W + C^A of the spec."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for hook in hooks:
        hook.remove()
    costs = {}
    for name, x in inputs.items():
        layer = getattr(model, name)
        if isinstance(layer, nn.Conv2d):
            weight = layer.out_channels // layer.groups * math.prod(layer.kernel_size)
            costs[name] = (layer.in_channels, weight + x.shape[-1] * x.shape[-2])
        else:
            costs[name] = (layer.in_features, layer.out_features + math.prod(x.shape[1:-1]))
    return costs


def _slice(weight: torch.Tensor, groups: int, channel: int) -> torch.Tensor:
    """W[:, c] of input channel c: the rows of its group at column c mod (C/g), as (C'/g, kh*kw)."""
    out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
    group, column = divmod(channel, in_per_group)
    return weight[group * out_per_group : (group + 1) * out_per_group, column].reshape(out_per_group, -1)


@given(
    pair=st.one_of(conv_pairs(), linear_pairs()),
    share=st.floats(0.01, 1.3),  # budget as a share of what training every channel costs
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_budget_gradients_and_round_trip(pair, share: float, strategy: str, seed: int) -> None:
    base, input_size = pair
    torch.manual_seed(seed)
    for p in base.parameters():
        torch.nn.init.normal_(p)
    reference = copy.deepcopy(base)
    costs = _channel_costs(base, input_size)
    budget_kb = round(share * sum(n * slots for n, slots in costs.values()) * 4 / 1024, 3) or 0.001
    ranking = {"lara": {"0": 2.0, "2": 1.0}, "rgn": {"0": 1.0, "2": 2.0}}
    config = MeDyateConfig(budget_kb=budget_kb, input_size=input_size, strategy=strategy, seed=seed,
                           layer_ranking=ranking, modules_to_save=[])
    budget = math.floor(budget_kb * 1024 / 4)
    cheapest = min(slots for _, slots in costs.values())
    if budget < cheapest:
        try:
            get_peft_model(base, config)
        except ValueError as err:
            assert f"needs {cheapest} slots" in str(err)
            assert not any(isinstance(m, MeDyateLayer) for m in base.modules()), "the model was left wrapped"
            event("budget below the cheapest channel: refused")
            return
        raise AssertionError(f"budget of {budget} slots < cheapest channel {cheapest} was accepted")
    try:
        model = get_peft_model(base, config)
    except ValueError as err:  # a ranking strategy pre-selected only layers whose channels all cost more
        assert "pre-selected" in str(err) and budget < max(slots for _, slots in costs.values())
        event("pre-selected layers too expensive: refused")
        return
    tuner = model.base_model

    # 1. the budget holds; a budget over every channel trains every channel
    selection = tuner.selection()
    spent = sum(len(idx) * costs[name][1] for name, idx in selection.items())
    assert 0 < spent <= budget
    if budget >= sum(n * slots for n, slots in costs.values()):
        assert {name: len(idx) for name, idx in selection.items()} == {name: n for name, (n, _) in costs.items()}
        event("budget covers every channel")
    event(f"trained: {type(base[0]).__name__}, {len(selection)} layer(s) selected, {strategy}")

    # 2. compact gradients = dense autograd's slices, at the same (base + trained) weights
    values = tuner.medyate_values["default"]
    with torch.no_grad():
        values.normal_()
    layers = tuner.medyate_layers()
    dense = copy.deepcopy(reference)
    segments = {}
    for name, layer in layers.items():
        if "default" not in layer.live:
            continue
        _, sel = layer.live["default"]
        segments[name] = (sel.idx, values.detach()[sel.offset : sel.offset + sel.numel].view(len(sel.idx), -1))
        with torch.no_grad():
            weight = getattr(dense, name).weight
            for channel, flat in zip(sel.idx.tolist(), segments[name][1], strict=True):
                _slice(weight, layer.groups, channel).add_(flat.view(weight.shape[0] // layer.groups, -1))
    x = torch.randn(3, *input_size)
    out = model(x)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    dense_out = dense(x)
    (dense_out * probe).sum().backward()
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-5)
    for name, (idx, _) in segments.items():
        _, sel = layers[name].live["default"]
        compact = values.grad[sel.offset : sel.offset + sel.numel].view(len(idx), -1)
        weight = getattr(dense, name).weight
        expected = torch.stack([_slice(weight.grad, layers[name].groups, c).reshape(-1) for c in idx.tolist()])
        torch.testing.assert_close(compact, expected, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")
    used = sum(layers[n].live["default"][1].numel for n in segments)
    assert not values.grad[used:].any(), "slots beyond the selection got a gradient"

    # 3. save / load round trip, exact
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(copy.deepcopy(reference), folder)
    loaded_layers = loaded.base_model.medyate_layers()
    for name, layer in layers.items():
        index, delta = layer.folded_delta("default")
        changed = delta.flatten(1).abs().amax(dim=1) > 0 if len(index) else torch.zeros(0, dtype=torch.bool)
        got_index, got_delta = loaded_layers[name].folded_delta("default")
        assert torch.equal(got_index, index[changed]) and torch.equal(got_delta, delta[changed]), name
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)
