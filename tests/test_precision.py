"""fp16 and bf16 base models: cast before or after get_peft_model, train, save, reload, merge; adapter dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads_match
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_core import ConvZoo
from test_integrations import tiny_bert

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig

HALF = [torch.bfloat16, torch.float16]
INPUT = [3, 12, 12]


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, *INPUT, generator=g).to(dtype), torch.randint(0, 5, (4,), generator=g)


def train(model, x, y, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        optimizer.step()
    model.eval()


def adapter_dtypes(model, adapter: str = "default") -> set[torch.dtype]:
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if n.endswith(f"medyate_values.{adapter}")
               or n.endswith(f"medyate_delta.{adapter}")]
    return {t.dtype for t in tensors}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cast", ["before", "after"])
def test_half_base_trains_saves_reloads_and_merges(dtype, cast, tmp_path):
    torch.manual_seed(0)
    base = ConvZoo()
    if cast == "before":  # the shape probe of input_size runs in the model's dtype
        base = base.to(dtype)
    reference = copy.deepcopy(base).to(dtype)
    model = get_peft_model(base, MeDyateConfig(budget_kb=8.0, input_size=INPUT, strategy="full_random"))
    if cast == "after":
        model = model.to(dtype)
    expected_adapter = {torch.float32} if cast == "before" else {dtype}  # .to() casts adapters too, as for LoRA
    assert adapter_dtypes(model) == expected_adapter
    x, y = batch(dtype)
    train(model, x, y)
    with torch.no_grad():
        adapted = model(x)
        assert adapted.dtype == dtype and not torch.equal(adapted, reference(x))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for k, t in saved.items() if k.endswith("medyate_delta")} == expected_adapter
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert adapter_dtypes(loaded) == {torch.float32}  # autocast_adapter_dtype=True on a half base
    with torch.no_grad():
        assert torch.equal(loaded(x), adapted)
        merged = loaded.merge_and_unload()
        assert all(p.dtype == dtype for p in merged.parameters())
        assert torch.equal(merged(x), adapted)  # merging rounds exactly as the forward does


@pytest.mark.parametrize("dtype", HALF)
def test_no_autocast_keeps_the_base_dtype_everywhere(dtype, tmp_path):
    torch.manual_seed(0)
    base = ConvZoo().to(dtype)
    reference = copy.deepcopy(base)
    config = MeDyateConfig(budget_kb=8.0, input_size=INPUT, strategy="full_random")
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    model.add_adapter("other", config, autocast_adapter_dtype=False)
    assert adapter_dtypes(model) == adapter_dtypes(model, "other") == {dtype}
    x, y = batch(dtype)
    train(model, x, y)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path, autocast_adapter_dtype=False, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=False)
    assert adapter_dtypes(loaded) == adapter_dtypes(loaded, "other") == {dtype}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("dtype", HALF)
def test_selected_channel_gradients_equal_dense_autograd_in_the_same_dtype(dtype):
    torch.manual_seed(0)
    base = ConvZoo().to(dtype)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(budget_kb=64.0, input_size=INPUT, strategy="full_random"))
    x, y = batch(dtype)
    checked = assert_grads_match(model, reference, lambda m: F.cross_entropy(m(x).float(), y), atol=1e-5, rtol=1e-2)
    assert checked == 10
    grad = model.base_model.medyate_values["default"].grad
    assert grad.dtype == torch.float32 and bool(grad.abs().sum() > 0)


def test_bert_cast_to_bf16_before_get_peft_model_trains_and_merges(tmp_path):
    base = tiny_bert().to(torch.bfloat16)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(budget_kb=16, input_size=[12], strategy="full_random",
                                               task_type="SEQ_CLS"))
    ids, labels = torch.randint(0, 100, (3, 12)), torch.tensor([0, 2, 1])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
        assert torch.equal(loaded(input_ids=ids).logits, adapted)
        assert torch.equal(loaded.merge_and_unload()(input_ids=ids).logits, adapted)
