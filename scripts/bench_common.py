"""One benchmark run, end to end: data, model, method, training, measurement, record.

`run_one(spec, path)` is what `scripts/benchmark.py` starts in a fresh child process per run, so
that the peak RSS it reports (`ru_maxrss`) belongs to that run alone. Every method gets the same
data, order, augmentation, schedule and measurement; only what is trained differs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import resource
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench_checkpoint  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import medyate_peft  # noqa: E402, F401  (registers the MEDYATE peft type)
from medyate_peft.atomic import atomic_write_json  # noqa: E402
from medyate_peft.lora_baseline import lora_rank, lora_targets  # noqa: E402
from medyate_peft.strategies import get_strategy, resample_due  # noqa: E402
from medyate_peft.train import trained_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# $MEDYATE_DATA_DIR, else the shared assets beside the checkout (CI) or inside it (a copied working tree)
DATA_DIR = Path(os.environ.get("MEDYATE_DATA_DIR") or next(
    (p for p in (REPO.parent / "shared" / "assets" / "data", REPO / "shared" / "assets" / "data") if p.is_dir()),
    REPO.parent / "shared" / "assets" / "data"))
CACHE_DIR = Path(os.environ.get("MEDYATE_BENCH_CACHE", Path.home() / ".cache" / "medyate-bench"))
BASELINES = ("full", "classifier", "lora", "full_frozen_bn")
# full fine-tuning as usually run, and with BN statistics kept (bench_report has the tuple too: it imports no torch)
FULL_METHODS = ("full", "full_frozen_bn")
TEXT_MAX_LENGTH = 64


# -- data ------------------------------------------------------------------------------------------
def _balanced_indices(labels: list[int], n: int, seed: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """n indices outside `exclude`, as equal per class as the classes allow, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=g).tolist():
        if i not in exclude:
            by_class.setdefault(labels[i], []).append(i)
    chosen, round_ = [], 0
    while len(chosen) < n and any(len(v) > round_ for v in by_class.values()):
        chosen += [v[round_] for _, v in sorted(by_class.items()) if len(v) > round_][: n - len(chosen)]
        round_ += 1
    return sorted(chosen)


def _random_indices(count: int, n: int | None, seed: int) -> list[int]:
    """n random indices of `count` (None: all of them), fixed by `seed`."""
    if n is None:
        return list(range(count))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=g)[:n].tolist())


def validation_indices(labels: list[int], n: int, seed: int, train_n: int) -> list[int]:
    """n class-balanced training-split indices outside the train subset of `train_n` (both fixed by `seed`).

    The learning rate is chosen on these, so the test split is only ever used for the final evaluation.
    """
    train = frozenset(_balanced_indices(labels, train_n, seed))
    return _balanced_indices(labels, n, seed + 1, exclude=train)


def _decode(raw: bytes, side: int, crop: int) -> torch.Tensor:
    """JPEG -> RGB uint8 (3, crop, crop): shorter side resized to `side`, then centre crop."""
    img = Image.open(BytesIO(raw)).convert("RGB")
    w, h = img.size
    scale = side / min(w, h)
    img = img.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(crop, crop, 3).permute(2, 0, 1)


def image_split(dataset: str, split: str, n: int | None, seed: int, side: int, crop: int, balanced: bool,
                holdout_of: int | None = None) -> tuple:
    """(uint8 images (N, 3, crop, crop), int64 labels), decoded once and cached on disk.

    `holdout_of`: a validation split of the training data, disjoint from its train subset of that size.
    """
    kind = f"val{holdout_of}" if holdout_of else ("bal" if balanced else "rand")
    cache = CACHE_DIR / f"{dataset}-{split}-n{'all' if n is None else n}-s{seed}-{side}-{crop}-{kind}.pt"
    if cache.exists():
        return torch.load(cache)
    table = pq.read_table(DATA_DIR / dataset / f"{split}.parquet")
    labels = table.column("label").to_pylist()
    if holdout_of:
        idx = validation_indices(labels, n, seed, holdout_of)
    else:
        idx = _balanced_indices(labels, n, seed) if balanced else _random_indices(len(labels), n, seed)
    images = table.column("image").take(idx).to_pylist()
    x = torch.stack([_decode(im["bytes"], side, crop) for im in images])
    y = torch.tensor([labels[i] for i in idx], dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save((x, y), tmp)
    os.replace(tmp, cache)
    return x, y


def num_classes(dataset: str) -> int:
    meta = pq.read_schema(DATA_DIR / dataset / "test.parquet" if dataset != "sst2" else
                          DATA_DIR / dataset / "validation.parquet").metadata[b"huggingface"]
    return len(json.loads(meta)["info"]["features"]["label"]["names"])


def _random_resized_crop(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop (scale 0.25-1, ratio 3/4-4/3) + horizontal flip, on a private RNG."""
    from torchvision.transforms.v2 import functional as TF

    _, h, w = img.shape
    for _ in range(10):
        area = h * w * (0.25 + 0.75 * torch.rand(1, generator=g).item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=g).item())
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            break
    else:
        top, left, ch, cw = 0, 0, h, w
    out = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    return out.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else out


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> pixel / 127.5 - 1, the input of the MCU networks and of tf_efficientnet_lite0."""
    return x.float() / 127.5 - 1.0


@dataclass
class Task:
    """Train/eval data of one run and how a batch becomes a loss."""

    kind: str  # "image" | "text"
    train: Any
    eval: Any
    num_classes: int
    input_size: list[int]
    val: Any = None  # a validation split carved from the training data (learning-rate choice)
    channels_last: bool = False  # image batches in channels-last layout: ~2x faster convolutions on CPU

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        x = normalise(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train[1]) / batch_size)

    def train_batches(self, batch_size: int, g: torch.Generator, image_size: int) -> Iterator[Any]:
        order = torch.randperm(len(self.train[1]), generator=g)
        for position in range(self.steps_per_epoch(batch_size)):
            yield self.train_batch(order, position, batch_size, g, image_size)

    def train_batch(self, order: torch.Tensor, position: int, batch_size: int, g: torch.Generator,
                    image_size: int) -> Any:
        """Batch `position` of an epoch's `order`; its augmentation draws from `g` (so a run can stop after any batch
        and continue from the order, the position and the state of `g`)."""
        idx = order[position * batch_size : (position + 1) * batch_size]
        if self.kind == "image":
            x = torch.stack([_random_resized_crop(self.train[0][i], image_size, g) for i in idx.tolist()])
            return self._images(x), self.train[1][idx]
        return self._text_batch(self.train, idx.tolist())

    def eval_batches(self, batch_size: int, split: str = "eval") -> Iterator[Any]:
        data = getattr(self, split)
        n = len(data[1])
        for start in range(0, n, batch_size):
            if self.kind == "image":
                yield self._images(data[0][start : start + batch_size]), data[1][start : start + batch_size]
            else:
                yield self._text_batch(data, list(range(start, min(n, start + batch_size))))

    def measure_batch(self, batch_size: int) -> Any:
        """A fixed batch for the memory measurement (text: padded to the full length the budget counts)."""
        if self.kind == "image":
            return self._images(self.eval[0][:batch_size]), self.eval[1][:batch_size]
        return self._text_batch(self.train, list(range(batch_size)), pad_to=self.input_size[0])

    @staticmethod
    def _text_batch(split: tuple, idx: list[int], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        ids, labels = split
        length = pad_to or max(len(ids[i]) for i in idx)
        input_ids = torch.zeros(len(idx), length, dtype=torch.long)
        mask = torch.zeros(len(idx), length, dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels[idx]}


def _text_split(dataset: str, split: str, n: int | None, seed: int, tokenizer: Any) -> tuple:
    table = pq.read_table(DATA_DIR / dataset / f"{split}.parquet")
    labels = table.column("label").to_pylist()
    idx = list(range(len(labels))) if n is None else _balanced_indices(labels, n, seed)
    texts = table.column("text").take(idx).to_pylist()
    ids = tokenizer(texts, truncation=True, max_length=TEXT_MAX_LENGTH)["input_ids"]
    return ids, torch.tensor([labels[i] for i in idx], dtype=torch.long)


def load_task(dataset: str, recipe: dict, tokenizer: Any = None, train_size: int | None = None) -> Task:
    """The fixed (data_seed) class-balanced train subset, the fixed eval subset (`eval_size` None: the
    whole test split) and, with `validation_size`, a class-balanced validation split of the training data."""
    n_train = train_size or recipe["train_size"]
    seed = recipe["data_seed"]
    if dataset in ("sst2", "agnews"):
        eval_split = "validation" if dataset == "sst2" else "test"
        eval_n = recipe.get("eval_size")
        train = _text_split(dataset, "train", n_train, seed, tokenizer)
        evals = _text_split(dataset, eval_split, eval_n, seed, tokenizer)
        return Task("text", train, evals, num_classes(dataset), [TEXT_MAX_LENGTH])
    size = recipe["image_size"]
    train = image_split(dataset, "train", n_train, seed, side=size + 16, crop=size + 16, balanced=True)
    eval_side = round(size * 1.15)
    evals = image_split(dataset, "test", recipe["eval_size"], seed, side=eval_side, crop=size, balanced=False)
    val = None
    if recipe.get("validation_size"):
        val = image_split(dataset, "train", recipe["validation_size"], seed, side=eval_side, crop=size, balanced=True,
                          holdout_of=n_train)
    return Task("image", train, evals, num_classes(dataset), [3, size, size], val,
                bool(recipe.get("channels_last")))


# -- models and methods ----------------------------------------------------------------------------
def load_network(network: str, n_classes: int) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None); the classifier is fresh and named `classifier` in every network."""
    from medyate_peft.backbones import load_efficientnet_lite0, load_mcu_model, load_minilm

    if network == "minilm":
        return load_minilm(num_labels=n_classes)
    if network == "efficientnet-lite0":
        torch.manual_seed(0)  # timm's fresh head: the same start for every method and seed
        return load_efficientnet_lite0(num_classes=n_classes), None
    return load_mcu_model(network, num_classes=n_classes), None


def loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return F.cross_entropy(model(x), y)


def logits_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return model(batch[0])


def candidate_costs(model: nn.Module, batch: Any) -> list:
    """Spec costs of every Conv2d/Linear outside the classifier: full fine-tuning in the papers' slots."""
    from medyate_peft.budget import activation_slots_of_input, layer_cost

    costs, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.startswith("classifier"):
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, n=name: costs.append(layer_cost(n, m, activation_slots_of_input(m, a[0])))))
    try:
        with torch.no_grad():
            logits_of(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return costs


def freeze_bn_stats(model: nn.Module) -> None:
    """BatchNorm running statistics stay the pretrained ones (as MeDyate keeps them)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_keeping_bn_stats(model: nn.Module) -> Callable[[], None]:
    """A train-mode switch for `model` that leaves its BatchNorm running statistics as they are."""

    def train() -> None:
        model.train()
        freeze_bn_stats(model)

    return train


@dataclass
class Setup:
    model: nn.Module
    params: list[nn.Parameter]
    train_mode: Callable[[], None]
    info: dict


def strategy_of(spec: dict) -> str | None:
    """The MeDyate strategy a run trains with (a named variant sets `strategy` beside its options); None: a baseline."""
    return None if spec["method"] in BASELINES else spec.get("strategy", spec["method"])


def medyate_config(spec: dict, input_size: list[int]) -> Any:
    """The MeDyateConfig of a run: its budget in fp32 slots, strategy, seed, layer ranking and any further options."""
    from medyate_peft import MeDyateConfig

    return MeDyateConfig(budget_kb=spec["budget_slots"] * 4 / 1024, input_size=input_size, strategy=strategy_of(spec),
                         seed=spec["seed"], layer_ranking=spec.get("ranking_path"), modules_to_save=["classifier"],
                         **spec.get("medyate_options", {}))


def setup_method(spec: dict, model: nn.Module, task: Task) -> Setup:
    """Wrap `model` for the method of `spec` and say what is trainable."""
    method = spec["method"]
    if method in FULL_METHODS:
        for p in model.parameters():
            p.requires_grad_(True)
        # full_frozen_bn: BatchNorm's affine weights train, its running statistics stay, as in every other method
        train = model.train if method == "full" else train_keeping_bn_stats(model)
        return Setup(model, list(model.parameters()), train, {})
    if method == "classifier":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
        return Setup(model, [p for p in model.parameters() if p.requires_grad], train_keeping_bn_stats(model), {})
    from peft import LoraConfig, get_peft_model

    if method == "lora":
        targets = lora_targets(model)
        r = lora_rank(model, targets, spec["lora_weight_slots"])
        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets,
                            modules_to_save=["classifier"])
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return Setup(peft_model, params, train_keeping_bn_stats(peft_model),
                     {"lora_r": r, "lora_targets": len(config.target_modules)})
    peft_model = get_peft_model(model, medyate_config(spec, task.input_size))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return Setup(peft_model, params, peft_model.train, {})


# -- measurement -----------------------------------------------------------------------------------
def measure_step(setup: Setup, spec: dict, batch: Any) -> dict:
    """Saved-activation and weight-gradient bytes of one training step on `batch`."""
    model = setup.model
    if strategy_of(spec) is not None:
        if isinstance(batch, dict):
            report = model.memory_report(**batch)
        else:
            report = model.memory_report(batch[0])
        selected, frozen = report.measured_selected_saved_bytes, report.measured_frozen_path_saved_bytes
        return {
            "saved_activation_bytes": selected + frozen,
            "selected_saved_bytes": selected,
            "frozen_path_saved_bytes": frozen,
            "weight_grad_bytes": report.measured_weight_grad_bytes_allocated + report.measured_head_grad_bytes,
            "weight_grad_bytes_used": report.measured_weight_grad_bytes_used,
            "head_grad_bytes": report.measured_head_grad_bytes,
            "analytical_used_slots": report.used_slots,
            "analytical_budget_slots": report.budget_slots,
            "selected_layers": len(report.layers),
            "pool_layers": len(model.base_model.plans[model.active_adapter].pool.costs),
        }
    from medyate_peft.measure import measure_training_step

    setup.train_mode()
    by_module, grads = measure_training_step(lambda: loss_of(model, batch), model)
    head = sum(v for name, v in grads.items() if "classifier" in name)
    out = {
        "saved_activation_bytes": sum(by_module.values()),
        "weight_grad_bytes": sum(grads.values()),
        "head_grad_bytes": head,
    }
    if spec["method"] in FULL_METHODS:
        out["analytical_used_slots"] = sum(c.layer_slots for c in candidate_costs(model, batch))
    elif spec["method"] == "classifier":
        out["analytical_used_slots"] = 0
    return out


def adapter_file(setup: Setup, spec: dict) -> tuple[int, str]:
    """Size and SHA-256 of what one would ship: the PEFT adapter file, the head, or the whole state dict
    (the digest tells whether two runs, e.g. one resumed from a checkpoint, trained the same bits)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as d:
        if spec["method"] in (*FULL_METHODS, "classifier"):
            module = setup.model if spec["method"] != "classifier" else setup.model.get_submodule("classifier")
            path = Path(d) / "model.safetensors"
            save_model(module, str(path))
        else:
            setup.model.save_pretrained(d)
            path = Path(d) / "adapter_model.safetensors"
        return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, device: torch.device | None = None, precision: str = "fp32",
             split: str = "eval") -> float:
    """Top-1 on the test subset (`split="eval"`) or on the validation split (`"val"`)."""
    model.eval()
    correct = total = 0
    for batch in task.eval_batches(128, split):
        batch = to_device(batch, device or torch.device("cpu"))
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        with autocast(device or torch.device("cpu"), precision):
            correct += int((logits_of(model, batch).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up from 0, then cosine to 0, per step (the papers' schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -- device and precision -------------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16")


def run_device(wanted: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; `cuda` without one is an error, not a silent CPU run."""
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(wanted)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {wanted!r} asked for, but torch {torch.__version__} sees no GPU "
                           "(torch.cuda.is_available() is False); pass --device cpu or --device auto")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """fp32: as the papers; bf16: autocast (weights, gradients and optimizer stay fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {PRECISIONS}")
    return contextlib.nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return tuple(t.to(device, non_blocking=True) for t in batch)


# -- one run ---------------------------------------------------------------------------------------
PAUSED = "paused"
_TERMINATED: list[int] = []  # SIGTERM received: stop as at a piece's end


def _out_of_time(deadline: float | None) -> bool:
    return bool(_TERMINATED) or deadline is not None and time.time() >= deadline


@contextlib.contextmanager
def _pause_on_sigterm() -> Iterator[None]:
    """SIGTERM (the benchmark's own stop, `timeout`, a machine going away) ends the run like a piece's end:
    a checkpoint after the current step."""
    previous = signal.signal(signal.SIGTERM, lambda number, frame: _TERMINATED.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _TERMINATED.clear()


def run_one(spec: dict, record_path: str, checkpoint_path: str | None = None, deadline: float | None = None) -> str:
    """Train and measure the run of `spec`; write its record atomically to `record_path`.

    With `checkpoint_path` the run saves its whole state there after every epoch and, past `deadline`
    (`time.time()`) or on SIGTERM, after the current step, then returns PAUSED; a later call continues
    from it exactly (same data order, augmentation, draws and arithmetic on the same device). Returns
    "done" once the record is written (the checkpoint is then removed).
    """
    if checkpoint_path is None:
        return _run(spec, record_path, None, deadline)
    with _pause_on_sigterm():
        return _run(spec, record_path, Path(checkpoint_path), deadline)


def _run(spec: dict, record_path: str, ckpt_path: Path | None, deadline: float | None) -> str:
    torch.set_num_threads(spec.get("threads", 1))  # 1: stable under a shared CPU
    device, precision = run_device(spec.get("device", "cpu")), spec.get("precision", "fp32")
    recipe = spec["recipe"]
    piece_start = time.perf_counter()
    saved = bench_checkpoint.load(ckpt_path, spec) if ckpt_path else None
    n_classes = num_classes(spec["dataset"])
    model, tokenizer = load_network(spec["network"], n_classes)
    task = load_task(spec["dataset"], recipe, tokenizer)
    torch.manual_seed(spec["seed"])  # LoRA's init; data order and augmentation use `g` below
    setup = setup_method(spec, model, task)
    setup.model.to(device)
    g = torch.Generator().manual_seed(spec["seed"])
    lr = spec.get("lr", recipe["lr"])  # a learning-rate sweep sets it per run
    optimizer = torch.optim.SGD(setup.params, lr=lr, momentum=0.0, weight_decay=0.0)
    batch_size = recipe["batch_size"]
    steps_per_epoch = task.steps_per_epoch(batch_size)
    total, warmup = steps_per_epoch * recipe["epochs"], steps_per_epoch * recipe["warmup_epochs"]
    oracle = spec["method"] == "det_rgn"
    tuner = setup.model.base_model if strategy_of(spec) is not None else None
    g_oracle = torch.Generator().manual_seed(10_000 + spec["seed"])
    image_size = recipe.get("image_size", 0)

    def full_gradient() -> Callable[[], torch.Tensor]:
        """One training batch (own RNG) for the oracle's dense gradient."""
        batch = to_device(next(task.train_batches(batch_size, g_oracle, image_size)), device)

        def loss() -> torch.Tensor:
            with autocast(device, precision):
                return loss_of(setup.model, batch)

        return loss

    # What a checkpoint carries besides the weights: where the run is and what it measured so far.
    run: dict[str, Any] = {"epoch": 0, "position": 0, "order": None, "step": 0, "step_times": [], "losses": [],
                           "oracle_s": 0.0, "train_s": 0.0, "pieces": [], "loadavg_start": os.getloadavg()[0],
                           "peak_rss_bytes": 0, "peak_cuda_bytes": 0, "grad_norms": [],
                           "draws": 1 if tuner is not None else None}  # draws: channel selections that trained
    every = spec.get("medyate_options", {}).get("resample_every")
    dynamic = tuner is not None and get_strategy(strategy_of(spec)).dynamic

    def resample() -> None:
        t = time.perf_counter()
        tuner.resample(optimizer=optimizer, **({"full_gradient": full_gradient()} if oracle else {}))
        run["oracle_s"] += time.perf_counter() - t if oracle else 0.0
        run["draws"] += dynamic

    if saved is not None:
        _load_training_state(saved, setup, tuner, optimizer, (g, g_oracle), device, ckpt_path)
        run.update({k: saved[k] for k in run})
        print(f"{spec['id']}: continues from {ckpt_path} at epoch {run['epoch'] + 1}, batch {run['position']} "
              f"(step {run['step']} of {total})", flush=True)
    elif oracle:
        t = time.perf_counter()
        tuner.plan(full_gradient=full_gradient())
        run["oracle_s"] += time.perf_counter() - t

    def checkpoint() -> None:
        piece = {"device": str(device), "seconds": time.perf_counter() - piece_start, "steps_to": run["step"]}
        state = {**run, "pieces": [*run["pieces"], piece], "peak_rss_bytes": _peak_rss(run),
                 "peak_cuda_bytes": _peak_cuda(run, device)}
        bench_checkpoint.save(ckpt_path, spec, {**state, **_training_state(setup, tuner, optimizer, (g, g_oracle), device)})

    def pause() -> str:
        checkpoint()
        print(f"{PAUSED}: {spec['id']} at epoch {run['epoch'] + 1}/{recipe['epochs']}, batch {run['position']}/"
              f"{steps_per_epoch} (step {run['step']} of {total}); checkpoint {ckpt_path}", flush=True)
        return PAUSED

    def step(batch: Any) -> None:
        """One training step; a non-finite loss raises FloatingPointError."""
        t = time.perf_counter()
        with autocast(device, precision):
            loss = loss_of(setup.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.get("clip_grad_norm"):
            run["grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(setup.params, recipe["clip_grad_norm"])))
        else:  # measured, not applied: whether a method needs clipping is read off these
            grads = [p.grad for p in setup.params if p.grad is not None]
            run["grad_norms"].append(float(torch.nn.utils.get_total_norm(grads)))
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels, not just their launch
        run["step_times"].append(time.perf_counter() - t)
        run["losses"].append(loss.item())
        run["step"] += 1
        run["position"] += 1
        if not math.isfinite(run["losses"][-1]):
            raise FloatingPointError(f"loss is {run['losses'][-1]} at step {run['step']}")

    def diverged(error: FloatingPointError) -> str:
        """A sweep run that diverged is recorded as such; any other run fails (a divergence to look at)."""
        if spec.get("phase") != "sweep":
            raise error
        wall = sum(piece["seconds"] for piece in run["pieces"]) + time.perf_counter() - piece_start
        return _diverged(spec, record_path, ckpt_path, lr, run["step"], str(error), wall)

    t_train = time.perf_counter()
    while run["epoch"] < recipe["epochs"]:
        setup.train_mode()
        if run["order"] is None:
            run["order"] = torch.randperm(len(task.train[1]), generator=g)
        while run["position"] < steps_per_epoch:
            batch = to_device(task.train_batch(run["order"], run["position"], batch_size, g, image_size), device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(run["step"], total, warmup, lr)
            try:
                step(batch)
                if tuner is not None and run["step"] < total and resample_due(every, run["step"]):
                    resample()
            except FloatingPointError as error:  # the loss, or the tuner's own checks (NonFiniteError)
                return diverged(error)
            if ckpt_path and run["position"] < steps_per_epoch and _out_of_time(deadline):
                run["train_s"] += time.perf_counter() - t_train
                return pause()
        if tuner is not None and run["epoch"] + 1 < recipe["epochs"] and resample_due(every):
            try:
                resample()
            except FloatingPointError as error:
                return diverged(error)
        run.update(epoch=run["epoch"] + 1, position=0, order=None, losses=run["losses"][-steps_per_epoch:])
        if ckpt_path and run["epoch"] < recipe["epochs"]:
            run["train_s"] += time.perf_counter() - t_train
            if _out_of_time(deadline):
                return pause()
            checkpoint()
            t_train = time.perf_counter()
    run["train_s"] += time.perf_counter() - t_train
    t = time.perf_counter()
    # A sweep run is scored on the validation split only: the test split never chooses a learning rate.
    top1 = None if spec.get("phase") == "sweep" else evaluate(setup.model, task, device, precision)
    val_top1 = evaluate(setup.model, task, device, precision, "val") if task.val is not None else None
    eval_s = time.perf_counter() - t
    with autocast(device, precision):
        measured = measure_step(setup, spec, to_device(task.measure_batch(batch_size), device))
    skip = min(len(run["step_times"]) - 1, recipe.get("timing_skip_steps", 5))
    size, digest = adapter_file(setup, spec)
    pieces = [*run["pieces"], {"device": str(device), "seconds": time.perf_counter() - piece_start,
                               "steps_to": run["step"]}]
    record = {
        **{k: v for k, v in spec.items() if k not in ("recipe", "ranking_path", "threads")},
        "recipe": recipe,
        "ranking": Path(spec["ranking_path"]).name if spec.get("ranking_path") else None,
        "top1": top1,
        "val_top1": val_top1,
        "lr": lr,
        "draws": run["draws"],
        "grad_norm_median": statistics.median(run["grad_norms"]) if run["grad_norms"] else None,
        "clipped_share": (sum(n > recipe["clip_grad_norm"] for n in run["grad_norms"]) / len(run["grad_norms"])
                          if run["grad_norms"] and recipe.get("clip_grad_norm") else None),
        "train_size": len(task.train[1]),
        "eval_size": None if top1 is None else len(task.eval[1]),
        "val_size": None if task.val is None else len(task.val[1]),
        "steps": run["step"],
        "final_train_loss": statistics.fmean(run["losses"][-steps_per_epoch:]),
        "step_time_median_s": statistics.median(run["step_times"][skip:]),
        "train_seconds": run["train_s"],
        "oracle_seconds": run["oracle_s"],
        "eval_seconds": eval_s,
        "trainable_params": sum(p.numel() for p in setup.params),
        "adapter_bytes": size,
        "adapter_sha256": digest,
        "peak_rss_bytes": _peak_rss(run),
        "measure_batch_size": batch_size,
        "loadavg_start": run["loadavg_start"],
        "loadavg_end": os.getloadavg()[0],
        "wall_seconds": sum(piece["seconds"] for piece in pieces),
        "torch": torch.__version__,
        "device": str(device),
        "precision": precision,
        **setup.info,
        **measured,
    }
    if len(pieces) > 1:
        record["pieces"] = pieces
    if device.type == "cuda":
        record |= {"peak_cuda_bytes": _peak_cuda(run, device), "gpu": torch.cuda.get_device_name(device)}
    atomic_write_json(record, Path(record_path), sort_keys=True, indent=1)
    if ckpt_path:
        ckpt_path.unlink(missing_ok=True)
    return "done"


def _diverged(spec: dict, record_path: str, ckpt_path: Path | None, lr: float, step: int, why: str,
              wall_seconds: float) -> str:
    """The record of a sweep run whose loss or gradients went non-finite: its learning rate is out of the
    choice, and the sweep completes with the others (no score: it is not trained). `diverged_at_step`: the
    optimizer steps it had taken when it stopped."""
    record = {**{k: v for k, v in spec.items() if k not in ("recipe", "ranking_path", "threads")},
              "recipe": spec["recipe"], "lr": lr, "top1": None, "val_top1": None, "diverged_at_step": step,
              "diverged_why": why, "wall_seconds": wall_seconds, "torch": torch.__version__}
    atomic_write_json(record, Path(record_path), sort_keys=True, indent=1)
    if ckpt_path:
        ckpt_path.unlink(missing_ok=True)
    return "done"


def _training_state(setup: Setup, tuner: Any, optimizer: torch.optim.Optimizer,
                    generators: tuple[torch.Generator, ...], device: torch.device) -> dict[str, Any]:
    """What training has changed: weights (MeDyate: also its tuner's exact state), optimizer, every RNG."""
    return {
        "model": trained_state(setup.model), "medyate": None if tuner is None else tuner.training_state_dict(),
        "optimizer": optimizer.state_dict(), "generators": [g.get_state() for g in generators],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _load_training_state(state: dict[str, Any], setup: Setup, tuner: Any, optimizer: torch.optim.Optimizer,
                         generators: tuple[torch.Generator, ...], device: torch.device, path: Path) -> None:
    _, unexpected = setup.model.load_state_dict(state["model"], strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {path} holds weights this model lacks ({unexpected[:3]} ...)")
    if tuner is not None:
        tuner.load_training_state_dict(state["medyate"])
    optimizer.load_state_dict(state["optimizer"])
    for g, saved in zip(generators, state["generators"], strict=True):
        g.set_state(saved)
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _peak_rss(run: dict) -> int:
    """The largest `ru_maxrss` of the run's processes (one per piece)."""
    return max(run["peak_rss_bytes"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _peak_cuda(run: dict, device: torch.device) -> int:
    return max(run["peak_cuda_bytes"], torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)


def make_ranking(network: str, dataset: str, recipe: dict, steps: int, path: Path, device: str = "cpu") -> None:
    """LaRa/RGN layer ranking from a short dense fine-tuning on `dataset` (not the target), saved as JSON."""
    from medyate_peft.ranking import rank_layers, save_ranking

    torch.set_num_threads(1)
    on = run_device(device)
    model, tokenizer = load_network(network, num_classes(dataset))
    model.to(on)
    batch_size = recipe["batch_size"]
    task = load_task(dataset, recipe, tokenizer, train_size=min(steps * batch_size, recipe.get("ranking_size", 2000)))
    g = torch.Generator().manual_seed(0)
    batches = []
    while len(batches) < steps:
        batches += list(task.train_batches(batch_size, g, recipe.get("image_size", 128)))
    batches = [to_device(b, on) for b in batches[:steps]]
    ranking = rank_layers(model, batches, steps=steps, lr=recipe.get("ranking_lr", 0.01), progress=False)
    ranking["source"] = f"{network} on {dataset} (train subset), {steps} dense SGD steps, batch {batch_size}"
    save_ranking(ranking, path)


_INDEXED_WRITES = ("index_put_", "_index_put_impl_", "index_add_", "index_copy_", "scatter_", "scatter_add_")


class OpWork(TorchDispatchMode):
    """Per aten op: calls and bytes of the tensors it writes (fresh outputs and in-place targets), a
    load-independent measure of the memory traffic a step adds."""

    def __init__(self) -> None:
        super().__init__()
        self.work: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _INDEXED_WRITES:  # writes only its values into the target
            values = [t for t in args if isinstance(t, torch.Tensor)][-1]
            written = values.numel() * values.element_size()
        else:
            in_place = name.endswith("_") or "out" in kwargs
            written = sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                          and (in_place or t.untyped_storage().data_ptr() not in inputs))  # views write nothing
        entry = self.work.setdefault(func.overloadpacket.__name__, [0, 0])
        entry[0] += 1
        entry[1] += written
        return out


# glibc's mallopt parameters; values are C ints
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEPT_MEMORY = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: (1 << 31) - 1, _M_TOP_PAD: 512 << 20}


def keep_freed_memory() -> str | None:
    """Make glibc's malloc keep what torch frees (no trimming; blocks up to 32 MiB from the heap), as a GPU's
    caching allocator does: with the defaults, the page faults of freshly mapped memory added up to 2x a
    vision forward's CPU time, unevenly between methods and runs (measured: the same step 0.99-1.26x its
    floor in four runs; 1.165 and 1.170 with memory kept). Returns what was set, or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(libc.mallopt(param, value) == 1 for param, value in KEPT_MEMORY.items()):
        return None
    return "glibc malloc keeps freed memory (mallopt: mmap threshold 32 MiB, no trimming, 512 MiB top pad)"

