"""Lean backward (medyate_peft/lean.py): exact gradients, far fewer saved bytes on the frozen path."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig
from medyate_peft.lean import EvalBatchNorm, WindowMaxPool2d, is_lean, lean_backward, pack_bits, unpack_bits


def _randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Fresh timm models have identity BatchNorms; give them statistics that change the gradient."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(size, generator=generator) * 0.2 + 1)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return model


def _wrap(
    base: nn.Module, input_size: list[int], budget_kb: float = 64, lean: bool = True, recompute: bool = False
) -> nn.Module:
    config = MeDyateConfig(budget_kb=budget_kb, input_size=input_size, strategy="full_random", seed=0,
                           lean_backward=lean, lean_recompute=recompute)
    return get_peft_model(base, config)


def _grads(model, run) -> dict[str, torch.Tensor]:
    """Every gradient one seeded step produces: flat vector, head, and the input's (what `run` returns)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # same dropout draws in both runs
    inp = run(model)
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    out["<input>"] = inp.grad.clone()
    return out


def _assert_same_grads(model, run) -> None:
    """Gradients with the option switched off (plain autograd) and on (as configured) are equal."""
    assert is_lean(model.base_model.model)
    with lean_backward(model.base_model.model, False):
        assert not is_lean(model.base_model.model)
        plain = _grads(model, run)
    lean = _grads(model, run)
    assert plain.keys() == lean.keys() and "<input>" in plain and len(plain) >= 3, plain.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, f"{name}: zero gradient, the test would prove nothing"
        torch.testing.assert_close(lean[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _image_step(model) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    F.cross_entropy(model(x), torch.tensor([1, 7])).backward()
    return x


def _frozen_ratio(model, *args, **kwargs) -> float:
    report = model.memory_report(*args, **kwargs)
    off, on = report.lean_comparison["off"], report.lean_comparison["on"]
    assert on["selected_saved_bytes"] == off["selected_saved_bytes"] > 0
    assert report.measured_frozen_path_saved_bytes == on["frozen_path_saved_bytes"]
    return off["frozen_path_saved_bytes"] / on["frozen_path_saved_bytes"]


# Measured at 32x32: lean saves 43x / 52x / 19x less on the frozen path; asserted with margin.
@pytest.mark.parametrize(
    ("name", "min_ratio"), [("mobilenetv2_050", 25), ("tf_efficientnet_lite0", 25), ("resnet10t", 10)]
)
def test_timm_cnn_gradients_equal_and_frozen_path_shrinks(name, min_ratio):
    model = _wrap(_randomise_batch_norms(timm.create_model(name, pretrained=False, num_classes=10)), [3, 32, 32])
    _assert_same_grads(model, _image_step)
    assert _frozen_ratio(model, torch.randn(2, 3, 32, 32)) > min_ratio


def _token_step(model, ids: torch.Tensor, labels: torch.Tensor):
    """A step with a gradient down to the embeddings (every layer on the path), and its inputs for a report."""

    def embeds() -> torch.Tensor:
        return model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def step(model) -> torch.Tensor:
        inputs = embeds()
        model(inputs_embeds=inputs, labels=labels).loss.backward()
        return inputs

    return step, {"inputs_embeds": embeds(), "labels": labels}


def _per_layer(report, prefix: str, i: int) -> dict[str, int]:
    return {k.removeprefix(f"{prefix}.{i}."): v for k, v in report.saved_bytes_by_module.items()}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("recompute", [False, True])
def test_bert_gradients_equal_with_dropout_and_frozen_path_shrinks(attention, recompute):
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        vocab_size=500, max_position_embeddings=32, attn_implementation=attention)
    torch.manual_seed(0)
    model = _wrap(BertForSequenceClassification(config), [16], recompute=recompute)
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    step, inputs = _token_step(model, ids, torch.tensor([0, 1]))
    _assert_same_grads(model, step)  # train mode: dropout (attention probabilities too) drawn identically
    report = model.memory_report(**inputs)
    hidden = 2 * 16 * 64 * 4  # one fp32 hidden state of the batch
    for i in range(2):
        saved = _per_layer(report, "bert.encoder.layer", i)
        # GELU keeps its input (2x hidden here); with recompute nothing new: it reruns LayerNorm and dense
        # from the LayerNorm's input, which the LayerNorm keeps anyway.
        assert saved.get("intermediate.intermediate_act_fn", 0) == (0 if recompute else 2 * hidden)
        assert saved["output.dropout"] == hidden // 4 // 8  # keep-mask bits, not fp32 noise
        # query, key, value: no probabilities, no dropout noise; with recompute, above the first block, nothing:
        # the module reruns from the input the LayerNorm below it keeps
        assert saved.get("attention.self", 0) == (0 if recompute and i else 3 * hidden)
    off, on = (report.lean_comparison[k]["frozen_path_saved_bytes"] for k in ("off", "on"))
    assert off / on > (2.5 if recompute else 1.4)  # measured 2.77x / 1.51x


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("recompute", [False, True])
def test_llama_decoder_gradients_equal_and_gated_mlp_keeps_less(attention, recompute):
    """SiLUActivation, RMSNorm, rotary q/k, grouped-query attention and the gated MLP of a Llama decoder."""
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=500, max_position_embeddings=32, pad_token_id=0,
                         attn_implementation=attention, use_cache=False)
    torch.manual_seed(0)
    model = _wrap(LlamaForSequenceClassification(config), [16], recompute=recompute)
    ids = torch.randint(1, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    step, inputs = _token_step(model, ids, torch.tensor([0, 1]))
    _assert_same_grads(model, step)
    report = model.memory_report(**inputs)
    hidden, mlp = 2 * 16 * 64 * 4, 2 * 16 * 96 * 4
    for i in range(2):
        saved = _per_layer(report, "model.layers", i)
        # gate and up, not also act(gate); with recompute nothing new (the RMSNorm's kept input)
        assert saved.get("mlp", 0) == (0 if recompute else 2 * mlp)
        assert "mlp.act_fn" not in saved
        if recompute:  # the module reruns from the input its RMSNorm keeps (the embeddings need a gradient here)
            assert "self_attn" not in saved
            continue
        # query (4 heads) and key, value (2 heads each), before the core repeats them
        shared = 3 * 2 * 16 * 16 * 4  # at most: rotary cos and sin, the eager 4-D mask (all layers share them)
        assert 2 * hidden <= saved["self_attn"] <= 2 * hidden + shared
    off, on = (report.lean_comparison[k]["frozen_path_saved_bytes"] for k in ("off", "on"))
    assert off / on > (3.0 if recompute else 1.25)  # measured eager 3.84x / 1.41x, SDPA 3.53x / 1.31x


# In the proportions of BERT-base and of the ~110M Llama of scripts/bench_lean_transformers.py (heads x sequence
# / hidden = 2, MLP width / hidden, a third of the heads for key/value), small enough to take seconds.
_BENCH_SHAPED = {
    "bert": lambda: BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=500,
        max_position_embeddings=64)),
    "llama": lambda: LlamaForSequenceClassification(LlamaConfig(
        hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256,
        vocab_size=500, max_position_embeddings=64, pad_token_id=0, use_cache=False)),
}


@pytest.mark.parametrize("network", list(_BENCH_SHAPED))
def test_recompute_keeps_at_most_a_quarter_of_autograds_frozen_path(network):
    """The lowest trained layer in the first block, frozen embeddings: the frozen path keeps <= 0.25x of plain
    autograd's bytes, with the same gradients."""
    torch.manual_seed(0)
    model = _wrap(_BENCH_SHAPED[network](), [32], recompute=True)
    ids = torch.randint(1, 500, (2, 32), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1])
    step, _ = _token_step(model, ids, labels)
    _assert_same_grads(model, step)
    report = model.memory_report(input_ids=ids, labels=labels)
    selected = set(model.base_model.selection("default"))
    assert any(".0." in name for name in selected)  # trained channels in the first block
    off, on = (report.lean_comparison[k]["frozen_path_saved_bytes"] for k in ("off", "on"))
    assert on / off <= 0.25  # measured 0.169 (BERT-shaped), 0.209 (Llama-shaped)


def test_recompute_reruns_pre_norm_vit_attention_called_with_a_positional_mask():
    """ViT: LayerNorm, then attention(hidden, mask): rerun from the norm's input, dropout drawn again identically."""
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = _wrap(ViTForImageClassification(config), [3, 16, 16], recompute=True)

    def step(model) -> torch.Tensor:
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        F.cross_entropy(model(pixel_values=x).logits, torch.tensor([0, 2])).backward()
        return x

    _assert_same_grads(model, step)
    report = model.memory_report(pixel_values=torch.randn(2, 3, 16, 16))
    assert not any(".attention" in name for name in report.saved_bytes_by_module), report.saved_bytes_by_module


def test_recompute_with_a_filled_cache_warns_and_keeps_attention_inputs():
    """A rerun would fill a training key/value cache twice: attention keeps q/k/v instead, and says how to avoid it."""
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=48, vocab_size=100, max_position_embeddings=16, pad_token_id=0)
    torch.manual_seed(0)
    model = _wrap(LlamaForSequenceClassification(config), [8], recompute=True)
    step, _ = _token_step(model, torch.randint(1, 100, (2, 8)), torch.tensor([0, 1]))
    with pytest.warns(UserWarning, match="use_cache=False"):
        _assert_same_grads(model, step)


def test_recompute_refuses_a_norm_input_changed_in_place_before_backward():
    """What the attention reruns from must be what the norm saw, as autograd requires of any saved tensor."""
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=48, vocab_size=100, max_position_embeddings=16, pad_token_id=0,
                         use_cache=False)
    torch.manual_seed(0)
    model = _wrap(LlamaForSequenceClassification(config), [8], recompute=True)
    model.train()
    seen = []
    norm = model.base_model.model.model.layers[1].input_layernorm
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    loss = model(input_ids=torch.randint(1, 100, (2, 8)), labels=torch.tensor([0, 1])).loss
    handle.remove()
    with torch.no_grad():
        seen[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified (in place|by an inplace operation)"):
        loss.backward()


def test_recompute_through_batch_norm_and_unload_restores_forwards():
    """conv(4->16) -> BN -> hard-swish keeps the 4-channel input, not the 16-channel activation."""
    torch.manual_seed(0)
    base = _randomise_batch_norms(nn.Sequential(OrderedDict(
        expand=nn.Conv2d(4, 16, 1), bn=nn.BatchNorm2d(16), act=nn.Hardswish(), project=nn.Conv2d(16, 4, 3),
        relu=nn.ReLU6(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 3),
    )))
    plain = _wrap(copy.deepcopy(base), [4, 8, 8], budget_kb=1, lean=False, recompute=True)
    plain_report = plain.memory_report(compare_lean=False)
    assert not is_lean(plain) and plain_report.lean_backward is False and plain_report.lean_comparison is None
    assert "kB/sample" in str(plain_report) and "lean backward" not in str(plain_report)
    model = _wrap(base, [4, 8, 8], budget_kb=1, recompute=True)

    def step(model) -> torch.Tensor:
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        model(x).square().sum().backward()
        return x

    _assert_same_grads(model, step)
    report = model.memory_report(torch.randn(2, 4, 8, 8, requires_grad=True))  # the whole net is on the path
    by_module = report.saved_bytes_by_module
    assert by_module["act"] == 2 * 4 * 8 * 8 * 4  # the conv's input, fp32
    assert "bn" not in by_module
    assert report.lean_comparison["off"]["frozen_path_saved_bytes"] > 5 * report.measured_frozen_path_saved_bytes
    assert "without lean backward" in str(report) and "with lean backward" in str(report)

    merged = model.merge_and_unload()
    assert not is_lean(merged) and not any("forward" in vars(m) for m in merged.modules())


def test_bit_pack_round_trip_writes_numpys_bytes():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 16, 4, 4)]:
        mask = torch.rand(shape, generator=generator) > 0.5
        packed = pack_bits(mask)
        expected = torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
        assert packed.dtype == torch.uint8 and torch.equal(packed, expected)
        assert torch.equal(unpack_bits(packed, mask.shape), mask)
        # from a view that does not start on an int64 boundary
        assert torch.equal(pack_bits(torch.cat([mask.new_zeros(3), mask.reshape(-1)])[3:]), expected)
    every = torch.arange(256, dtype=torch.uint8)  # every byte value unpacks and packs back
    assert torch.equal(pack_bits(unpack_bits(every, torch.Size([2048]))), every)


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.LeakyReLU(0.3), nn.Hardtanh(-2.0, 3.0)],
                         ids=lambda m: repr(m))
def test_masked_activation_gradients_are_autograds_bit_for_bit(module: nn.Module):
    """From the packed mask: 1 or the slope per element, times the gradient, as autograd's kernels form it."""
    from medyate_peft.lean import _lean_masked

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 9, 9, generator=g) * 3
    # the kinks and NaN: there the derivative is what autograd's kernel defines
    x[0, 0, 0, :5] = torch.tensor([0.0, -0.0, -2.0, 3.0, float("nan")])
    grad = torch.randn(x.shape, generator=g)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(module(leaf), leaf, grad)
    y = _lean_masked(module, leaf)
    torch.testing.assert_close(y, module(x), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.autograd.grad(y, leaf, grad)[0], expected)


def test_eval_batch_norm_function_equals_batch_norm():
    bn = _randomise_batch_norms(nn.BatchNorm2d(6)).eval().requires_grad_(False)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    grad = torch.randn(3, 6, 5, 5)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    y = EvalBatchNorm.apply(x, bn)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], expected_grad)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil"),
                         [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False)])
def test_window_max_pool_matches_max_pool(kernel, stride, padding, dilation, ceil):
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil)
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    y = WindowMaxPool2d.apply(x, pool)
    torch.testing.assert_close(y, pool(x), rtol=0, atol=0)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(pool(x), x, grad)[0])


def _lean_graph_breaks(step, *args) -> list[str]:
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_count >= 1
    # where each break happened: the innermost frame of its stack
    return [reason.reason for reason in explanation.break_reasons if reason.user_stack[-1].filename.endswith("lean.py")]


@pytest.mark.slow  # two compilations: ~80 s on 2 shared cores
def test_compiled_step_breaks_no_graph_in_the_lean_backward():
    """torch.compile traces every lean op (masks, bit packing, eval BN, dropout, pooling, attention, gated MLP)."""
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
        nn.Dropout(0.2), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4),
    )
    model = _wrap(_randomise_batch_norms(base), [3, 16, 16], budget_kb=4)
    model.train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).sum().backward()  # plan the selection outside the compiled region
    assert _lean_graph_breaks(lambda x: model(x).sum(), x) == []

    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=48, vocab_size=100, max_position_embeddings=16, pad_token_id=0)
    decoder = _wrap(LlamaForSequenceClassification(config), [8], budget_kb=4)
    decoder.train()
    embeds = decoder.get_input_embeddings()(torch.randint(1, 100, (2, 8))).detach().requires_grad_(True)
    decoder(inputs_embeds=embeds).logits.sum().backward()
    assert _lean_graph_breaks(lambda e: decoder(inputs_embeds=e).logits.sum(), embeds) == []
