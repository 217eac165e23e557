"""MeDyate on the transformers models PEFT users load, built from tiny configs (offline).

Each goes through get_peft_model -> training with resample -> save -> reload -> merge_and_unload ->
unload, as a PEFT user would with LoRA and the same task_type.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import timm
import torch
import transformers as T
from helpers import assert_grads_match
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import medyate_peft  # noqa: F401
from medyate_peft import MeDyateConfig

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
             max_position_embeddings=64)
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=64, vocab_size=100)
CONFIGS = {
    "bert": lambda: T.BertConfig(**SMALL),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "roberta": lambda: T.RobertaConfig(**{**SMALL, "max_position_embeddings": 70}),
    "electra": lambda: T.ElectraConfig(**SMALL, embedding_size=16),
    "deberta-v2": lambda: T.DebertaV2Config(**SMALL),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                                 eos_token_id=0),
    "llama": lambda: T.LlamaConfig(**DECODER),
    "qwen2-tied": lambda: T.Qwen2Config(**DECODER, tie_word_embeddings=True),
    "mistral": lambda: T.MistralConfig(**DECODER),
    "t5": lambda: T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100,
                             decoder_start_token_id=0),
    "vit": lambda: T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64),
}
AUTO = {"SEQ_CLS": T.AutoModelForSequenceClassification, "TOKEN_CLS": T.AutoModelForTokenClassification,
        "CAUSAL_LM": T.AutoModelForCausalLM, "SEQ_2_SEQ_LM": T.AutoModelForSeq2SeqLM, None: T.AutoModelForImageClassification}
CASES = [(m, t) for m in ("bert", "distilbert", "roberta", "electra", "deberta-v2") for t in ("SEQ_CLS", "TOKEN_CLS")]
CASES += [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("qwen2-tied", "CAUSAL_LM"), ("mistral", "CAUSAL_LM"),
          ("t5", "SEQ_2_SEQ_LM"), ("vit", None)]


def build(kind: str, task: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[kind]()
    config.num_labels = 3
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                 "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout_rate", "seq_classif_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return AUTO[task].from_config(config)


def batch(task: str | None, seq: int = 10) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seq)
    if task is None:
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}, torch.tensor([0, 2])
    ids = torch.randint(1, 100, (2, seq), generator=g)
    if task == "SEQ_2_SEQ_LM":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}, torch.randint(1, 100, (2, 6), generator=g)
    if task == "CAUSAL_LM":
        return {"input_ids": ids}, ids
    if task == "TOKEN_CLS":
        return {"input_ids": ids}, torch.randint(0, 3, (2, seq), generator=g)
    return {"input_ids": ids}, torch.tensor([0, 2])


def train(model, task: str | None, steps: int = 4, seq: int = 10) -> None:
    """A few SGD steps with a resample() halfway, on the tuner's flat vector and the head."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    model.train()
    inputs, labels = batch(task, seq)
    for step in range(steps):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        if step == steps // 2 - 1:
            model.resample(optimizer)


def logits(model, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(("kind", "task"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_train_save_reload_merge_unload(kind, task, tmp_path):
    base = build(kind, task)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(task_type=task, budget_kb=8, strategy="full_random"))
    layers = model.base_model.medyate_layers()
    assert len(layers) >= 6
    lm_head = reference.get_output_embeddings()
    assert not any(m.get_base_layer() is lm_head for m in layers.values()), "the LM head is a default target"
    train(model, task)
    trained = sum(int((m.folded_delta("default")[1] != 0).any(dim=(1, 2)).sum()) for m in layers.values())
    assert trained > 0
    inputs, _ = batch(task)
    expected = logits(model, inputs)
    heads = list(model.peft_config["default"].modules_to_save or ())
    trained_head = {k.replace(".modules_to_save.default", ""): v.clone() for k, v in model.base_model.model.state_dict().items()
                    if ".modules_to_save.default." in k}
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("base_layer" in key for key in saved)  # deltas and the trained head only

    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    assert torch.equal(logits(loaded, inputs), expected)
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        generated = loaded.generate(input_ids=inputs["input_ids"], max_new_tokens=4, do_sample=False)
    merged = loaded.merge_and_unload()
    assert torch.equal(logits(merged, inputs), expected)
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        assert torch.equal(merged.generate(input_ids=inputs["input_ids"], max_new_tokens=4, do_sample=False),
                           generated)
        assert merged.get_input_embeddings().weight.equal(reference.get_input_embeddings().weight)

    unloaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).unload()
    state = unloaded.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():  # the base, plus the head trained in full (as LoRA's unload)
        assert torch.equal(state[key], trained_head.get(key, value)), key
    assert heads == [] or trained_head, "modules_to_save named but nothing trained in full"


def test_distilbert_pre_classifier_is_trained_in_full_not_wrapped():
    """PEFT's modules_to_save "classifier" matches `pre_classifier` by suffix, as with LoRA; it is not a target."""
    model = get_peft_model(build("distilbert", "SEQ_CLS"), MeDyateConfig(task_type="SEQ_CLS", budget_kb=8))
    assert "pre_classifier" not in model.base_model.medyate_layers()
    assert type(model.base_model.model.pre_classifier).__name__ == "ModulesToSaveWrapper"
    with pytest.raises(ValueError, match="also matched by modules_to_save"):
        get_peft_model(build("distilbert", "SEQ_CLS"),
                       MeDyateConfig(task_type="SEQ_CLS", budget_kb=8, target_modules=["q_lin", "pre_classifier"]))


def test_gpt2_conv1d_layers_are_trained_and_gradients_equal_dense_autograd():
    base = build("gpt2", "CAUSAL_LM")
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(task_type="CAUSAL_LM", budget_kb=16, input_size=[10],
                                               strategy="full_random"))
    layers = model.base_model.medyate_layers()
    assert {n.rpartition(".")[2] for n in layers} == {"c_attn", "c_proj", "c_fc"}
    assert all(type(m.get_base_layer()).__name__ == "Conv1D" for m in layers.values())
    ids = torch.randint(1, 100, (2, 10))
    assert assert_grads_match(model, reference, lambda m: m(input_ids=ids, labels=ids).loss) >= 4


@pytest.mark.parametrize("kind", ["gpt2", "qwen2-tied", "t5"])
def test_a_tied_output_head_is_refused_even_when_named(kind):
    task = "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"
    base = build(kind, task)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    with pytest.raises(TypeError, match="tied to .*embed|tied to .*wte|tied to .*shared"):
        get_peft_model(base, MeDyateConfig(task_type=task, budget_kb=8, target_modules=["lm_head"]))


def _adapter_size(model, folder: Path) -> tuple[int, dict[str, torch.Tensor]]:
    model.save_pretrained(folder)
    file = folder / "adapter_model.safetensors"
    return file.stat().st_size, load_file(file)


def test_lm_adapter_holds_deltas_only_and_grows_with_the_channels_trained(tmp_path):
    """Untied lm_head named explicitly: trained, merged exactly, and its base weight is not saved."""
    base = build("llama", "CAUSAL_LM")
    reference = copy.deepcopy(base)
    config = MeDyateConfig(task_type="CAUSAL_LM", budget_kb=4, strategy="full_random",
                           target_modules=["q_proj", "up_proj", "down_proj", "lm_head"])
    model = get_peft_model(base, config)
    train(model, "CAUSAL_LM", steps=2)
    small, first = _adapter_size(model, tmp_path / "a")
    train(model, "CAUSAL_LM", steps=4)  # two more draws: more channels ever trained
    large, second = _adapter_size(model, tmp_path / "b")
    weights = {tuple(p.shape) for p in reference.parameters()} - {(100,), (32,)}
    for saved in (first, second):
        assert all(".medyate_" in key for key in saved), sorted(saved)
        assert not any(tuple(v.shape) in weights for v in saved.values())  # no full base weight
    channels = [sum(v.numel() for k, v in s.items() if "medyate_index" in k) for s in (first, second)]
    assert channels[1] > channels[0] and large > small
    inputs, _ = batch("CAUSAL_LM")
    expected = logits(model, inputs)
    merged = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "b").merge_and_unload()
    assert torch.equal(logits(merged, inputs), expected)


# -- activation sizes ----------------------------------------------------------------------------
def tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1),
                             num_heads=(1, 2), window_size=7, num_classes=3)


def test_swin_window_attention_is_planned_per_sample():
    """Window attention sees (windows*B, 49, C): the plan charges the tokens of one image, as measured."""
    model = get_peft_model(tiny_swin(), MeDyateConfig(budget_kb=16, input_size=[3, 56, 56], strategy="full_random"))
    costs = {c.name: c for c in model.base_model.plans["default"].pool.costs}
    assert costs["layers.0.blocks.0.attn.qkv"].activation_slots == 14 * 14  # 4 windows of 49 tokens
    assert costs["layers.1.blocks.0.attn.qkv"].activation_slots == 7 * 7
    report = model.memory_report(torch.randn(3, 3, 56, 56), compare_lean=False)
    assert report.layers
    for row in report.layers:
        assert row.measured_saved_bytes_per_sample == 4 * row.activation_slots, row.name
    assert report.measured_selected_saved_bytes / 3 <= 4 * report.budget_slots


def test_swin_ranking_charges_the_same_per_sample_costs_as_the_plan():
    from medyate_peft import rank_layers

    images = [(torch.randn(2, 3, 56, 56), torch.tensor([0, 2]))]
    ranking = rank_layers(tiny_swin(), images, steps=1, lr=0.0, progress=False)
    model = get_peft_model(tiny_swin(), MeDyateConfig(budget_kb=16, input_size=[3, 56, 56], strategy="full_random"))
    planned = {c.name: c.layer_slots for c in model.base_model.plans["default"].pool.costs}
    assert ranking["layer_slots"] == planned


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(**{**SMALL, "max_position_embeddings": 128}, num_labels=3))


@pytest.mark.parametrize("strategy", ["full_random", "static_random"])  # a static selection is re-drawn too
def test_longer_sequences_warn_once_then_replan_at_resample(strategy, caplog):
    model = get_peft_model(_bert(), MeDyateConfig(task_type="SEQ_CLS", budget_kb=16, strategy=strategy))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()

    def step(seq: int) -> None:
        inputs, labels = batch("SEQ_CLS", seq)
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()

    step(16)  # planned on 16 tokens
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        for _ in range(3):
            step(64)
    warnings = [r.getMessage() for r in caplog.records if "larger than" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "64 activation slots per sample" in warnings[0] and "planned 16" in warnings[0]
    inputs, labels = batch("SEQ_CLS", 64)
    before = model.memory_report(**inputs, labels=labels, compare_lean=False)
    over = (before.measured_selected_saved_bytes / 2 + before.measured_weight_grad_bytes_used) / 1024
    assert over > before.budget_kb
    model.resample(optimizer)
    after = model.memory_report(**inputs, labels=labels, compare_lean=False)
    for row in after.layers:
        assert row.measured_saved_bytes_per_sample == 4 * row.activation_slots, row.name
    assert (after.measured_selected_saved_bytes / 2 + after.measured_weight_grad_bytes_used) / 1024 <= after.budget_kb
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        step(64)
    assert not [r for r in caplog.records if "larger than" in r.getMessage()]


def test_a_strict_budget_refuses_inputs_larger_than_planned():
    model = get_peft_model(_bert(), MeDyateConfig(task_type="SEQ_CLS", budget_kb=16, strategy="full_random",
                                                  input_size=[16]))
    model.peft_config["default"].budget_scope = "step"  # the strict budget's setting (set after planning here)
    model.train()
    inputs, labels = batch("SEQ_CLS", 16)
    model(**inputs, labels=labels).loss.backward()
    inputs, labels = batch("SEQ_CLS", 64)
    for _ in range(2):  # every such batch, not only the first
        with pytest.raises(ValueError, match="strict budget refuses"):
            model(**inputs, labels=labels)
