"""One benchmark run, end to end: data, model, method, training, measurement, record.

`run_one(spec, path)` is what `scripts/benchmark.py` starts in a fresh child process per run, so
that the peak RSS it reports (`ru_maxrss`) belongs to that run alone. Every method gets the same
data, order, augmentation, schedule and measurement; only what is trained differs.
"""

from __future__ import annotations

import json
import math
import os
import resource
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

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import medyate_peft  # noqa: E402, F401  (registers the MEDYATE peft type)
from medyate_peft.atomic import atomic_write_json  # noqa: E402
from medyate_peft.lora_baseline import lora_rank, lora_targets  # noqa: E402
from medyate_peft.strategies import get_strategy, resample_due  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MEDYATE_DATA_DIR", REPO.parent / "shared" / "assets" / "data"))
CACHE_DIR = Path(os.environ.get("MEDYATE_BENCH_CACHE", Path.home() / ".cache" / "medyate-bench"))
BASELINES = ("full", "classifier", "lora")
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

    def train_batches(self, batch_size: int, g: torch.Generator, image_size: int) -> Iterator[Any]:
        n = len(self.train[1])
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if self.kind == "image":
                x = torch.stack([_random_resized_crop(self.train[0][i], image_size, g) for i in idx.tolist()])
                yield self._images(x), self.train[1][idx]
            else:
                yield self._text_batch(self.train, idx.tolist())

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
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Setup(model, list(model.parameters()), model.train, {})
    if method == "classifier":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))

        def train_head() -> None:
            model.train()
            freeze_bn_stats(model)

        return Setup(model, [p for p in model.parameters() if p.requires_grad], train_head, {})
    from peft import LoraConfig, get_peft_model

    if method == "lora":
        targets = lora_targets(model)
        r = lora_rank(model, targets, spec["lora_weight_slots"])
        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets,
                            modules_to_save=["classifier"])
        peft_model = get_peft_model(model, config)

        def train_lora() -> None:
            peft_model.train()
            freeze_bn_stats(peft_model)

        params = [p for p in peft_model.parameters() if p.requires_grad]
        return Setup(peft_model, params, train_lora, {"lora_r": r, "lora_targets": len(config.target_modules)})
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
    if spec["method"] == "full":
        out["analytical_used_slots"] = sum(c.layer_slots for c in candidate_costs(model, batch))
    elif spec["method"] == "classifier":
        out["analytical_used_slots"] = 0
    return out


def adapter_bytes(setup: Setup, spec: dict) -> int:
    """Size of what one would ship: the PEFT adapter file, the head, or the whole state dict."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as d:
        if spec["method"] in BASELINES[:2]:
            module = setup.model if spec["method"] == "full" else setup.model.get_submodule("classifier")
            save_model(module, f"{d}/model.safetensors")
            return os.path.getsize(f"{d}/model.safetensors")
        setup.model.save_pretrained(d)
        return os.path.getsize(f"{d}/adapter_model.safetensors")


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: str = "eval") -> float:
    """Top-1 on the test subset (`split="eval"`) or on the validation split (`"val"`)."""
    model.eval()
    correct = total = 0
    for batch in task.eval_batches(128, split):
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        correct += int((logits_of(model, batch).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up from 0, then cosine to 0, per step (the papers' schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -- one run ---------------------------------------------------------------------------------------
def run_one(spec: dict, record_path: str) -> None:
    """Train and measure the run of `spec`; write its record atomically to `record_path`."""
    torch.set_num_threads(spec.get("threads", 1))  # 1: stable under a shared CPU
    recipe = spec["recipe"]
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    n_classes = num_classes(spec["dataset"])
    model, tokenizer = load_network(spec["network"], n_classes)
    task = load_task(spec["dataset"], recipe, tokenizer)
    torch.manual_seed(spec["seed"])  # LoRA's init; data order and augmentation use `g` below
    setup = setup_method(spec, model, task)
    g = torch.Generator().manual_seed(spec["seed"])
    lr = spec.get("lr", recipe["lr"])  # a learning-rate sweep sets it per run
    optimizer = torch.optim.SGD(setup.params, lr=lr, momentum=0.0, weight_decay=0.0)
    batch_size = recipe["batch_size"]
    steps_per_epoch = math.ceil(len(task.train[1]) / batch_size)
    total, warmup = steps_per_epoch * recipe["epochs"], steps_per_epoch * recipe["warmup_epochs"]
    oracle = spec["method"] == "det_rgn"
    tuner = setup.model.base_model if strategy_of(spec) is not None else None
    g_oracle = torch.Generator().manual_seed(10_000 + spec["seed"])

    def full_gradient() -> Callable[[], torch.Tensor]:
        """One training batch (own RNG) for the oracle's dense gradient."""
        batch = next(task.train_batches(batch_size, g_oracle, recipe.get("image_size", 0)))
        return lambda: loss_of(setup.model, batch)

    def resample() -> None:
        nonlocal oracle_s, draws
        t = time.perf_counter()
        tuner.resample(optimizer=optimizer, **({"full_gradient": full_gradient()} if oracle else {}))
        oracle_s += time.perf_counter() - t if oracle else 0.0
        draws += dynamic

    oracle_s = 0.0
    if oracle:
        t = time.perf_counter()
        tuner.plan(full_gradient=full_gradient())
        oracle_s += time.perf_counter() - t
    every = spec.get("medyate_options", {}).get("resample_every")
    dynamic = tuner is not None and get_strategy(strategy_of(spec)).dynamic
    draws = 1 if tuner is not None else None  # channel selections that trained (the first one included)
    step, step_times, losses, grad_norms = 0, [], [], []
    t_train = time.perf_counter()
    for epoch in range(recipe["epochs"]):
        setup.train_mode()
        for batch in task.train_batches(batch_size, g, recipe.get("image_size", 0)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr)
            t = time.perf_counter()
            loss = loss_of(setup.model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.get("clip_grad_norm"):
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(setup.params, recipe["clip_grad_norm"])))
            optimizer.step()
            step_times.append(time.perf_counter() - t)
            losses.append(loss.item())
            step += 1
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"loss is {losses[-1]} at step {step}")
            if tuner is not None and step < total and resample_due(every, step):
                resample()
        if tuner is not None and epoch + 1 < recipe["epochs"] and resample_due(every):
            resample()
    train_s = time.perf_counter() - t_train
    t = time.perf_counter()
    # A sweep run is scored on the validation split only: the test split never chooses a learning rate.
    top1 = None if spec.get("phase") == "sweep" else evaluate(setup.model, task)
    val_top1 = evaluate(setup.model, task, "val") if task.val is not None else None
    eval_s = time.perf_counter() - t
    measured = measure_step(setup, spec, task.measure_batch(batch_size))
    skip = min(len(step_times) - 1, recipe.get("timing_skip_steps", 5))
    record = {
        **{k: v for k, v in spec.items() if k not in ("recipe", "ranking_path", "threads")},
        "recipe": recipe,
        "ranking": Path(spec["ranking_path"]).name if spec.get("ranking_path") else None,
        "top1": top1,
        "val_top1": val_top1,
        "lr": lr,
        "draws": draws,
        "grad_norm_median": statistics.median(grad_norms) if grad_norms else None,
        "clipped_share": (sum(n > recipe["clip_grad_norm"] for n in grad_norms) / len(grad_norms)
                          if grad_norms else None),
        "train_size": len(task.train[1]),
        "eval_size": None if top1 is None else len(task.eval[1]),
        "val_size": None if task.val is None else len(task.val[1]),
        "steps": step,
        "final_train_loss": statistics.fmean(losses[-steps_per_epoch:]),
        "step_time_median_s": statistics.median(step_times[skip:]),
        "train_seconds": train_s,
        "oracle_seconds": oracle_s,
        "eval_seconds": eval_s,
        "trainable_params": sum(p.numel() for p in setup.params),
        "adapter_bytes": adapter_bytes(setup, spec),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "measure_batch_size": batch_size,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        **setup.info,
        **measured,
    }
    atomic_write_json(record, Path(record_path), sort_keys=True, indent=1)


def make_ranking(network: str, dataset: str, recipe: dict, steps: int, path: Path) -> None:
    """LaRa/RGN layer ranking from a short dense fine-tuning on `dataset` (not the target), saved as JSON."""
    from medyate_peft.ranking import rank_layers, save_ranking

    torch.set_num_threads(1)
    model, tokenizer = load_network(network, num_classes(dataset))
    batch_size = recipe["batch_size"]
    task = load_task(dataset, recipe, tokenizer, train_size=min(steps * batch_size, recipe.get("ranking_size", 2000)))
    g = torch.Generator().manual_seed(0)
    batches = []
    while len(batches) < steps:
        batches += list(task.train_batches(batch_size, g, recipe.get("image_size", 128)))
    ranking = rank_layers(model, batches[:steps], steps=steps, lr=recipe.get("ranking_lr", 0.01), progress=False)
    ranking["source"] = f"{network} on {dataset} (train subset), {steps} dense SGD steps, batch {batch_size}"
    save_ranking(ranking, path)
