"""The `medyate` command: plan a budget, rank layers, inspect a saved adapter, train.

    medyate plan --model mcunet-5fps --budget-kb 64          # per-layer costs and the channels drawn
    medyate rank --model mcunet-5fps --dataset caltech101 --output ranking.json   # LaRa / RGN, once
    medyate inspect runs/cifar10/adapter                       # what a saved adapter holds
    medyate train --model mcunet-5fps --dataset cifar10 ...    # = scripts/train.py
    accelerate launch --num_processes 2 -m medyate_peft.cli train ...

Errors a user can fix (unknown model, missing file, budget below one channel) exit with status 2
and one line saying what to change.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .train import add_model_and_data_arguments, add_train_arguments

PLAN_STRATEGY = "full_random"  # the default strategy that needs no layer ranking


def _add_plan(sub: Any) -> None:
    parser = sub.add_parser("plan", help="per-layer memory table and the selected layers, without training")
    parser.add_argument("--model", required=True, help="mcu:<name>, tf_efficientnet_lite0, a timm name, hf:<name>")
    parser.add_argument("--budget-kb", type=float, required=True, help="training-memory budget per sample, kB")
    parser.add_argument(
        "--input-size", type=int, nargs="+", help="one sample's shape, e.g. 3 128 128, or 128 tokens (default: the model's)"
    )
    parser.add_argument("--num-classes", type=int, help="classifier size (default: keep the pretrained head)")
    parser.add_argument("--strategy", default=PLAN_STRATEGY, help=f"channel-selection strategy (default {PLAN_STRATEGY})")
    parser.add_argument("--layer-ranking", help="JSON layer ranking, for the medyate / trady strategies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lara-within-rgn", action="store_true",
                        help="LaRa pools: the alpha rule inside the RGN-97%% layer set (MeDyateConfig.lara_within_rgn)")
    parser.add_argument("--max-activation-share", type=float,
                        help="ranked pools: cap on the pool's stored-activation share (MeDyateConfig.max_activation_share)")
    parser.add_argument("--measure", action="store_true", help="also measure one training step on a zero batch")
    parser.set_defaults(func=plan_command)


def _add_rank(sub: Any) -> None:
    parser = sub.add_parser(
        "rank", help="LaRa / RGN layer ranking from a short dense fine-tuning, for --layer-ranking (medyate, trady)"
    )
    add_model_and_data_arguments(parser)
    parser.add_argument("--output", required=True, help="JSON file to write (atomically)")
    parser.add_argument("--steps", type=int, default=100, help="dense SGD steps of the preliminary run (default 100); "
                        "with --budget-kb, at least this many batches, in whole rotations through the channels")
    parser.add_argument("--budget-kb", type=float, default=None,
                        help="rank within this budget: each batch measures a budget-sized slice of channels through "
                        "the channel-sparse backward (only the classifier trains); default: dense")
    parser.add_argument("--lr", type=float, default=0.01, help="its learning rate; 0 measures the pretrained weights")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="training subset and batch order")
    parser.add_argument("--cpu", action="store_true", help="rank on CPU even when a GPU is present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=rank_command)


def _add_inspect(sub: Any) -> None:
    parser = sub.add_parser("inspect", help="summarise a saved adapter: layers, channels, size, budget")
    parser.add_argument("path", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.set_defaults(func=inspect_command)


def _add_train(sub: Any) -> None:
    parser = sub.add_parser("train", help="fine-tune under a memory budget (Accelerate: 1..N processes)")
    add_train_arguments(parser)
    parser.set_defaults(func=train_command)


def _build_plan_model(args: argparse.Namespace) -> tuple[Any, str]:
    from peft import get_peft_model

    from . import MeDyateConfig
    from .models import load_model
    from .strategies import get_strategy

    get_strategy(args.strategy)
    kwargs: dict[str, Any] = {"pretrained": False}  # shapes only: no download
    if args.input_size and len(args.input_size) == 1:
        kwargs["max_length"] = args.input_size[0]
    elif args.input_size:
        kwargs["image_size"] = args.input_size[-1]
    loaded = load_model(args.model, args.num_classes, **kwargs)
    input_size = args.input_size or loaded.input_size
    config = MeDyateConfig(
        budget_kb=args.budget_kb,
        input_size=input_size,
        strategy=args.strategy,
        seed=args.seed,
        layer_ranking=args.layer_ranking,
        lara_within_rgn=args.lara_within_rgn,
        max_activation_share=args.max_activation_share,
    )
    peft_model = get_peft_model(loaded.model, config)
    if not peft_model.base_model.is_planned(peft_model.active_adapter):
        raise ValueError(
            f"strategy {args.strategy!r} picks its layers from a layer ranking (or a full gradient): pass "
            "--layer-ranking FILE (medyate_peft.rank_layers), or plan with --strategy full_random / static_random"
        )
    return peft_model, f"{loaded.spec}, input {list(input_size)}"


def plan_command(args: argparse.Namespace) -> int:
    from .budget import slots_to_kb
    from .pools import summarize_pool

    peft_model, described = _build_plan_model(args)
    tuner = peft_model.base_model
    plan = tuner.plans[peft_model.active_adapter]
    costs = tuner.layer_costs()
    pool = {c.name for c in plan.pool.costs}
    selection = tuner.selection()
    per_slot = peft_model.peft_config[peft_model.active_adapter].bytes_per_slot
    full = sum(c.layer_slots for c in costs)
    print(f"{described}, strategy {args.strategy}, seed {args.seed}")
    print(
        f"budget {args.budget_kb:g} kB = {plan.budget:,} slots of {per_slot} bytes per sample; full fine-tuning of "
        f"the {len(costs)} candidate layers counts {slots_to_kb(full, per_slot):,.1f} kB ({full:,} slots): "
        f"budget = {plan.budget / full:.2%} of it"
    )
    print()
    name_width = max(len("layer"), *(len(c.name) for c in costs))
    print(
        f"{'layer':<{name_width}} {'type':<6} {'in ch':>6} {'C^W':>6} {'C^A':>6} {'slots/ch':>8} "
        f"{'layer kB':>9} {'pool':>4} {'selected':>8}"
    )
    used = 0
    for cost in costs:
        chosen = len(selection.get(cost.name, ()))
        used += chosen * cost.channel_slots
        kind = f"{cost.kind}{'-dw' if cost.groups > 1 and cost.groups == cost.in_channels else ''}"
        print(
            f"{cost.name:<{name_width}} {kind:<6} {cost.in_channels:>6} {cost.weight_slots:>6} "
            f"{cost.activation_slots:>6} {cost.channel_slots:>8} {slots_to_kb(cost.layer_slots, per_slot):>9.1f} "
            f"{'yes' if cost.name in pool else '-':>4} {chosen if chosen else '-':>8}"
        )
    channels = sum(len(idx) for idx in selection.values())
    total = sum(c.in_channels for c in costs)
    print()
    print(
        f"selected: {channels:,} of {total:,} input channels in {len(selection)} of {len(costs)} layers, "
        f"{used:,} of {plan.budget:,} slots ({slots_to_kb(used, per_slot):.1f} kB); re-drawn every epoch "
        "when the strategy is dynamic"
    )
    print(summarize_pool(plan.pool.costs, costs).describe())
    if args.measure:
        report = peft_model.memory_report(compare_lean=False)
        print(
            f"measured (one step, batch {report.batch_size}, zero input): saved activations of the selected "
            f"channels {report.measured_selected_saved_bytes / 1024:.1f} kB, their weight gradients "
            f"{report.measured_weight_grad_bytes_used / 1024:.1f} kB; beside the budget: frozen-path activations "
            f"{report.measured_frozen_path_saved_bytes / 1024:.1f} kB, head gradients "
            f"{report.measured_head_grad_bytes / 1024:.1f} kB"
        )
    return 0


def rank_command(args: argparse.Namespace) -> int:
    """The papers' preliminary run: dense SGD on a dataset (any, not necessarily the target), cumulated norms."""
    from functools import partial

    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from .ranking import rank_layers, save_ranking
    from .train import batch_loss, load_data_and_model

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    set_seed(args.seed)  # torch, numpy and `random` (timm's augmentations draw from it)
    data, loaded, train_set, _ = load_data_and_model(args)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed))
    ranking = rank_layers(
        loaded.model.to(device), loader, steps=args.steps, lr=args.lr, progress=not args.no_progress,
        loss_fn=partial(batch_loss, modality=data.modality), budget_kb=args.budget_kb,
    )
    within = "" if args.budget_kb is None else f" --budget-kb {args.budget_kb:g}"
    ranking["source"] = (f"medyate rank --model {loaded.spec} --dataset {data.name} --steps {args.steps} "
                         f"--lr {args.lr:g} --batch-size {args.batch_size} --seed {args.seed}{within}")
    path = save_ranking(ranking, args.output)
    top = sorted(ranking["lara"], key=ranking["lara"].get, reverse=True)
    width = max(len("layer"), *(len(name) for name in top[:10]))
    how = f"{args.steps} dense steps" if args.budget_kb is None else f"within {args.budget_kb:g} kB"
    print(f"{loaded.spec} on {data.name} ({len(data.train):,} samples), {how}: "
          f"{len(top)} layers ranked, written to {path}")
    print(f"{'layer':<{width}} {'LaRa':>10} {'RGN':>10}")
    for name in top[:10]:
        print(f"{name:<{width}} {ranking['lara'][name]:>10.3g} {ranking['rgn'][name]:>10.3g}")
    print(f"use it: medyate train ... --layer-ranking {path}  or  MeDyateConfig(layer_ranking={str(path)!r})")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from huggingface_hub import ModelCard

    from .hub import CARD_FILE, summarize_dir

    summary = summarize_dir(args.path)
    slots = summary.budget_slots
    delta_values = sum(layer.delta_values for layer in summary.layers)
    print(f"MeDyate adapter in {args.path}")
    print(f"  base model:  {summary.base_model or 'unknown'}")
    print(f"  strategy:    {summary.strategy} (seed {summary.seed})")
    print(f"  budget:      {summary.budget_kb:g} kB per sample ({slots:,} slots of {summary.bytes_per_slot} bytes)")
    updated = f"{summary.channels_updated:,} input channels in {len(summary.layers)} layers"
    if summary.channels_total:
        share = summary.channels_updated / summary.channels_total
        updated += f" (of {summary.channels_total:,} in {summary.layers_total} candidate layers: {share:.1%})"
    print(f"  updated:     {updated}")
    print(
        f"  stored:      {delta_values:,} delta values + {summary.head_values:,} head values "
        f"({', '.join(summary.head) or 'no head'}); weights file {summary.file_bytes / 1024:.1f} kB"
    )
    card_file = Path(args.path) / CARD_FILE
    if card_file.is_file():
        data = ModelCard.load(card_file).data
        for result in data.eval_results or []:
            print(f"  evaluation:  {result.metric_type} {result.metric_value:.4g} on {result.dataset_name}")
        memory = (data.to_dict().get("medyate") or {}).get("memory")
        if memory and "selected_activation_kb_per_sample" in memory:
            print(
                f"  memory:      measured {memory['selected_activation_kb_per_sample']:.1f} kB/sample activations + "
                f"{memory['selected_grad_kb']:.1f} kB gradients of the selected channels "
                f"(whole step {memory['activation_kb_per_sample']:.0f} kB/sample, {memory['grad_kb']:.0f} kB)"
            )
    if summary.layers:
        width = max(len("layer"), *(len(layer.name) for layer in summary.layers))
        print()
        print(f"{'layer':<{width}} {'channels':>10} {'delta values':>13}")
        for layer in summary.layers:
            channels = f"{layer.channels}/{layer.in_channels}" if layer.in_channels else str(layer.channels)
            print(f"{layer.name:<{width}} {channels:>10} {layer.delta_values:>13,}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from .train import end_processes, train

    train(args)
    end_processes()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medyate", description="Memory-budgeted sparse fine-tuning (MeDyate).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{plan,rank,inspect,train}")
    _add_plan(sub)
    _add_rank(sub)
    _add_inspect(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        print(f"medyate {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
