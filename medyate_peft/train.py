"""Fine-tune a classifier with MeDyate under a memory budget, with Accelerate (1..N processes, CPU or GPU).

`medyate train ...` and `python scripts/train.py ...` run `main`; `accelerate launch -m medyate_peft.cli
train ...` runs it under DDP. Full fine-tuning, classifier-only training and PEFT's LoRA with its rank
matched to the budget (`--method full|head|lora`) share the loop, as baselines. Recipe defaults are
those of scripts/bench_configs/vision.yaml (the papers' SGD without momentum or weight decay, lr
0.125, cosine schedule with warm-up; random resized crops over 25-100 % of the image, horizontal
flips, gradient-norm clipping at 1.0); the run prints the recipe it uses.

Every epoch writes `checkpoint-epochNNN/` (the adapter + `training_state.pt`) atomically; `--resume`
continues a run exactly: the MeDyate sampler state, optimizer and schedule are restored, and the
data order and augmentation are seeded from (seed, epoch, rank), so they need no stored RNG state.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import preflight
from .atomic import atomic_directory, atomic_write_json
from .candidates import detect_head
from .devices import wide_float
from .strategies import resample_due

METHODS = ("medyate", "full", "head", "lora")
STATE_FILE = "training_state.pt"
CHECKPOINT_PREFIX = "checkpoint-epoch"
STATE_FORMAT = 1
# A resumed run must match these settings, or it would not continue the same training.
RESUME_KEYS = (
    "model", "weights", "random_init", "dataset", "train_split", "max_train_samples", "method", "budget_kb",
    "strategy", "seed", "batch_size", "warmup_epochs", "image_size", "max_length", "resample_every",
    "crop_scale", "hflip", "clip_grad_norm", "lora_r",
)
# These may change on --resume (a lower rate after a NaN, more epochs): the schedule is rebuilt from them.
SCHEDULE_KEYS = ("lr", "epochs")
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
DEFAULT_CROP_SCALE = (0.25, 1.0)  # scripts/bench_configs/vision.yaml's augmentation


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Which pretrained model and which dataset (shared by `medyate train` and `medyate rank`)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="mcu:<name>, tf_efficientnet_lite0, a timm name, hf:<name or path>")
    model.add_argument("--weights", help="local checkpoint for a timm model instead of Hub weights")
    model.add_argument("--random-init", action="store_true", help="no pretrained weights (timm / transformers)")
    model.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    model.add_argument("--max-length", type=int, default=128, help="tokens per text sample (fixed: padded)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="Hub dataset name, or a local parquet/jsonl/csv file or folder")
    data.add_argument("--train-split", default="train")
    data.add_argument("--eval-split", help="default: validation or test, else 10%% of the training split")
    data.add_argument("--max-train-samples", type=int)
    data.add_argument("--max-eval-samples", type=int)
    data.add_argument("--image-column")
    data.add_argument("--text-column")
    data.add_argument("--label-column")
    data.add_argument(
        "--num-workers", type=int, default=1, help="data loader processes (image decoding off the training threads)"
    )

    augment = parser.add_argument_group("augmentation (images, training split only)")
    augment.add_argument(
        "--crop-scale", type=float, nargs=2, default=list(DEFAULT_CROP_SCALE), metavar=("MIN", "MAX"),
        help="random resized crop: share of the image area kept (default 0.25 1.0; 1 1 keeps whole images)",
    )
    augment.add_argument(
        "--hflip", action=argparse.BooleanOptionalAction, default=True,
        help="random horizontal flips (default on); --no-hflip for traffic signs, text, digits, where a "
        "mirrored image is another class",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options (shared by `medyate train` and scripts/train.py)."""
    add_model_and_data_arguments(parser)
    method = parser.add_argument_group("method")
    method.add_argument(
        "--method", choices=METHODS, default="medyate", help="medyate, or a baseline: full, head, lora (PEFT LoRA)"
    )
    method.add_argument("--budget-kb", type=float, default=64.0, help="training-memory budget per sample, kB")
    method.add_argument("--strategy", default="trady", help="channel-selection strategy (medyate_peft.STRATEGIES)")
    method.add_argument("--layer-ranking", help="JSON file with the LaRa / RGN layer ranking")
    method.add_argument(
        "--lora-r", type=int,
        help="LoRA rank (default: matched to --budget-kb, as many trainable values as MeDyate's; see lora_baseline)",
    )
    method.add_argument(
        "--resample-every", type=int, help="re-draw the channels every N optimizer steps (default: at each epoch end)"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--batch-size", type=int, default=32, help="per process")
    optim.add_argument("--eval-batch-size", type=int, default=128)
    optim.add_argument(
        "--lr", type=float, default=0.125, help="the papers' 0.125; short runs of fp32 MCU nets want ~0.02"
    )
    optim.add_argument("--warmup-epochs", type=float, default=1.0)
    optim.add_argument(
        "--clip-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)"
    )
    optim.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's own choice)")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True)
    out.add_argument("--resume", help="a checkpoint folder, or an output folder (its latest checkpoint)")
    out.add_argument("--overwrite", action="store_true", help="replace the checkpoints of another run in --output-dir")
    out.add_argument("--save-total-limit", type=int, default=1, help="checkpoints kept (at least 1)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the adapter and its card to this Hub repo")
    visibility = out.add_mutually_exclusive_group()
    visibility.add_argument("--hub-private", action="store_true", help="a private Hub repo (the default)")
    visibility.add_argument("--hub-public", action="store_true", help="a public Hub repo")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = add_train_arguments(argparse.ArgumentParser(prog="medyate train", description=__doc__.split("\n")[0]))
    return parser.parse_args(argv)


# -- files ----------------------------------------------------------------------------------------
def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of this script's checkpoints in `folder`, by epoch: `checkpoint-epoch<N>` folders
    holding its state file. Nothing else (a user's `checkpoint-epoch003.bak/`) is ever one."""
    found = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _CHECKPOINT_NAME.fullmatch(entry.name)
        if match and not entry.is_symlink() and (entry / STATE_FILE).is_file():
            found.append((int(match[1]), entry))
    return sorted(found)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """`path` itself if it is a checkpoint, else its latest `checkpoint-epoch<N>` (by number)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no {STATE_FILE} there nor in a {CHECKPOINT_PREFIX}<N>/ folder")
    return found[-1][1]


def rotate_checkpoints(folder: Path, epoch: int, keep: int) -> None:
    """Keep the `keep` latest checkpoints up to `epoch` (just written). Later-numbered ones belong to the
    run this one replaces (--overwrite, or a resume from an earlier epoch) and would be taken for the
    latest by --resume: they go too. Only `checkpoints()` folders are ever removed."""
    found = checkpoints(folder)
    replaced = [path for number, path in found if number > epoch]
    older = [path for number, path in found if number <= epoch][:-keep]
    for path in replaced + older:
        shutil.rmtree(path)


def check_run_settings(args: argparse.Namespace, checkpoint: Path | None) -> None:
    """Refuse a run that would mix its checkpoints with another run's, or keep none."""
    if args.save_total_limit < 1:
        raise ValueError(f"--save-total-limit must be at least 1 (the checkpoint --resume needs), got "
                         f"{args.save_total_limit}")
    output_dir = Path(args.output_dir)
    found = checkpoints(output_dir)
    resuming_here = checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve()
    if found and not (args.overwrite or resuming_here):
        raise ValueError(
            f"--output-dir {output_dir} holds the checkpoints of another run ({found[-1][1].name}); pass --resume "
            f"{output_dir} to continue it, --overwrite to replace it, or another --output-dir"
        )


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The state file of a checkpoint, checked: one clear error naming the file if it is damaged."""
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, foreign object: all mean a damaged file
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); resume from another "
                         "checkpoint") from err
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"{path} is not a valid training state ({problem}); resume from another checkpoint")
    return state


def _state_problem(state: Any) -> str | None:
    keys = ("format", "epoch", "settings", "history", "model", "optimizer", "scheduler")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        return f"it lacks {[k for k in keys if not isinstance(state, dict) or k not in state]}"
    if state["format"] != STATE_FORMAT:
        return f"format {state['format']!r}, this version reads {STATE_FORMAT}"
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return f"epoch {epoch!r} is not a completed epoch number"
    if not isinstance(state["history"], list) or len(state["history"]) != epoch:
        return f"its history does not hold the {epoch} epochs it claims"
    return _non_finite(state)


def _non_finite(value: Any, where: str = "") -> str | None:
    """Where the first NaN/inf tensor of a nested state is, if any."""
    if torch.is_tensor(value):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return None if finite else f"{where.lstrip('.')} holds NaN/inf"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = _non_finite(item, f"{where}.{key}")
        if problem:
            return problem
    return None


# -- model ----------------------------------------------------------------------------------------
def _head_names(model: nn.Module) -> list[str]:
    head = detect_head(model)
    if head is None:
        raise ValueError(f"no classifier head found on {type(model).__name__}; cannot train it")
    return head


def _lora_model(loaded: Any, args: argparse.Namespace, head: list[str]) -> nn.Module:
    """PEFT's LoRA on the pointwise layers, r matched to --budget-kb (medyate_peft.lora_baseline), head trained."""
    from peft import LoraConfig, get_peft_model

    from .budget import budget_slots
    from .lora_baseline import lora_rank, lora_targets

    if args.lora_r is not None and args.lora_r < 1:
        raise ValueError(f"--lora-r must be at least 1, got {args.lora_r}")
    targets = lora_targets(loaded.model)
    r = args.lora_r or lora_rank(loaded.model, targets, budget_slots(args.budget_kb, 4))
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets, modules_to_save=head)
    peft_model = get_peft_model(loaded.model, config)
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = loaded.spec
    return peft_model


def build_trainable(loaded: Any, args: argparse.Namespace) -> nn.Module:
    """The model to train: a MeDyate or LoRA PeftModel, or the base model with all / head parameters trainable."""
    model = loaded.model
    if args.method == "medyate":
        from peft import get_peft_model

        from . import MeDyateConfig

        if args.layer_ranking and not Path(args.layer_ranking).is_file():
            raise FileNotFoundError(f"--layer-ranking {args.layer_ranking}: no such file")
        config = MeDyateConfig(
            budget_kb=args.budget_kb,
            input_size=loaded.input_size,
            strategy=args.strategy,
            seed=args.seed,
            layer_ranking=args.layer_ranking,
            resample_every=args.resample_every,
        )
        peft_model = get_peft_model(model, config)
        # After get_peft_model, which resets it from the model's `name_or_path` (timm/MCU models have none).
        peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = loaded.spec
        return peft_model
    head = _head_names(model)
    if args.method == "lora":
        return _lora_model(loaded, args, head)
    for name, param in model.named_parameters():
        param.requires_grad = args.method == "full" or any(name.startswith(h + ".") for h in head)
    return model


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
    if modality == "image":
        return model(batch["pixel_values"])
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# -- memory ---------------------------------------------------------------------------------------
def measure_memory(model: nn.Module, batch: dict[str, torch.Tensor], modality: str) -> dict[str, Any]:
    """Bytes one training step keeps: saved activations (per sample) and gradients, all state restored.

    MeDyate models also report the papers' counted budget and the part of the selected channels.
    """
    from .measure import measure_training_step

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    batch_size = len(batch["labels"])
    if hasattr(model, "memory_report"):
        args = (inputs["pixel_values"],) if modality == "image" else ()
        report = model.memory_report(*args, compare_lean=False, **({} if modality == "image" else inputs))
        saved = report.measured_selected_saved_bytes + report.measured_frozen_path_saved_bytes
        return {
            "batch_size": batch_size,
            "budget_kb": report.budget_kb,
            "counted_kb": report.used_kb,
            "selected_activation_kb_per_sample": report.measured_selected_saved_bytes / batch_size / 1024,
            "selected_grad_kb": report.measured_weight_grad_bytes_used / 1024,
            "activation_kb_per_sample": saved / batch_size / 1024,
            "grad_kb": (report.measured_weight_grad_bytes_allocated + report.measured_head_grad_bytes) / 1024,
        }
    # the scalar memory_report back-propagates too
    by_module, grads = measure_training_step(lambda: _logits(model, batch, modality).float().sum(), model)
    return {
        "batch_size": batch_size,
        "activation_kb_per_sample": sum(by_module.values()) / batch_size / 1024,
        "grad_kb": sum(grads.values()) / 1024,
    }


# -- checkpoints ----------------------------------------------------------------------------------
def _resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in RESUME_KEYS + SCHEDULE_KEYS}


def _check_resume_settings(args: argparse.Namespace, checkpoint: Path, state: dict[str, Any]) -> str:
    """Refuse settings that would not continue the same training; describe allowed schedule changes ('' if none)."""
    saved = state["settings"]
    changed = {k: (saved.get(k), getattr(args, k)) for k in RESUME_KEYS if saved.get(k) != getattr(args, k)}
    if changed:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"--resume {checkpoint}: the run's settings differ ({details}); only {' and '.join(SCHEDULE_KEYS)} may "
            "change on --resume"
        )
    if args.epochs <= state["epoch"]:
        raise ValueError(f"--resume {checkpoint}: the checkpoint is after epoch {state['epoch']}, so --epochs "
                         f"{args.epochs} leaves nothing to train; pass a larger --epochs")
    rescheduled = {k: (saved.get(k), getattr(args, k)) for k in SCHEDULE_KEYS if saved.get(k) != getattr(args, k)}
    return ", ".join(f"{k} {b} (checkpoint: {a})" for k, (a, b) in rescheduled.items())


def _restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any], checkpoint: Path,
    medyate: bool,
) -> None:
    """Load a checked training state; anything that does not fit is one error naming the file."""
    path = checkpoint / STATE_FILE
    try:
        _, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise ValueError(f"weights for another model ({unexpected[:3]} ...)")
        if medyate:
            model.base_model.load_training_state_dict(state["medyate"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"--resume {path} does not fit this run: {type(err).__name__}: {err}") from err


def _reschedule(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """After loading a schedule: the new peak rate and length (the schedule's step count is kept)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    rates = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"], group["initial_lr"] = rate, lr
    scheduler._last_lr = rates


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters and the buffers (BatchNorm statistics); MeDyate's own state is saved apart."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers() if "medyate_" not in n})
    return {n: t for n, t in state.items() if "medyate_values" not in n}


def _selection_stats(model: nn.Module) -> dict[str, int]:
    tuner = model.base_model
    selection = tuner.selection()
    layers = tuner.medyate_layers()
    return {
        "channels_trained": sum(len(idx) for idx in selection.values()),
        "channels_total": sum(layer.in_channels for layer in layers.values()),
        "layers_trained": len(selection),
        "layers_total": len(layers),
    }


# -- recipe ---------------------------------------------------------------------------------------
def _check_recipe(args: argparse.Namespace) -> None:
    if args.clip_grad_norm < 0:
        raise ValueError(f"--clip-grad-norm must be >= 0 (0: no clipping), got {args.clip_grad_norm:g}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")


_NOT_AUGMENTATION = ("ToTensor", "MaybeToTensor", "Normalize")


def describe_augmentation(args: argparse.Namespace, loaded: Any) -> str:
    """The training transforms before tensor conversion, as torchvision / timm print them."""
    if loaded.modality != "image":
        return f"none (text: {args.max_length} tokens, padded)"
    transform = loaded.transform(True, crop_scale=args.crop_scale, hflip=args.hflip)
    steps = [t for t in transform.transforms if type(t).__name__ not in _NOT_AUGMENTATION]
    described = ", ".join(" ".join(repr(t).split()) for t in steps)
    return described + ("" if args.hflip else ", no horizontal flip")


def describe_recipe(args: argparse.Namespace, model: nn.Module, augmentation: str, processes: int) -> str:
    """Two lines saying what the run uses: method and optimisation, then the augmentation."""
    if args.method == "medyate":
        method = f"MeDyate, budget {args.budget_kb:g} kB per sample, strategy {args.strategy}"
    elif args.method == "lora":
        from peft.tuners.lora import LoraLayer

        layers = sum(isinstance(m, LoraLayer) for m in model.modules())
        rule = "--lora-r" if args.lora_r else f"matched to {args.budget_kb:g} kB"
        method = f"LoRA r={model.peft_config[model.active_adapter].r} ({rule}) on {layers} pointwise layers"
    else:
        method = {"full": "full fine-tuning", "head": "classifier only"}[args.method]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clip = f"gradient-norm clip {args.clip_grad_norm:g}" if args.clip_grad_norm else "no gradient clipping"
    return (
        f"recipe: {method}, {trainable:,} trainable values; SGD lr {args.lr:g} (no momentum, no weight decay), "
        f"cosine, {args.warmup_epochs:g} warm-up epochs, {args.epochs} epochs, batch {args.batch_size} x "
        f"{processes} process(es); {clip}; {torch.get_num_threads()} torch threads\n"
        f"augmentation: {augmentation}"
    )


# -- the run --------------------------------------------------------------------------------------
def _format_record(record: dict[str, Any], epochs: int) -> str:
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"lr {record['lr']:.4g}",
        f"loss {record['train_loss']:.4f}",
        f"acc {record['train_accuracy']:.2%}",
        f"eval loss {record['eval_loss']:.4f}",
        f"eval acc {record['eval_accuracy']:.2%}",
    ]
    if "channels_trained" in record:
        parts.append(
            f"channels {record['channels_trained']}/{record['channels_total']} in "
            f"{record['layers_trained']}/{record['layers_total']} layers"
        )
    mem = record["memory"]
    if "counted_kb" in mem:
        parts.append(
            f"memory: counted {mem['counted_kb']:.1f}/{mem['budget_kb']:.1f} kB, measured "
            f"{mem['selected_activation_kb_per_sample']:.1f} kB/sample act + {mem['selected_grad_kb']:.1f} kB grad "
            f"(whole step: {mem['activation_kb_per_sample']:.0f} kB/sample act, {mem['grad_kb']:.0f} kB grad)"
        )
    else:
        parts.append(
            f"memory: {mem['activation_kb_per_sample']:.0f} kB/sample act, {mem['grad_kb']:.0f} kB grad"
        )
    parts.append(f"{record['seconds']:.1f} s")
    return "  ".join(parts)


def load_data_and_model(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(data, loaded model, train set, eval set): the sets carry the model's own transforms or tokenizer."""
    from .data import image_batches, load_classification_data, text_batches
    from .models import load_model

    data = load_classification_data(
        args.dataset,
        train_split=args.train_split,
        eval_split=args.eval_split,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        image_column=args.image_column,
        text_column=args.text_column,
        label_column=args.label_column,
        seed=args.seed,
    )
    loaded = load_model(
        args.model,
        data.num_classes,
        weights=args.weights,
        pretrained=not args.random_init,
        image_size=args.image_size,
        max_length=args.max_length,
    )
    if loaded.modality != data.modality:
        raise ValueError(f"{args.model} is a {loaded.modality} model but {args.dataset} holds {data.modality} data")
    if data.modality == "image":
        augment = loaded.transform(True, crop_scale=args.crop_scale, hflip=args.hflip)
        train_set = data.train.with_transform(image_batches(data.input_column, data.label_column, augment))
        eval_set = data.eval.with_transform(image_batches(data.input_column, data.label_column, loaded.transform(False)))
    else:
        batches = text_batches(data.input_column, data.label_column, loaded.tokenizer, args.max_length)
        train_set, eval_set = data.train.with_transform(batches), data.eval.with_transform(batches)
    return data, loaded, train_set, eval_set


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
    """Cross-entropy of one batch of `load_data_and_model`'s sets."""
    return F.cross_entropy(_logits(model, batch, modality), batch["labels"])


def _loss_closure(model: nn.Module, batch: dict[str, torch.Tensor], modality: str) -> Callable[[], torch.Tensor]:
    return lambda: batch_loss(model, batch, modality)


def _recent_closure(model: nn.Module, recent: deque, modality: str) -> Callable[[], torch.Tensor]:
    """The oracles' full gradient from the last `full_gradient_batches` training batches, one per call."""
    batches = itertools.cycle(list(recent))
    return lambda: batch_loss(model, next(batches), modality)


def _plan(model: nn.Module, dataset: Any, batch_size: int, accelerator: Any, modality: str) -> None:
    """Plan before training when the strategy needs a dense gradient (a layer ranking to compute, an oracle).

    Uses one batch per process (the next `batch_size` rows after this rank's offset), so that the
    channels train from the first step and DDP sees the same trainable parameters at every step.
    """
    from torch.utils.data import default_collate

    tuner = model.base_model
    if tuner.is_planned(model.active_adapter):
        return
    start = accelerator.process_index * batch_size
    rows = [(start + i) % len(dataset) for i in range(batch_size)]
    batch = {k: v.to(accelerator.device) for k, v in default_collate(dataset.__getitems__(rows)).items()}
    tuner.plan(model.active_adapter, full_gradient=_loss_closure(model, batch, modality))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by `args` (see `add_train_arguments`); returns the run's results."""
    checkpoint = find_checkpoint(args.resume) if args.resume else None
    check_run_settings(args, checkpoint)
    with preflight.exclusive(Path(args.output_dir)):  # one run at a time per output folder
        return _train(args, checkpoint)


def _train(args: argparse.Namespace, checkpoint: Path | None) -> dict[str, Any]:
    import datasets
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    from .hub import push_adapter_to_hub
    from .progress import progress

    if args.push_to_hub and args.method != "medyate":
        raise ValueError("--push-to-hub uploads a MeDyate adapter; it needs --method medyate")
    _check_recipe(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    is_main = accelerator.is_main_process
    if not is_main:  # one copy of each library message, from the main process
        logging.getLogger("medyate_peft").setLevel(logging.ERROR)
    output_dir = Path(args.output_dir)
    state = load_training_state(checkpoint) if checkpoint else None
    rescheduled = _check_resume_settings(args, checkpoint, state) if state is not None else {}

    set_seed(args.seed)
    with accelerator.main_process_first():  # the first load converts the files into the datasets cache
        data, loaded, train_set, eval_set = load_data_and_model(args)
    model = build_trainable(loaded, args)
    augmentation = describe_augmentation(args, loaded)
    accelerator.print(describe_recipe(args, model, augmentation, accelerator.num_processes))
    if args.method == "medyate" and accelerator.scaler is not None:
        # fp16 with a GradScaler: overflowing steps are expected and skipped by the scaler, not errors
        model.peft_config[model.active_adapter].detect_anomalies = False
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=args.num_workers)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.0, weight_decay=0.0)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps = len(train_loader)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer.optimizer, round(args.warmup_epochs * steps), args.epochs * steps
    )  # stepped here, once per optimizer step (Accelerate's wrapper would step it once per process)
    unwrapped = accelerator.unwrap_model(model)
    medyate = args.method == "medyate"

    start_epoch, history = 0, []
    if state is not None:
        _restore(unwrapped, optimizer.optimizer, scheduler, state, checkpoint, medyate)
        if rescheduled:
            _reschedule(optimizer.optimizer, scheduler, args.lr)
            accelerator.print(f"resuming with {rescheduled}: the schedule is rebuilt for these values")
        start_epoch, history = state["epoch"], state["history"]
        accelerator.print(f"resumed from {checkpoint} after epoch {start_epoch}")
    preflight.check_labels(data.eval, data.label_column, data.num_classes, data.eval_split, "eval")
    preflight.check_labels(data.train, data.label_column, data.num_classes, args.train_split, "train")
    preflight.dry_evaluation(
        unwrapped, preflight.first_rows(eval_set, 2, accelerator.device), lambda b: _logits(unwrapped, b, data.modality)
    )
    if is_main:
        preflight.check_free_space(output_dir, preflight.checkpoint_bytes(unwrapped, optimizer.optimizer))
    if medyate and state is None:
        _plan(unwrapped, train_set, args.batch_size, accelerator, data.modality)
    elif medyate:
        unwrapped.peft_config[unwrapped.active_adapter].layer_ranking = state["layer_ranking"]

    card = {
        "dataset": data.name,
        "dataset_id": data.hub_id,
        "base_model_id": loaded.hub_id,
        "training": {
            "epochs": args.epochs,
            "batch size": f"{args.batch_size} per process x {accelerator.num_processes} processes",
            "optimizer": f"SGD (no momentum, no weight decay), lr {args.lr}, cosine with {args.warmup_epochs} warm-up epochs",
            "gradient clipping": f"global norm {args.clip_grad_norm:g}" if args.clip_grad_norm else "none",
            "augmentation": augmentation,
            "training samples": len(data.train),
            "evaluation": f"{len(data.eval)} samples of split {data.eval_split}",
            "input size": loaded.input_size,
        },
    }
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        set_seed(_epoch_seed(args.seed, epoch, accelerator.process_index))
        train_loader.set_epoch(epoch)
        stats = torch.zeros(3, dtype=wide_float(accelerator.device), device=accelerator.device)  # loss, correct, count
        record = {"epoch": epoch + 1}
        if medyate:
            record.update(_selection_stats(unwrapped))
        model.train()
        bar = progress(
            train_loader, desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=args.no_progress or not accelerator.is_local_main_process,
        )
        recent: deque = deque(maxlen=unwrapped.peft_config[unwrapped.active_adapter].full_gradient_batches
                              if medyate else 1)
        for step, batch in enumerate(bar):
            recent.append(batch)
            if step == 0 and is_main:
                record["memory"] = measure_memory(unwrapped, batch, data.modality)
            logits = _logits(model, batch, data.modality)
            loss = F.cross_entropy(logits, batch["labels"])
            accelerator.backward(loss)
            if args.clip_grad_norm:
                if accelerator.scaler is not None:  # clip the true gradients; scaler.step then skips overflows
                    accelerator.scaler.unscale_(optimizer.optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad_norm)
            record["lr"] = scheduler.get_last_lr()[0]  # the rate of this step; the epoch logs its last one
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if medyate and resample_due(args.resample_every, epoch * steps + step + 1):
                unwrapped.base_model.resample(
                    optimizer=optimizer.optimizer, full_gradient=_recent_closure(unwrapped, recent, data.modality)
                )
            n = len(batch["labels"])
            stats += torch.tensor(
                [loss.item() * n, (logits.argmax(-1) == batch["labels"]).sum().item(), n],
                dtype=wide_float(accelerator.device), device=accelerator.device,
            )
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if medyate and resample_due(args.resample_every):
            # Folds the trained values, syncs norms over ranks, re-draws (oracles: from the last batches' gradient).
            unwrapped.base_model.resample(
                optimizer=optimizer.optimizer, full_gradient=_recent_closure(unwrapped, recent, data.modality)
            )
        stats = accelerator.reduce(stats, reduction="sum")
        record["train_loss"] = float(stats[0] / stats[2])
        record["train_accuracy"] = float(stats[1] / stats[2])
        record["train_samples"] = int(stats[2])  # all processes together
        record.update(evaluate(accelerator, model, eval_loader, data.modality))
        record["seconds"] = time.time() - started
        history.append(record)
        if is_main:
            print(_format_record(record, args.epochs), flush=True)
        save_checkpoint(accelerator, unwrapped, optimizer, scheduler, args, history, card)
    metrics = _metrics(history)
    if is_main:
        with preflight.disk_full_explained(output_dir, "the final adapter and results"):
            _save_final(unwrapped, args, card, metrics, history, accelerator.num_processes, medyate)
        if args.push_to_hub:
            url = push_adapter_to_hub(unwrapped, args.push_to_hub, private=not args.hub_public, **card)
            accelerator.print(f"pushed to {url}")
    accelerator.wait_for_everyone()
    return {"metrics": metrics, "history": history, "output_dir": str(output_dir), "model": unwrapped}


def _save_final(
    model: nn.Module, args: argparse.Namespace, card: dict[str, Any], metrics: dict[str, float],
    history: list[dict[str, Any]], processes: int, medyate: bool,
) -> None:
    """`adapter/` (MeDyate) or `model/` (baselines) and `results.json`, each written atomically."""
    from .hub import write_model_card

    output_dir = Path(args.output_dir)
    if medyate:
        card.update(metrics=metrics, memory=history[-1]["memory"] if history else None)
        with atomic_directory(output_dir / "adapter") as tmp:
            model.save_pretrained(tmp, save_embedding_layers=False)
            write_model_card(model, tmp, **card)  # after save_pretrained, so PEFT's card is replaced
    elif args.method == "lora":
        with atomic_directory(output_dir / "adapter") as tmp:
            model.save_pretrained(tmp, save_embedding_layers=False)
    else:
        from safetensors.torch import save_file

        with atomic_directory(output_dir / "model") as tmp:
            save_file(trained_state(model), tmp / "model.safetensors")
    results = {"metrics": metrics, "history": history, "settings": _resume_settings(args), "processes": processes}
    atomic_write_json(results, output_dir / "results.json")


def _metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    if not history:
        return {}
    last = history[-1]
    return {key: round(last[key], 4) for key in ("eval_accuracy", "eval_loss", "train_loss", "train_accuracy")}


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, modality: str) -> dict[str, float]:
    """Accuracy and mean loss over the whole evaluation split (all processes' shards gathered)."""
    model.eval()
    losses, correct = [], []
    for batch in loader:
        logits = _logits(model, batch, modality)
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        loss, hit = accelerator.gather_for_metrics((loss, logits.argmax(-1) == batch["labels"]))
        losses.append(loss.cpu())
        correct.append(hit.cpu())
    loss, hit = torch.cat(losses), torch.cat(correct)
    return {"eval_loss": float(loss.mean()), "eval_accuracy": float(hit.float().mean())}


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    args: argparse.Namespace,
    history: list[dict[str, Any]],
    card: dict[str, Any],
) -> None:
    """`checkpoint-epochNNN/`: the adapter (MeDyate) and `training_state.pt`; older ones pruned."""
    from .hub import write_model_card

    if accelerator.is_main_process:
        epoch = history[-1]["epoch"]
        state = {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "settings": _resume_settings(args),
            "history": history,
            "model": trained_state(model),
            "optimizer": optimizer.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        output_dir = Path(args.output_dir)
        name = f"{CHECKPOINT_PREFIX}{epoch:03d}"
        with preflight.disk_full_explained(output_dir, name), atomic_directory(output_dir / name) as tmp:
            if args.method == "medyate":
                state["medyate"] = model.base_model.training_state_dict()
                state["layer_ranking"] = model.peft_config[model.active_adapter].layer_ranking
                model.save_pretrained(tmp, save_embedding_layers=False)  # no Hub config lookup
                write_model_card(model, tmp, **card, metrics=_metrics(history), memory=history[-1]["memory"])
            torch.save(state, tmp / STATE_FILE)  # inside the atomic folder
        rotate_checkpoints(output_dir, epoch, args.save_total_limit)
        atomic_write_json(history, output_dir / "log.json")
    accelerator.wait_for_everyone()


def end_processes() -> None:
    """Destroy the process group before the interpreter exits.

    DDP keeps the group alive in reference cycles; left to Python's shutdown, gloo's threads can
    outlive it and the process aborts ("terminate called without an active exception").
    """
    from accelerate import PartialState

    gc.collect()
    PartialState().destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train(args)
    end_processes()
    return 0
