"""Model cards and Hub uploads: the card that would be uploaded is ours, parses back, and matches the adapter."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

from medyate_peft import MeDyateConfig
from medyate_peft.hub import (
    build_model_card,
    push_adapter_to_hub,
    summarize_dir,
    summarize_model,
    write_model_card,
)

SPEC = "timm:test_efficientnet"
HUB_ID = "timm/test_efficientnet.r160_in1k"


def _trained_adapter() -> tuple[PeftModel, torch.nn.Module]:
    """A small MeDyate model whose selected channels and head hold non-zero trained values."""
    base = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, MeDyateConfig(budget_kb=8, input_size=[3, 32, 32], strategy="full_random", seed=3))
    model.peft_config["default"].base_model_name_or_path = SPEC
    with torch.no_grad():
        model.base_model.medyate_values["default"].normal_(std=0.01)
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    return model, reference


CARD = {
    "dataset": "cifar10",
    "dataset_id": "uoft-cs/cifar10",
    "base_model_id": HUB_ID,
    "metrics": {"eval_accuracy": 0.8125, "eval_loss": 0.61},
    "memory": {
        "batch_size": 4, "budget_kb": 8.0, "counted_kb": 7.9, "selected_activation_kb_per_sample": 3.2,
        "selected_grad_kb": 4.7, "activation_kb_per_sample": 50.0, "grad_kb": 12.0,
    },
    "training": {"epochs": 3},
}


def test_card_metadata_parses_back(tmp_path: Path) -> None:
    model, _ = _trained_adapter()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    write_model_card(model, tmp_path, repo_id="someone/medyate-test", **CARD)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data
    assert data.library_name == "peft"
    assert data.base_model == HUB_ID
    assert "medyate" in data.tags and "full_random" in data.tags
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.pipeline_tag == "image-classification"
    (result,) = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", 0.8125, "uoft-cs/cifar10")
    summary = summarize_model(model)
    meta = data.to_dict()["medyate"]
    assert meta["budget_kb"] == 8 and meta["strategy"] == "full_random" and meta["seed"] == 3
    assert meta["channels_updated"] == summary.channels_updated > 0
    assert meta["layers_updated"] == len(summary.layers)
    assert meta["memory"]["selected_grad_kb"] == 4.7
    for layer in summary.layers:  # the body's table lists every updated layer with its channel count
        assert f"| `{layer.name}` | {layer.channels} / {layer.in_channels} |" in card.text
    assert 'load_model("timm:test_efficientnet", num_classes=5)' in card.text
    assert "[More Information Needed]" not in card.text  # PEFT's generic card did not survive


def test_summary_from_files_matches_live_model(tmp_path: Path) -> None:
    model, reference = _trained_adapter()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    write_model_card(model, tmp_path, **CARD)
    live, saved = summarize_model(model), summarize_dir(tmp_path)
    assert [(x.name, x.channels, x.in_channels, x.delta_values) for x in saved.layers] == [
        (x.name, x.channels, x.in_channels, x.delta_values) for x in live.layers
    ]
    assert (saved.budget_kb, saved.strategy, saved.base_model) == (8, "full_random", SPEC)
    assert saved.head_values == live.head_values == sum(p.numel() for p in reference.classifier.parameters())
    assert saved.channels_total == live.channels_total
    assert saved.file_bytes == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_summarize_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        summarize_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        summarize_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="LORA adapter, not a MeDyate one"):
        summarize_dir(tmp_path)


class RecordingApi:
    """Stands in for HfApi at the network boundary: keeps a copy of the folder that would be uploaded."""

    def __init__(self, keep: Path) -> None:
        self.keep = keep
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs) -> str:
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        shutil.copytree(folder_path, self.keep)
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_uploads_adapter_with_our_card(tmp_path: Path) -> None:
    model, reference = _trained_adapter()
    api = RecordingApi(tmp_path / "uploaded")
    url = push_adapter_to_hub(model, "someone/medyate-test", api=api, private=True, **CARD)
    assert url == "https://huggingface.co/someone/medyate-test/commit/0"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.library_name == "peft" and "medyate" in card.data.tags
    assert card.data.model_name == "medyate-test"
    assert 'PeftModel.from_pretrained(base, "someone/medyate-test")' in card.text
    # The uploaded adapter is the trained one: loaded onto the same base it reproduces the outputs.
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    loaded = PeftModel.from_pretrained(reference, uploaded).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(x), model(x), atol=1e-3)


def test_card_for_text_model_says_text_classification() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    model = get_peft_model(BertForSequenceClassification(config), MeDyateConfig(budget_kb=4, input_size=[8]))
    card = build_model_card(model, dataset="sst2", metrics={"eval_accuracy": 0.5})
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.eval_results[0].task_type == "text-classification"
    assert card.data.base_model is None  # no Hub repo known: no made-up base_model
