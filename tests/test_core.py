"""The MeDyate PEFT method on small custom models: every layer kind, budget, PEFT behaviours, files."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_grads_match
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import medyate_peft  # noqa: F401  (registers the method)
from medyate_peft import MeDyateConfig
from medyate_peft.kernels import gather_channels
from medyate_peft.measure import record_saved_tensors


class ConvZoo(nn.Module):
    """One of each supported conv kind, then token-shaped and plain Linear layers, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.normal = nn.Conv2d(3, 8, 3, padding=1)
        self.strided_dilated = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.depthwise_mult = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(16, 8, 1, groups=4)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.same_even = nn.Conv2d(8, 8, 4, padding="same")
        self.valid = nn.Conv2d(8, 8, 2, padding="valid")
        self.tokens = nn.Linear(8, 12)
        self.vector = nn.Linear(12, 12)
        self.classifier = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.normal(x))
        x = F.relu(self.strided_dilated(x))
        x = self.depthwise(x) + x
        x = F.relu(self.grouped(self.depthwise_mult(x)))
        x = self.valid(self.same_even(self.reflect(x)))
        tokens = x.flatten(2).transpose(1, 2)  # (N, H*W, C)
        tokens = torch.tanh(self.tokens(tokens))
        return self.classifier(torch.tanh(self.vector(tokens.mean(1))))


INPUT = [3, 12, 12]


def make(budget_kb: float = 4.0, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = ConvZoo()
    reference = copy.deepcopy(base)
    config = MeDyateConfig(budget_kb=budget_kb, input_size=INPUT, strategy="full_random", seed=seed, **kwargs)
    return get_peft_model(base, config), reference


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *INPUT, generator=g), torch.randint(0, 5, (n,), generator=g)


def ce_loss(x: torch.Tensor, y: torch.Tensor):
    return lambda model: F.cross_entropy(model(x), y)


def train_steps(model: nn.Module, steps: int = 3, lr: float = 0.05) -> torch.optim.Optimizer:
    x, y = batch()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def test_every_layer_kind_is_wrapped_and_head_is_saved():
    model, _ = make()
    layers = model.base_model.medyate_layers()
    assert set(layers) == {
        "normal", "strided_dilated", "depthwise", "depthwise_mult", "grouped", "reflect", "same_even", "valid",
        "tokens", "vector",
    }
    assert model.peft_config["default"].modules_to_save == ["classifier"]


@pytest.mark.parametrize("seed", range(4))
def test_compact_gradients_equal_dense_autograd_for_every_layer_kind(seed):
    model, reference = make(budget_kb=64.0, seed=seed)
    x, y = batch()
    checked = assert_grads_match(model, reference, ce_loss(x, y))
    assert checked == 10  # 64 kB holds some channels of every layer


def test_input_gradient_equals_dense_autograd():
    model, reference = make(budget_kb=8.0)
    x, y = batch()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    model.eval()
    F.cross_entropy(model(x1), y).backward()
    reference.eval()
    F.cross_entropy(reference(x2), y).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("budget_kb", [0.5, 2.0, 8.0, 33.3])
def test_selection_never_exceeds_budget_and_fills_it(budget_kb):
    model, _ = make(budget_kb=budget_kb)
    report = model.memory_report()
    pool = model.base_model.plans["default"].pool
    cheapest = int(pool.slots.min())
    assert report.used_slots <= report.budget_slots
    total = int(pool.slots.sum())
    assert report.used_slots > min(total, report.budget_slots) - cheapest * 4  # greedy fill leaves little


def test_budget_too_small_names_the_smallest_that_works():
    with pytest.raises(ValueError, match=r"too small for any single channel.*cheapest channel needs \d+ slots"):
        make(budget_kb=0.01)


def test_measured_saved_bytes_equal_prediction_times_batch():
    model, _ = make(budget_kb=8.0)
    x, _ = batch(n=3)
    report = model.memory_report(x)
    assert report.layers, "nothing selected"
    for row in report.layers:
        assert row.measured_saved_bytes_per_sample == row.activation_slots * 4, row.name
    assert report.measured_selected_saved_bytes == 3 * 4 * sum(r.activation_slots for r in report.layers)
    assert report.measured_weight_grad_bytes_used == 4 * sum(r.weight_slots for r in report.layers)
    assert report.measured_weight_grad_bytes_allocated <= report.budget_slots * 4


def test_frozen_layers_save_no_input():
    model, _ = make(budget_kb=2.0)
    selected = set(model.base_model.selection())
    x, _ = batch()
    model.train()
    with record_saved_tensors(model.base_model.model, owner=model) as by_module:
        model(x.requires_grad_())
    frozen_wrapped = set(model.base_model.medyate_layers()) - selected
    assert frozen_wrapped
    assert not frozen_wrapped & set(by_module), f"frozen layers saved tensors: {frozen_wrapped & set(by_module)}"


def test_only_selected_slices_and_head_change():
    model, reference = make(budget_kb=4.0)
    train_steps(model)
    tuner = model.base_model
    chosen = tuner.selection()
    base_params = dict(reference.named_parameters())
    for name, layer in tuner.medyate_layers().items():
        assert torch.equal(layer.get_base_layer().weight, base_params[f"{name}.weight"]), "base weight touched"
        delta = layer.get_delta_weight("default")
        changed = delta.abs().flatten(2).sum(-1) if delta.dim() == 4 else delta.abs()
        changed_in = torch.nonzero(
            gather_channels(delta, layer.groups, torch.arange(layer.in_channels)).flatten(1).abs().sum(1)
        ).flatten()
        assert set(changed_in.tolist()) <= set(chosen.get(name, torch.zeros(0)).tolist()), name
        assert changed.numel()
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert not torch.equal(head.weight, reference.classifier.weight)
    assert sum(len(v) for v in chosen.values()) > 0


def test_trainable_vector_keeps_its_shape_across_resamples():
    model, _ = make(budget_kb=4.0)
    optimizer = train_steps(model, steps=1)
    values = model.base_model.medyate_values["default"]
    shape, selections = values.shape, []
    for _ in range(3):
        model.base_model.resample(optimizer)
        selections.append({k: v.tolist() for k, v in model.base_model.selection().items()})
        assert model.base_model.medyate_values["default"] is values and values.shape == shape
        train_steps(model, steps=1)
    assert selections[0] != selections[1] or selections[1] != selections[2]


def test_resample_folds_trained_values_without_changing_outputs():
    model, _ = make(budget_kb=4.0)
    optimizer = train_steps(model)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.base_model.resample(optimizer)
    assert model.base_model.medyate_values["default"].abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)


def test_save_load_round_trip_is_exact_and_file_holds_only_changed_channels(tmp_path):
    model, reference = make(budget_kb=4.0)
    optimizer = train_steps(model)
    model.base_model.resample(optimizer)
    train_steps(model)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    deltas = {k: v for k, v in tensors.items() if k.endswith("medyate_delta")}
    ever = sum(len(model.base_model.medyate_layers()[k.split(".")[-2]].medyate_index["default"]) for k in deltas)
    stored = sum(len(v) for v in deltas.values())
    assert 0 < stored <= ever
    layer_sizes = sum(
        layer.get_base_layer().weight.numel() for layer in model.base_model.medyate_layers().values()
    )
    assert sum(v.numel() for v in deltas.values()) < layer_sizes / 4  # deltas only, not dense layers
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    config = PeftConfig.from_pretrained(tmp_path)
    assert config.peft_type == "MEDYATE" and config.budget_kb == 4.0


def test_merge_unmerge_unload_and_disable(tmp_path):
    model, reference = make(budget_kb=4.0)
    train_steps(model)
    x, _ = batch()
    model.eval()
    reference.eval()
    with torch.no_grad():
        adapted, original = model(x), reference(x)
        with model.disable_adapter():
            assert torch.equal(model(x), original)
        model.base_model.merge_adapter()
        torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=1e-6)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("medyate" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-6, rtol=1e-6)
    unloaded = model.unload()
    with torch.no_grad():
        out = unloaded(x)
    # unload drops the MeDyate deltas; the trained head (modules_to_save) stays as PEFT does
    assert not any("medyate" in n for n, _ in unloaded.named_modules())
    assert out.shape == original.shape


def test_several_adapters(tmp_path):
    model, reference = make(budget_kb=4.0)
    train_steps(model)
    model.add_adapter("other", MeDyateConfig(budget_kb=2.0, input_size=INPUT, strategy="full_random", seed=5))
    tuner = model.base_model
    assert not tuner.medyate_values["other"].requires_grad
    model.set_adapter("other")
    assert tuner.medyate_values["other"].requires_grad and not tuner.medyate_values["default"].requires_grad
    tuner.plan("other")
    train_steps(model)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        out_other = model(x)
        model.set_adapter("default")
        out_default = model(x)
    assert not torch.allclose(out_other, out_default)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    model.delete_adapter("other")
    assert "other" not in tuner.medyate_values and "other" not in tuner.peft_config
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out_other)


def test_loading_onto_a_different_base_fails_clearly(tmp_path):
    model, _ = make(budget_kb=4.0)
    train_steps(model)
    model.save_pretrained(tmp_path)

    class Wider(ConvZoo):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Linear(8, 20)
            self.vector = nn.Linear(20, 12)

    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(Wider(), tmp_path)


def test_training_state_round_trip_continues_identically():
    model, reference = make(budget_kb=4.0)
    optimizer = train_steps(model)
    state = model.base_model.training_state_dict()
    twin = get_peft_model(copy.deepcopy(reference), copy.deepcopy(model.peft_config["default"]))
    twin.base_model.model.classifier.load_state_dict(model.base_model.model.classifier.state_dict())
    twin.base_model.load_training_state_dict(state)
    for m in (model, twin):
        m.base_model.resample(optimizer if m is model else None)
    assert {k: v.tolist() for k, v in model.base_model.selection().items()} == {
        k: v.tolist() for k, v in twin.base_model.selection().items()
    }
    x, _ = batch()
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_batchnorm_statistics_stay_frozen_so_reload_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 4))
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(budget_kb=4.0, input_size=INPUT, strategy="full_random",
                                               modules_to_save=["4"]))
    model.train()
    assert not model.base_model.model[1].training
    x = torch.randn(8, *INPUT)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(x), torch.randint(0, 4, (8,))).backward()
    optimizer.step()
    assert torch.equal(model.base_model.model[1].running_mean, reference[1].running_mean)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_unsupported_explicit_target_is_rejected_clearly():
    base = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="BatchNorm2d.*Conv2d, nn.Linear and transformers. Conv1D layers only"):
        get_peft_model(base, MeDyateConfig(budget_kb=4.0, target_modules=["1"], input_size=INPUT))


def test_shapes_learned_from_first_training_batch_without_input_size():
    torch.manual_seed(0)
    model = get_peft_model(ConvZoo(), MeDyateConfig(budget_kb=4.0, strategy="full_random"))
    assert not model.base_model.is_planned("default")
    train_steps(model, steps=1)
    assert model.base_model.is_planned("default")
    assert model.memory_report().used_slots <= model.memory_report().budget_slots


def test_memory_report_counts_optimizer_state():
    model, _ = make(budget_kb=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    x, _ = batch()
    sgd = torch.optim.SGD(params, lr=0.1)
    train_steps(model, steps=1)
    assert model.memory_report(x, optimizer=sgd).optimizer_state_bytes == 0  # the papers' recipe: no state
    adam = torch.optim.Adam(params, lr=1e-3)
    model.train()
    F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    adam.step()
    report = model.memory_report(x, optimizer=adam)
    assert report.optimizer_state_bytes == 2 * 4 * sum(p.numel() for p in params)  # exp_avg + exp_avg_sq
    assert "optimizer state" in str(report)


class TinyGPT2Block(nn.Module):
    """GPT-2's MLP and attention projections are transformers' Conv1D: weights stored (in, out)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(24, 8)
        self.c_fc = Conv1D(16, 24)
        self.c_proj = Conv1D(8, 16)
        self.score = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(self.c_attn(x)))
        return self.score(self.c_proj(x).mean(1))


def make_conv1d(budget_kb: float = 64.0, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = TinyGPT2Block()
    reference = copy.deepcopy(base)
    config = MeDyateConfig(budget_kb=budget_kb, input_size=[5, 8], strategy="full_random", seed=seed)
    return get_peft_model(base, config), reference


@pytest.mark.parametrize("seed", range(3))
def test_conv1d_is_a_candidate_and_its_gradients_equal_dense_autograd(seed):
    model, reference = make_conv1d(seed=seed)
    layers = model.base_model.medyate_layers()
    assert set(layers) == {"c_attn", "c_fc", "c_proj"}
    assert all(layer.fan_in_fan_out and layer.slice_shape == (layer.out_features, 1) for layer in layers.values())
    assert [layers[n].in_features for n in ("c_attn", "c_fc", "c_proj")] == [8, 24, 16]
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([0, 1, 2, 0])
    assert assert_grads_match(model, reference, ce_loss(x, y)) == 3


def test_conv1d_trains_merges_and_reloads_exactly(tmp_path):
    model, reference = make_conv1d(budget_kb=1.0)
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, reference(x))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
        merged = model.merge_and_unload()
        assert isinstance(merged.c_fc, Conv1D) and merged.c_fc.weight.shape == (24, 16)
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
