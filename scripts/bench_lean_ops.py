"""What the lean backward's masks cost per activation on the CPU, against plain autograd and the alternatives tried.

    .venv/bin/python scripts/bench_lean_ops.py [--rounds 40] [--threads 1]

Where a sparse step is above 1.10x its floor on the MCU nets and MiniLM (results/speed.md), the
difference is the lean path's per-activation work. This times that work op by op, on activations of
the MCU nets' shapes (batch 32 at 128x128) and MiniLM's attention probabilities (batch 2, seq 128):

* ReLU6 forward: plain autograd computes the activation and keeps its output by reference; the lean
  path also computes the derivative's support (``hardtanh_backward`` on ones), casts it to bool and
  packs it into bits (`pack_bits`). Alternative tried: two comparisons for the support.
* ReLU6 backward: plain autograd's ``hardtanh_backward(grad, x)``; the lean path unpacks the bits into a
  0/1 float factor (one table lookup per byte, `unpack_factor`) and multiplies. Alternatives tried: a
  bool table and ``torch.where``, a uint8 or bf16 factor times the fp32 gradient.
* the whole of it: `MaskedActivation` forward + backward against autograd's hardtanh forward + backward.
* attention dropout: the lean attention reruns its core in backward and draws the dropout mask again
  (``bernoulli_`` from the forward's random state); keeping the mask as bits instead (pack + unpack) would
  cost the time shown and B*H*L^2/8 bytes per layer more memory, which the lean path does not spend.

Each variant is timed on its own thread's CPU time (median over rounds that visit every variant once,
in turn); bytes written per call come from a dispatch mode (fresh outputs and in-place targets).
Writes results/lean_ops.md, results/lean_ops.json and results/lean_ops.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402

from medyate_peft import lean  # noqa: E402
from medyate_peft.atomic import atomic_write, atomic_write_json  # noqa: E402
from medyate_peft.lean import pack_bits, unpack_factor  # noqa: E402

RESULTS = SCRIPTS.parent / "results"
ACTIVATIONS = [(32, 16, 64, 64), (32, 48, 32, 32), (32, 120, 16, 16), (32, 240, 8, 8)]  # MCU nets, batch 32
PROBABILITIES = (2, 12, 128, 128)  # MiniLM's attention probabilities, batch 2, seq 128
LO, HI = 0.0, 6.0


def relu6_variants(shape: tuple[int, ...]) -> dict[str, tuple[str, Callable[[], object]]]:
    """(group, op) per variant, on one activation of `shape`; every variant returns what its path would."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 4
    grad = torch.randn(shape, generator=g)
    ones = x.new_ones(()).expand_as(x)
    support = torch.ops.aten.hardtanh_backward(ones, x, LO, HI)
    mask = support.bool()
    packed = pack_bits(mask)
    tables = {dtype: lean._spread_table(x.device, dtype) for dtype in (torch.bool, torch.uint8, torch.bfloat16)}

    def factor(dtype: torch.dtype) -> torch.Tensor:
        return torch.index_select(tables[dtype], 0, packed.int()).view(-1)[: x.numel()].view(shape)

    leaf = x.clone().requires_grad_(True)

    def whole(lean_path: bool) -> Callable[[], object]:
        act = torch.nn.ReLU6()

        def run() -> object:  # the lean forward's own ReLU6 (`MaskedActivation`), or the module's
            y = lean._lean_masked(act, leaf) if lean_path else act(leaf)
            return torch.autograd.grad(y, leaf, grad)

        return run

    return {
        "plain: activation": ("forward", lambda: F.hardtanh(x, LO, HI)),
        "lean: + derivative support": ("forward", lambda: torch.ops.aten.hardtanh_backward(ones, x, LO, HI)),
        "lean: + to bool": ("forward", lambda: support.bool()),
        "lean: + pack_bits": ("forward", lambda: pack_bits(mask)),
        "alternative: support by two comparisons": ("forward", lambda: (x > LO).logical_and_(x < HI)),
        "plain: hardtanh_backward": ("backward", lambda: torch.ops.aten.hardtanh_backward(grad, x, LO, HI)),
        "lean: unpack_factor, multiply": ("backward", lambda: unpack_factor(packed, x.shape, grad.dtype).mul_(grad)),
        "alternative: bool table, torch.where": ("backward", lambda: torch.where(factor(torch.bool), grad, 0.0)),
        "alternative: uint8 factor * grad": ("backward", lambda: grad * factor(torch.uint8)),
        "alternative: bf16 factor * grad": ("backward", lambda: grad * factor(torch.bfloat16)),
        "plain: ReLU6 forward + backward": ("whole", whole(False)),
        "lean: MaskedActivation forward + backward": ("whole", whole(True)),
    }


def dropout_variants(shape: tuple[int, ...], p: float = 0.1) -> dict[str, tuple[str, Callable[[], object]]]:
    probs = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    keep = torch.empty_like(probs).bernoulli_(1 - p).bool()
    packed = pack_bits(keep)
    return {
        "lean: redraw the mask (bernoulli_)": ("dropout", lambda: torch.empty_like(probs).bernoulli_(1 - p)),
        "alternative: kept bits, pack": ("dropout", lambda: pack_bits(keep)),
        "alternative: kept bits, unpack": ("dropout", lambda: unpack_factor(packed, probs.shape, probs.dtype)),
    }


def time_variants(variants: dict[str, tuple[str, Callable[[], object]]], rounds: int) -> dict[str, float]:
    """Median thread CPU milliseconds per variant over `rounds` rounds visiting each once."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 2):  # two warm-up rounds
        for name, (_, fn) in variants.items():
            start = time.thread_time()
            fn()
            if round_ >= 2:
                times[name].append(time.thread_time() - start)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def bytes_written(fn: Callable[[], object]) -> int:
    with bench_common.OpWork() as counter:
        fn()
    return sum(calls_bytes[1] for calls_bytes in counter.work.values())


def measure(rounds: int) -> list[dict]:
    rows = []
    for shape, variants in [*((s, relu6_variants(s)) for s in ACTIVATIONS), (PROBABILITIES, dropout_variants(PROBABILITIES))]:
        ms = time_variants(variants, rounds)
        numel = torch.Size(shape).numel()
        for name, (group, fn) in variants.items():
            rows.append({"shape": list(shape), "elements": numel, "group": group, "variant": name, "ms": ms[name],
                         "bytes_per_element": bytes_written(fn) / numel})
        print(f"{shape}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in ms.items()), flush=True)
    return rows


def _reference(rows: list[dict], row: dict) -> float:
    """The plain path's time for the row's group and shape (the redraw for dropout)."""
    plain = {"forward": "plain: activation", "backward": "plain: hardtanh_backward",
             "whole": "plain: ReLU6 forward + backward", "dropout": "lean: redraw the mask (bernoulli_)"}[row["group"]]
    return next(r["ms"] for r in rows if r["shape"] == row["shape"] and r["variant"] == plain)


def plot(rows: list[dict], path: Path) -> None:
    """Stacked per-element time of ReLU6 forward + backward: plain autograd, and the lean path (which also
    computes the activation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacks = {"plain": ["plain: activation", "plain: hardtanh_backward"],
              "lean": ["plain: activation", "lean: + derivative support", "lean: + to bool", "lean: + pack_bits",
                       "lean: unpack_factor, multiply"]}
    colors = dict(zip(dict.fromkeys(stacks["plain"] + stacks["lean"]), plt.cm.tab10.colors, strict=False))
    shapes = [list(s) for s in ACTIVATIONS]
    fig, ax = plt.subplots(figsize=(8, 4))
    labelled: set[str] = set()
    for offset, stack in ((-0.2, stacks["plain"]), (0.2, stacks["lean"])):
        for i, shape in enumerate(shapes):
            bottom = 0.0
            for variant in stack:
                r = next(r for r in rows if r["shape"] == shape and r["variant"] == variant)
                height = r["ms"] / r["elements"] * 1e6
                ax.bar(i + offset, height, 0.38, bottom=bottom, color=colors[variant],
                       label=None if variant in labelled else variant)
                labelled.add(variant)
                bottom += height
    ax.set_xticks(range(len(shapes)), ["x".join(map(str, s)) for s in shapes])
    ax.set_ylabel("ms per million elements (CPU, 1 thread)")
    ax.set_title("ReLU6 forward + backward: plain autograd (left bars), the lean path (right bars)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "# The lean backward's masks, op by op (CPU)", "",
        f"    python scripts/bench_lean_ops.py --rounds {args.rounds} --threads {args.threads}", "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), load "
        f"{os.getloadavg()[0]:.1f} at the end; {args.allocator or 'the system allocator as it is'}. "
        f"Thread CPU time, median over {args.rounds} rounds that visit every "
        "variant once; *x plain*: against the plain path's op of the same group and shape (dropout: against the "
        "redraw); bytes written per element from a dispatch mode. What each variant is: the module docstring.", "",
        "| shape | group | variant | ms | x plain | bytes written / element |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['group']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['ms'] / _reference(rows, r):.2f} | {r['bytes_per_element']:.2f} |")
    lines += ["", "![per element](lean_ops.png)", ""]
    with atomic_write(RESULTS / "lean_ops.md") as handle:
        handle.write("\n".join(lines))
    atomic_write_json(rows, RESULTS / "lean_ops.json", indent=1)
    plot(rows, RESULTS / "lean_ops.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the speed table uses 1)")
    args = parser.parse_args()
    args.allocator = bench_common.keep_freed_memory()  # fresh memory's page faults would swamp single ops
    torch.set_num_threads(args.threads)
    write(measure(args.rounds), args)


if __name__ == "__main__":
    main()
