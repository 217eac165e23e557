"""MeDyate on real architectures: timm CNNs and ViT, transformers BERT and ViT (from config, offline)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_grads_match
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig

TIMM_MODELS = {
    "mobilenetv2_050": dict(input=[3, 64, 64]),
    "tf_efficientnet_lite0": dict(input=[3, 64, 64]),  # TF 'same' padding: timm Conv2dSame
    "resnet10t": dict(input=[3, 64, 64]),
    "vit_tiny_patch16_224": dict(input=[3, 32, 32], kwargs=dict(img_size=32, patch_size=8)),
}


def timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **TIMM_MODELS[name].get("kwargs", {}))


def round_trip_and_merge(model, reference, inputs: dict, tmp_path) -> None:
    """save -> load onto a fresh copy -> identical outputs; merge_and_unload -> the same outputs."""
    model.eval()
    with torch.no_grad():
        expected = model(**inputs)
        expected = getattr(expected, "logits", expected)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    loaded.eval()
    with torch.no_grad():
        out = loaded(**inputs)
        assert torch.equal(getattr(out, "logits", out), expected)
        with loaded.disable_adapter():
            base_out = loaded(**inputs)
        reference.eval()
        ref_out = reference(**inputs)
        assert torch.equal(getattr(base_out, "logits", base_out), getattr(ref_out, "logits", ref_out))
        merged = loaded.merge_and_unload()
        merged_out = merged(**inputs)
        torch.testing.assert_close(getattr(merged_out, "logits", merged_out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_gradients_budget_and_round_trip(name, tmp_path):
    base = timm_model(name)
    reference = copy.deepcopy(base)
    size = TIMM_MODELS[name]["input"]
    model = get_peft_model(base, MeDyateConfig(budget_kb=32, input_size=size, strategy="full_random"))
    head = model.peft_config["default"].modules_to_save
    assert head == [reference.pretrained_cfg["classifier"]]
    x = torch.randn(2, *size)
    y = torch.tensor([1, 3])
    assert assert_grads_match(model, reference, lambda m: F.cross_entropy(m(x), y)) > 3
    report = model.memory_report(x)
    assert report.used_slots <= report.budget_slots
    for row in report.layers:
        assert row.measured_saved_bytes_per_sample == 4 * row.activation_slots, row.name
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    round_trip_and_merge(model, reference, {"x": x}, tmp_path)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def test_bert_seq_cls_gradients_tokens_accounting_and_round_trip(tmp_path):
    base = tiny_bert()
    reference = copy.deepcopy(base)
    config = MeDyateConfig(task_type="SEQ_CLS", budget_kb=16, input_size=[12], strategy="full_random")
    model = get_peft_model(base, config)
    assert "classifier" in model.peft_config["default"].modules_to_save
    layers = model.base_model.medyate_layers()
    assert any(name.endswith("attention.self.query") for name in layers)
    ids = torch.randint(0, 100, (3, 12))
    labels = torch.tensor([0, 2, 1])
    assert assert_grads_match(model, reference, lambda m: m(input_ids=ids, labels=labels).loss) > 3
    report = model.memory_report(input_ids=ids, labels=labels)
    # Linear on (N, T, C): one slot per token for every selected input feature.
    for row in report.layers:
        costs = {c.name: c for c in model.base_model.plans["default"].pool.costs}
        assert costs[row.name].activation_slots in (12, 1)
        assert row.measured_saved_bytes_per_sample == 4 * row.activation_slots, row.name
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    round_trip_and_merge(model, reference, {"input_ids": ids}, tmp_path)


@pytest.mark.parametrize("kind", ["timm", "bert"])
def test_bf16_autocast_gradients_match_autograd_under_the_same_autocast(kind):
    """Mixed precision: the sparse kernels and the lean backward (recomputed SiLU, masks, eval BN) follow autocast."""
    if kind == "timm":  # SiLU after BatchNorm: the recomputed-activation path of the lean backward
        torch.manual_seed(0)
        base, size = timm.create_model("test_efficientnet", num_classes=5), [3, 32, 32]
        x, y = torch.randn(4, *size), torch.tensor([1, 3, 0, 4])

        def forward_loss(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.cross_entropy(m(x), y)
    else:
        base, size = tiny_bert(), [12]
        ids, labels = torch.randint(0, 100, (3, 12)), torch.tensor([0, 2, 1])

        def forward_loss(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(input_ids=ids, labels=labels).loss
    reference = copy.deepcopy(base)
    config = MeDyateConfig(budget_kb=32, input_size=size, strategy="full_random", lean_recompute=True,
                           task_type="SEQ_CLS" if kind == "bert" else None)
    model = get_peft_model(base, config)
    assert assert_grads_match(model, reference, forward_loss, atol=2e-3, rtol=2e-2) > 3
    grad = model.base_model.medyate_values["default"].grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_transformers_vit_shapes_learned_from_batch(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=4)
    base = ViTForImageClassification(config)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(budget_kb=16, strategy="full_random"))
    pixels = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([0, 3])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    model(pixel_values=pixels, labels=labels).loss.backward()
    optimizer.step()
    assert model.base_model.is_planned("default")
    assert "vit.embeddings.patch_embeddings.projection" in model.base_model.medyate_layers()
    round_trip_and_merge(model, reference, {"pixel_values": pixels}, tmp_path)
