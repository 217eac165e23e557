"""Classification data for training: a Hub dataset or a local parquet / jsonl / csv file or folder
(image folders included), with the image or text column and the label column found by name.

Batches are made on the fly (`with_transform`), so nothing is written next to the data and two
DDP processes never race on a cache file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IMAGE_COLUMNS = ("image", "img")
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "labels")
EVAL_SPLITS = ("validation", "test")
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
HOLD_OUT = 0.1  # share of the training split held out when the data has no evaluation split


@dataclass
class ClassificationData:
    """Train and evaluation splits of a classification dataset, and which columns to read."""

    train: Any  # datasets.Dataset
    eval: Any
    input_column: str
    label_column: str
    modality: str  # "image" | "text"
    class_names: list[str]
    name: str  # for logs and the model card: a Hub id or the local folder/file name
    hub_id: str | None  # set when the data came from the Hub
    eval_split: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _load(source: str):
    """`datasets.load_dataset` for a Hub name, a local file, or a local folder (builder inferred)."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise ValueError(f"{source}: unsupported file type {path.suffix!r}; use {sorted(FILE_BUILDERS)}")
            return datasets.load_dataset(builder, data_files={"train": str(path)})
        if path.is_dir():
            return datasets.load_dataset(str(path))
        if source.startswith((".", "/", "~")) or path.suffix in FILE_BUILDERS:
            raise FileNotFoundError(f"dataset {source!r}: no such file or folder")
        return datasets.load_dataset(source)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise FileNotFoundError(
            f"dataset {source!r} is neither a local file/folder nor a Hub dataset available here "
            f"(offline: only datasets already in the local cache load): {exc}"
        ) from exc


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{what} column {wanted!r} not found; the data has columns {columns}")
        return wanted
    return next((c for c in candidates if c in columns), None)


def _subset(dataset, n: int | None, seed: int):
    """Shuffled, then the first n rows: many datasets are stored sorted by class."""
    dataset = dataset.shuffle(seed=seed)
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def load_classification_data(
    source: str,
    *,
    train_split: str = "train",
    eval_split: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
) -> ClassificationData:
    """Load `source` and pick its splits and columns.

    `eval_split` None takes "validation" or "test" when present, else holds out 10 % of the
    training split (stratified when the labels are a ClassLabel). String labels are encoded.
    """
    from datasets import ClassLabel

    splits = _load(source)
    if train_split not in splits:
        raise ValueError(f"{source}: no split {train_split!r}; it has {list(splits)}")
    train = splits[train_split]
    columns = list(train.column_names)
    label = _pick(columns, label_column, LABEL_COLUMNS, "label")
    if label is None:
        raise ValueError(f"{source}: no label column among {columns}; name it with --label-column")
    if not isinstance(train.features[label], ClassLabel):
        splits = splits.class_encode_column(label)
        train = splits[train_split]
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image") if text_column is None else None
    text = _pick(columns, text_column, TEXT_COLUMNS, "text") if image is None else None
    if image is None and text is None:
        raise ValueError(
            f"{source}: no image ({', '.join(IMAGE_COLUMNS)}) or text ({', '.join(TEXT_COLUMNS)}) column among "
            f"{columns}; name it with --image-column or --text-column"
        )
    if eval_split is None:
        eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
    if eval_split is None:
        held = train.train_test_split(test_size=HOLD_OUT, seed=seed, stratify_by_column=label)
        train, evaluation, eval_split = held["train"], held["test"], f"{train_split} (held-out {HOLD_OUT:.0%})"
    elif eval_split not in splits:
        raise ValueError(f"{source}: no split {eval_split!r}; it has {list(splits)}")
    else:
        evaluation = splits[eval_split]
    local = Path(source).exists()
    return ClassificationData(
        train=_subset(train, max_train_samples, seed),
        eval=_subset(evaluation, max_eval_samples, seed),
        input_column=image or text,
        label_column=label,
        modality="image" if image else "text",
        class_names=list(train.features[label].names),
        name=Path(source).resolve().name if local else source,
        hub_id=None if local else source,
        eval_split=eval_split,
    )


def image_batches(column: str, label: str, transform: Callable) -> Callable[[dict], dict]:
    """Batch transform: decoded images -> `pixel_values` tensors, labels -> `labels`."""

    def apply(batch: dict) -> dict:
        return {
            "pixel_values": [transform(image.convert("RGB")) for image in batch[column]],
            "labels": batch[label],
        }

    return apply


def text_batches(column: str, label: str, tokenizer: Any, max_length: int) -> Callable[[dict], dict]:
    """Batch transform: texts -> fixed-length `input_ids`/`attention_mask` (the budget needs a fixed length)."""

    def apply(batch: dict) -> dict:
        tokens = tokenizer(
            batch[column], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {**tokens, "labels": torch.as_tensor(batch[label])}

    return apply
