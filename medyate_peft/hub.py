"""Adapter summaries, model cards and Hub uploads for MeDyate adapters.

PEFT's own `save_pretrained` rewrites README.md with a generic card, and `push_to_hub` replaces it
with a transformers one. Here the card is written from `templates/adapter_card.md` *after*
`save_pretrained`, and the folder is uploaded as it is, so the card that arrives is this one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .atomic import atomic_write
from .budget import budget_slots
from .medyate.layer import MeDyateLayer
from .peft_patches import check_adapter_folder, read_medyate_config

logger = logging.getLogger(__name__)
CARD_TEMPLATE = "adapter_card.md"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
PEFT_PREFIX = "base_model.model."
INDEX_SUFFIX, DELTA_SUFFIX = ".medyate_index", ".medyate_delta"


@dataclass
class LayerSummary:
    name: str
    channels: int  # input channels whose weight slice changed
    in_channels: int | None  # known from a live model or the card, not from the weights file
    delta_values: int


@dataclass
class AdapterSummary:
    """What a MeDyate adapter holds: budget, strategy, changed channels per layer, the full-trained head."""

    base_model: str | None
    strategy: str
    budget_kb: float
    bytes_per_slot: int
    seed: int
    layers: list[LayerSummary]
    head: list[str]
    head_values: int
    channels_total: int | None = None  # input channels of all candidate layers
    layers_total: int | None = None
    file_bytes: int | None = None

    @property
    def channels_updated(self) -> int:
        return sum(layer.channels for layer in self.layers)

    @property
    def budget_slots(self) -> int:
        return budget_slots(self.budget_kb, self.bytes_per_slot)

    def metadata(self) -> dict[str, Any]:
        """The card's `medyate:` metadata block (what `medyate inspect` reads back)."""
        return {
            "budget_kb": self.budget_kb,
            "bytes_per_slot": self.bytes_per_slot,
            "strategy": self.strategy,
            "seed": self.seed,
            "layers_updated": len(self.layers),
            "channels_updated": self.channels_updated,
            "layers_total": self.layers_total,
            "channels_total": self.channels_total,
            "in_channels": {layer.name: layer.in_channels for layer in self.layers},
        }


def summarize_model(model: Any, adapter: str = "default") -> AdapterSummary:
    """Summary of a live PeftModel's adapter, trained values that are not yet folded included."""
    config = model.peft_config[adapter]
    layers, total, count = [], 0, 0
    for name, module in model.base_model.model.named_modules():
        if not isinstance(module, MeDyateLayer) or adapter not in module.medyate_delta:
            continue
        total += module.in_channels
        count += 1
        index, delta = module.saved_delta(adapter)
        changed = len(index)
        if changed:
            per_channel = delta[0].numel()
            layers.append(LayerSummary(name, changed, module.in_channels, changed * per_channel))
    head_values = sum(p.numel() for n, p in model.named_parameters() if f".modules_to_save.{adapter}." in n)
    return AdapterSummary(
        base_model=config.base_model_name_or_path,
        strategy=config.strategy,
        budget_kb=config.budget_kb,
        bytes_per_slot=config.bytes_per_slot,
        seed=config.seed,
        layers=layers,
        head=list(config.modules_to_save or []),
        head_values=head_values,
        channels_total=total,
        layers_total=count,
    )


def summarize_dir(path: str | os.PathLike) -> AdapterSummary:
    """Summary of a saved adapter folder, read from its files alone (no base model needed)."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a saved adapter: it has no {CONFIG_FILE}")
    config = read_medyate_config(folder)  # a damaged or edited config: a clear AdapterFileError
    if config is None:
        other = json.loads(config_file.read_text())
        kind = other.get("peft_type") if isinstance(other, dict) else None
        raise ValueError(f"{folder} holds a {kind} adapter, not a MeDyate one")
    check_adapter_folder(folder)  # the weights file: present, readable, holding the head it names
    index_sizes, delta_sizes, head_values = {}, {}, 0
    with safe_open(str(weights_file), "pt") as weights:
        for key in weights.keys():
            shape = weights.get_slice(key).get_shape()
            name = key.removeprefix(PEFT_PREFIX)
            if name.endswith(INDEX_SUFFIX):
                index_sizes[name.removesuffix(INDEX_SUFFIX)] = shape[0]
            elif name.endswith(DELTA_SUFFIX):
                delta_sizes[name.removesuffix(DELTA_SUFFIX)] = int(torch.Size(shape).numel())
            else:
                head_values += int(torch.Size(shape).numel())
    card = read_card_metadata(folder)
    in_channels = card.get("in_channels") or {}
    # Network order when the card lists the layers (it does, in module order), else blocks.2 before blocks.10.
    order = {name: i for i, name in enumerate(in_channels)}
    names = sorted(index_sizes, key=lambda n: (order.get(n, len(order)), _natural_key(n)))
    layers = [LayerSummary(n, index_sizes[n], in_channels.get(n), delta_sizes.get(n, 0)) for n in names]
    return AdapterSummary(
        base_model=config.get("base_model_name_or_path"),
        strategy=config["strategy"],
        budget_kb=config["budget_kb"],
        bytes_per_slot=config.get("bytes_per_slot", 4),
        seed=config.get("seed", 0),
        layers=layers,
        head=list(config.get("modules_to_save") or []),
        head_values=head_values,
        channels_total=card.get("channels_total"),
        layers_total=card.get("layers_total"),
        file_bytes=weights_file.stat().st_size,
    )


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The card's `medyate:` metadata block, {} when the folder has no card (or not ours)."""
    card_file = Path(folder) / CARD_FILE
    if not card_file.is_file():
        return {}
    data = ModelCard.load(card_file).data.to_dict()
    block = data.get("medyate")
    return block if isinstance(block, dict) else {}


def _versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in ("medyate-peft", "peft", "torch")}


def _task(model: Any) -> str:
    from transformers import PreTrainedModel

    return "text-classification" if isinstance(model.get_base_model(), PreTrainedModel) else "image-classification"


def _num_classes(model: Any, head: list[str]) -> int | None:
    """Output size of the classifier: the first dimension of its last 2-D weight."""
    modules = dict(model.get_base_model().named_modules())
    weights = [p for name in head if name in modules for p in modules[name].parameters() if p.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


def build_model_card(
    model: Any,
    *,
    dataset: str | None = None,
    dataset_id: str | None = None,
    metrics: dict[str, float] | None = None,
    memory: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    base_model_id: str | None = None,
    repo_id: str | None = None,
    adapter: str = "default",
) -> ModelCard:
    """The adapter's card: Hub metadata (library, base model, tags, dataset, eval results) and a readable body.

    `base_model_id` is the Hub repo of the base weights (None when they are not on the Hub);
    `metrics` maps names to values (`eval_accuracy` becomes the card's evaluation result).
    """
    summary = summarize_model(model, adapter)
    task = _task(model)
    title = repo_id.split("/")[-1] if repo_id else f"MeDyate adapter for {summary.base_model}"
    eval_results = None
    if metrics and "eval_accuracy" in metrics and dataset:
        eval_results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset_id or dataset,
                dataset_name=dataset,
                metric_type="accuracy",
                metric_value=float(metrics["eval_accuracy"]),
            )
        ]
    meta = summary.metadata()
    if memory:
        meta["memory"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in memory.items()}
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model_id,
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag=task,
        tags=["medyate", "peft", "sparse-fine-tuning", "memory-budget", summary.strategy],
        model_name=title,
        eval_results=eval_results,
        medyate=meta,
    )
    template = resources.files("medyate_peft") / "templates" / CARD_TEMPLATE
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            title=title,
            summary=summary,
            base_model_id=base_model_id,
            dataset=dataset,
            metrics=metrics,
            memory=memory,
            training=training,
            num_classes=_num_classes(model, summary.head),
            repo_id=repo_id or "<adapter folder or Hub repo>",
            versions=_versions(),
        )


def write_model_card(model: Any, out_dir: str | os.PathLike, **card: Any) -> ModelCard:
    """Write the card to `out_dir/README.md` (atomically, replacing PEFT's); keywords as `build_model_card`."""
    model_card = build_model_card(model, **card)
    with atomic_write(Path(out_dir) / CARD_FILE, encoding="utf-8") as handle:
        handle.write(str(model_card))
    return model_card


# An absolute path whose first folder exists here (`/home/...`, `hf:/work/...`); URLs (`https://`) are not.
_ABSOLUTE_PATH = re.compile(r"(?<![\w/.~-])/(?:[\w.~-]+/)*[\w.~-]+")


def local_paths(text: str) -> list[str]:
    """The absolute paths of this machine named in `text`."""
    return [p for p in _ABSOLUTE_PATH.findall(text) if os.path.exists("/" + p.split("/")[1])]


def _strip_local_paths(folder: Path) -> list[str]:
    """Replace every local absolute path in the folder's configs and card by its last part; return them."""
    found: set[str] = set()
    for path in [*folder.rglob(CONFIG_FILE), *folder.rglob(CARD_FILE)]:
        text = path.read_text(encoding="utf-8")
        paths = sorted(set(local_paths(text)), key=len, reverse=True)
        for local in paths:
            text = text.replace(local, Path(local).name)
        if paths:
            path.write_text(text, encoding="utf-8")
        found.update(paths)
    return sorted(found)


def push_adapter_to_hub(
    model: Any,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload MeDyate adapter",
    api: HfApi | None = None,
    **card: Any,
) -> str:
    """Save the adapter with our card and upload the folder to `repo_id`; returns the commit URL.

    The repository is created private unless `private=False`. Local absolute paths (a base model
    loaded from a folder, the source of a ranking) are replaced by their last part before upload,
    with a warning: they mean nothing elsewhere and tell about this machine. Card keywords as in
    `build_model_card`. `api` defaults to `HfApi(token=token)`.
    """
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="medyate-push-") as folder:
        model.save_pretrained(folder, save_embedding_layers=False)  # MeDyate never trains embeddings
        write_model_card(model, folder, repo_id=repo_id, **card)  # after save_pretrained: PEFT's card loses
        stripped = _strip_local_paths(Path(folder))
        if stripped:
            logger.warning("MeDyate: local paths replaced by their last part in the uploaded files: %s",
                           ", ".join(stripped))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message
        )
    return str(commit)
