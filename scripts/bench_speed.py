"""Training-step time of every method, measured side by side in one process (interleaved rounds).

    .venv/bin/python scripts/bench_speed.py scripts/bench_configs/vision.yaml --rounds 20

The benchmark's per-run step times come from separate processes at different moments of a shared
machine; this script times the methods of each network on the same real batch, in one process, in
rounds that visit every method once in a shuffled order, so that a load change hits all of them.
Writes results/speed.md and results/speed.json: median step time per method and its ratio to full
fine-tuning's median (and the spread of the per-round ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402  (also registers the MEDYATE peft type)
from benchmark import RANKINGS, RESULTS  # noqa: E402

from medyate_peft.atomic import atomic_write, atomic_write_json  # noqa: E402
from medyate_peft.lean import lean_backward  # noqa: E402

METHODS = ("full", "classifier", "lora", "static_random", "trady", "medyate")


def setups_for(cell: dict, config: dict, task: bench_common.Task, base: torch.nn.Module) -> dict[str, tuple]:
    """(label -> (setup, optimizer)) for every method of the cell, each on its own copy of the base model."""
    source = config["ranking_dataset"][cell["dataset"]]
    ranking = RANKINGS / f"{cell['network']}__{source}.json"
    out = {}
    for method in METHODS:
        budgets = cell["budgets"] if method in bench_common.MEDYATE_METHODS else [None]
        for budget in budgets:
            if method in ("trady", "medyate") and not ranking.exists():
                continue
            spec = {"method": method, "budget_slots": budget, "seed": 0, "lora_weight_slots": max(cell["budgets"]),
                    "ranking_path": str(ranking) if method in ("trady", "medyate") else None}
            setup = bench_common.setup_method(spec, copy.deepcopy(base), task)
            optimizer = torch.optim.SGD(setup.params, lr=1e-3)
            label = method if budget is None else f"{method}@{budget}"
            out[label] = (setup, optimizer, True)
            if method in bench_common.MEDYATE_METHODS:  # the same model, stepped with plain autograd's frozen path
                out[f"{label} lean off"] = (setup, optimizer, False)
    return out


def time_step(setup: bench_common.Setup, optimizer: torch.optim.Optimizer, lean: bool, batch, clip: float) -> float:
    setup.train_mode()
    with contextlib.nullcontext() if lean else lean_backward(setup.model, False):
        t = time.perf_counter()
        loss = bench_common.loss_of(setup.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.params, clip)
        optimizer.step()
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a vision suite config (its cells' networks and budgets)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (after 3 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark runs use 1)")
    parser.add_argument("--dataset", default="cifar10", help="cells of this dataset only")
    parser.add_argument("--networks", nargs="+", help="only these networks (default: every cell's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    recipe = config["recipe"]
    rows = []
    cells = [c for c in config["cells"] if c["dataset"] == args.dataset
             and (args.networks is None or c["network"] in args.networks)]
    for cell in cells:
        torch.manual_seed(0)
        base, _ = bench_common.load_network(cell["network"], bench_common.num_classes(cell["dataset"]))
        task = bench_common.load_task(cell["dataset"], {**recipe, "eval_size": recipe["batch_size"]},
                                      train_size=recipe["batch_size"])
        batch = task.measure_batch(recipe["batch_size"])
        setups = setups_for(cell, config, task, base)
        times: dict[str, list[float]] = {label: [] for label in setups}
        order = list(setups)
        rng = random.Random(0)
        for round_ in range(args.rounds + 3):
            rng.shuffle(order)
            for label in order:
                elapsed = time_step(*setups[label], batch, recipe["clip_grad_norm"])
                if round_ >= 3:
                    times[label].append(elapsed)
        full = times["full"]
        for label, ts in times.items():
            ratios = sorted(t / f for t, f in zip(ts, full, strict=True))
            row = {"network": cell["network"], "dataset": cell["dataset"], "method": label,
                   "median_ms": 1000 * statistics.median(ts), "ratio_to_full": statistics.median(ts) /
                   statistics.median(full), "round_ratio_p25": ratios[len(ratios) // 4],
                   "round_ratio_p75": ratios[(3 * len(ratios)) // 4], "rounds": len(ts)}
            rows.append(row)
            print(f"{cell['network']:<20} {label:<30} {row['median_ms']:8.1f} ms  x{row['ratio_to_full']:.2f}",
                  flush=True)
    lines = [
        "# Step time side by side (one process, interleaved rounds)", "",
        f"Command: `python scripts/bench_speed.py {' '.join(sys.argv[1:])}` ({args.threads} torch thread(s)); "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, batch {recipe['batch_size']}, "
        f"{recipe['image_size']}x{recipe['image_size']}, one real {args.dataset} batch; each round times one "
        "training step (forward, backward, clip, SGD step) of every method in a shuffled order; 3 warm-up "
        "rounds dropped. *lean off*: the same model's step with plain autograd through the frozen path "
        "(`lean_backward` off: more saved activations, fewer passes).", "",
        "| network | method | median step ms | / full FT (of medians) | per-round ratio p25-p75 |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['network']} | {r['method']} | {r['median_ms']:.1f} | {r['ratio_to_full']:.2f} | "
                     f"{r['round_ratio_p25']:.2f}-{r['round_ratio_p75']:.2f} |")
    with atomic_write(RESULTS / "speed.md") as handle:
        handle.write("\n".join(lines) + "\n")
    atomic_write_json(rows, RESULTS / "speed.json", indent=1)


if __name__ == "__main__":
    main()
