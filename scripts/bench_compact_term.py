"""Step time of MeDyate's compact term against the kept effective weight it replaced, on transformers.

    .venv/bin/python scripts/bench_compact_term.py [--networks NAME ...] [--rounds 7]

The same MeDyate model (bench_lean_transformers' settings: `full_random`, 2048 kB, batch 4, sequence 128)
twice: Linear layers with the compact term (the default) and with the kept effective weight
(`compact_fraction = 0`, the earlier behaviour). Whole AdamW steps, the two interleaved in rounds in one
process (times on a shared machine are noisy: the per-round ratio's median is reported). Writes
results/compact_term.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_lean_transformers import NETWORKS, _build, _loss

from medyate_peft.medyate.layer import Linear

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _stepper(network: str, compact: bool, batch: dict[str, torch.Tensor], seq: int):
    model = _build(network, "MeDyate", 2048, seq)
    model.train()
    if not compact:
        for layer in model.base_model.medyate_layers().values():
            if isinstance(layer, Linear):
                layer.compact_fraction = 0.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        optimizer.step()
        return time.perf_counter() - start

    step()
    step()  # optimizer state made; the kept weights built
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="*", default=["all-MiniLM-L6-v2"], choices=list(NETWORKS))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MEDYATE_BENCH_THREADS", "1")))
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 30000, (4, 128), generator=generator),
             "labels": torch.randint(0, 2, (4,), generator=generator)}
    command = " ".join([".venv/bin/python", "scripts/bench_compact_term.py", *map(shlex.quote, sys.argv[1:])])
    lines = ["# Step time: compact term vs kept effective weight (MeDyate, Linear layers)", "",
             f"Command: `{command}`", "",
             f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU, fp32; batch 4, sequence 128, "
             f"budget 2048 kB, `full_random`; whole AdamW steps, {args.rounds} interleaved rounds in one process.",
             "", "| network | kept weight s/step | compact s/step | compact / kept (median of rounds) |",
             "|---|---:|---:|---:|"]
    for network in args.networks:
        steppers = {"kept": _stepper(network, False, batch, 128), "compact": _stepper(network, True, batch, 128)}
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for _ in range(args.rounds):
            for name, step in steppers.items():
                times[name].append(step())
        ratio = statistics.median(c / k for c, k in zip(times["compact"], times["kept"], strict=True))
        kept, compact = statistics.median(times["kept"]), statistics.median(times["compact"])
        print(network, f"kept {kept:.3f} s, compact {compact:.3f} s, ratio {ratio:.3f}", flush=True)
        lines.append(f"| {network} | {kept:.3f} | {compact:.3f} | {ratio:.3f} |")
    (RESULTS / "compact_term.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
