"""Demo: MeDyate against full fine-tuning, classifier-only training and LoRA, offline, on CIFAR-10 images.

    python scripts/demo.py                          # no network; 2.5-4.5 min on 2 idle cores (README)
    python scripts/demo.py --data uoft-cs/cifar10 --train-samples 5000 --epochs 5   # the Hub's CIFAR-10
    python scripts/demo.py > demo.log               # plain lines (no progress bar) when not a terminal

MCUNet (mcunet-5fps, Lin et al.'s ImageNet int8 weights, dequantised, embedded in the package) at
128x128, as in the papers. Without --data it trains on the class-balanced CIFAR-10 subset in
scripts/demo_data/cifar10 (2,000 training / 1,000 test images). The default budget is the smallest
of the papers for this network (15,936 slots = 62.25 kB). Each method trains with the same data,
schedule, seed and learning rate through `medyate_peft.train`; memory is measured on one training
step (what autograd saves, and the gradients). The learning rate is 0.02, not the papers' 0.125: at
0.125 (and at 0.05) full fine-tuning of these fp32, BatchNorm-free networks diverges. Three epochs
on 2,000 images are far from the papers' 100-epoch schedule; full fine-tuning in particular is not
converged here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

EMBEDDED_DATA = Path(__file__).resolve().parent / "demo_data" / "cifar10"
LABELS = {"medyate": "MeDyate", "full": "full fine-tuning", "head": "classifier only", "lora": "LoRA"}
PLOT_FILE = "demo.png"


def parse_demo_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", help=f"a Hub dataset name (e.g. uoft-cs/cifar10) or a local folder (default: {EMBEDDED_DATA})"
    )
    parser.add_argument("--model", default="mcu:mcunet-5fps")
    parser.add_argument("--budget-kb", type=float, default=62.25)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--methods", nargs="+", choices=list(LABELS), default=list(LABELS))
    parser.add_argument("--output-dir", help="keep the runs and the plot here (default: a new temporary folder)")
    return parser.parse_args(argv)


def trained_values(method: str, model: torch.nn.Module) -> int:
    """Values a saved result holds: MeDyate's non-zero channel deltas + head, else the trainable parameters."""
    if method == "medyate":
        from medyate_peft.hub import summarize_model

        summary = summarize_model(model)
        return sum(layer.delta_values for layer in summary.layers) + summary.head_values
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def label(method: str, budget_kb: float) -> str:
    return LABELS[method] + (f" {budget_kb:g} kB" if method == "medyate" else "")


def save_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Test accuracy and measured memory (saved activations per sample, gradients) per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["label"] for row in rows]
    fig, (acc_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = acc_ax.barh(names, [100 * row["accuracy"] for row in rows], color="tab:blue")
    acc_ax.bar_label(bars, fmt="%.1f %%", padding=3)
    acc_ax.set_xlabel("test accuracy (%)")
    acc_ax.set_xlim(0, 100)
    acc_ax.invert_yaxis()
    y = range(len(rows))
    height = 0.38
    act = mem_ax.barh([i - height / 2 for i in y], [row["activation_kb"] for row in rows], height,
                      label="saved activations, kB per sample", color="tab:orange")
    grad = mem_ax.barh([i + height / 2 for i in y], [row["grad_kb"] for row in rows], height,
                       label="weight gradients, kB", color="tab:green")
    mem_ax.bar_label(act, fmt="%.1f", padding=3, fontsize=8)
    mem_ax.bar_label(grad, fmt="%.1f", padding=3, fontsize=8)
    values = [v for row in rows for v in (row["activation_kb"], row["grad_kb"]) if v > 0]
    mem_ax.set_xscale("log")
    mem_ax.set_xlim(min(values) / 3, max(values) * 10)  # room for the labels
    mem_ax.set_yticks(list(y), [""] * len(rows))
    mem_ax.set_xlabel("measured on one training step (kB, log scale)")
    mem_ax.invert_yaxis()
    mem_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':<18} {'test acc':>8} {'trained values':>14} {'activations kB/sample':>21} "
          f"{'gradients kB':>12} {'time s':>7}")
    for row in rows:
        print(f"{row['label']:<18} {row['accuracy']:>8.2%} {row['values']:>14,} {row['activation_kb']:>21,.1f} "
              f"{row['grad_kb']:>12,.1f} {row['seconds']:>7.0f}")


def run_method(train: Any, parse_args: Any, argv: list[str]) -> dict[str, Any]:
    """One `medyate train` run; a problem the user can fix (data not found, offline) ends the demo in one line."""
    try:
        return train(parse_args(argv))
    except (ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        sys.exit(f"demo: error: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_demo_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # epoch lines reach a log file as they are printed
    data = args.data or str(EMBEDDED_DATA)
    if Path(data).exists() or args.data is None:  # local data: no Hub lookups (offline), else ~45 s of retries
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.data is None and not (EMBEDDED_DATA / "train.parquet").is_file():
        sys.exit(f"demo: the embedded demo data is missing ({EMBEDDED_DATA}/train.parquet); pass --data")
    from medyate_peft.train import parse_args, train  # after the offline switches: they are read at import

    output = Path(args.output_dir or tempfile.mkdtemp(prefix="medyate-demo-"))
    output.mkdir(parents=True, exist_ok=True)
    source = "embedded class-balanced CIFAR-10 subset" if args.data is None else "CIFAR-10"
    print(f"{args.model} on {source} ({data}): up to {args.train_samples:,} training / {args.eval_samples:,} test "
          f"images, {args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr:g} cosine, "
          f"{torch.get_num_threads()} threads\n")
    progress = [] if sys.stderr.isatty() else ["--no-progress"]
    rows = []
    for method in args.methods:
        print(f"== {LABELS[method]}")
        started = time.time()
        result = run_method(train, parse_args, [
            "--model", args.model, "--dataset", data, "--method", method,
            "--budget-kb", str(args.budget_kb), "--max-train-samples", str(args.train_samples),
            "--max-eval-samples", str(args.eval_samples), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-epochs", "0.5",
            "--output-dir", str(output / method), *progress,
        ])
        memory = result["history"][-1]["memory"]
        rows.append({
            "method": method, "label": label(method, args.budget_kb), "memory": memory,
            "accuracy": result["metrics"]["eval_accuracy"], "values": trained_values(method, result["model"]),
            "activation_kb": memory["activation_kb_per_sample"], "grad_kb": memory["grad_kb"],
            "seconds": time.time() - started,
        })
        print()
    print_table(rows)
    for row in rows:
        if row["method"] == "medyate":
            memory = row["memory"]
            print(
                f"\nMeDyate's budget ({memory['budget_kb']:.2f} kB per sample, papers' accounting): the selected channels "
                f"count {memory['counted_kb']:.2f} kB; measured {memory['selected_activation_kb_per_sample']:.1f} kB/sample "
                f"of their saved activations + {memory['selected_grad_kb']:.1f} kB of their weight gradients.\n"
                "The activation column also holds what back-propagation through the frozen layers keeps, "
                "which the papers' budget does not count."
            )
    print(
        f"\n{args.epochs} epochs on {args.train_samples:,} images are a demo, not the papers' 100-epoch recipe: full "
        "fine-tuning (its upper bound there) is far from converged here."
    )
    title = f"{args.model}, {source}, {args.epochs} epochs, lr {args.lr:g}"
    try:
        plot = save_plot(rows, output / PLOT_FILE, title)
        print(f"plot (accuracy and measured memory per method): {plot}")
    except ImportError:
        print("plot not written: matplotlib is not installed (pip install matplotlib)")
    print(f"runs (adapter or model, checkpoints, results.json) in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
