"""A small pilot: does a cost-aware MeDyate variant stop getting worse with more memory?

    .venv/bin/python scripts/pilot_cost_aware.py --max-minutes 4     # resumable; repeat until done

MbV2-w0.35 (int8 graph, dequantised) on CIFAR-10 with the vision benchmark's recipe
(`scripts/bench_configs/vision.yaml`), two budgets (the smallest and the largest), two seeds,
three methods: TraDy, MeDyate as in the paper, and MeDyate with the cost-aware options below.
Runs of TraDy and paper MeDyate that the benchmark already recorded (`results/runs/`, seeds 0-1,
same recipe, same code path) are reused; the variant's are recorded in `results/pilot_cost_aware/`.
Writes `results/pilot_cost_aware.md`. A pilot, not the benchmark: 2 seeds, 2,000 test images.
"""

from __future__ import annotations

import argparse
import json
import statistics

import benchmark
from scipy import stats

NETWORK, DATASET, BUDGETS, SEEDS = "mbv2-w0.35", "cifar10", (27_946, 93_696), (0, 1)
VARIANT = "medyate-ca"
VARIANT_OPTIONS = {"lara_within_rgn": True, "draw_weights": "norm_per_cost", "rescale_norms": True}
METHODS = ("trady", "medyate", VARIANT)
PILOT_RUNS = benchmark.RESULTS / "pilot_cost_aware"
REPORT = benchmark.RESULTS / "pilot_cost_aware.md"
COMMAND = ".venv/bin/python scripts/pilot_cost_aware.py --max-minutes 4"
NOTES = ("<!-- notes -->", "<!-- /notes -->")


def specs() -> list[dict]:
    config = benchmark.load_config(benchmark.SCRIPTS / "bench_configs" / "vision.yaml")
    base = {s["id"]: s for s in benchmark.grid(config)}
    out = []
    for seed in SEEDS:
        for method in METHODS:
            for budget in BUDGETS:
                plain = dict(base[benchmark.run_id({"suite": "vision", "network": NETWORK, "dataset": DATASET,
                                                    "method": "medyate" if method == VARIANT else method,
                                                    "budget_slots": budget, "seed": 0})])
                plain["seed"] = seed
                plain["id"] = benchmark.run_id(plain)
                if method == VARIANT:
                    plain["medyate_options"] = VARIANT_OPTIONS
                    plain["id"] = plain["id"].replace("__medyate__", f"__{VARIANT}__")
                out.append(plain)
    return out


def record_of(spec: dict) -> dict | None:
    """The recorded run of `spec`: the benchmark's own (same recipe) for plain methods, else the pilot's."""
    for folder in (benchmark.RUNS, PILOT_RUNS):
        path = folder / f"{spec['id']}.json"
        if path.exists():
            record = json.loads(path.read_text())
            if record["recipe"] != spec["recipe"]:
                raise ValueError(f"{path}: recorded with another recipe; delete it to re-run")
            return record
    return None


def interval(values: list[float]) -> str:
    """mean ± half-width of the 95 % t-interval, in percentage points."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{100 * mean:.2f} (n=1)"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{100 * mean:.2f} ± {100 * half:.2f} (n={len(values)})"


def report(all_specs: list[dict]) -> str:
    records = {s["id"]: record_of(s) for s in all_specs}
    top1: dict[tuple[str, int], dict[int, float]] = {}
    share: dict[tuple[str, int], list[float]] = {}
    for spec in all_specs:
        record = records[spec["id"]]
        if record is None:
            continue
        method = VARIANT if spec.get("medyate_options") else spec["method"]
        top1.setdefault((method, spec["budget_slots"]), {})[spec["seed"]] = record["top1"]
        weights = record.get("weight_grad_bytes_used")
        if weights is not None:
            share.setdefault((method, spec["budget_slots"]), []).append(weights / 4)
    lines = [
        "# Pilot: a cost-aware MeDyate variant against TraDy and the paper's MeDyate (small, not the benchmark)",
        "",
        "```",
        COMMAND,
        "```",
        "",
        f"{NETWORK} (tiny-training int8 graph, dequantised) on {DATASET}, the vision benchmark's recipe "
        "(1,000 training images, 4 epochs, 1 warm-up, batch 32, SGD lr 0.125, clip 1.0, 2,000 test images; "
        "layer ranking from 50 dense steps on Caltech-101), seeds "
        f"{', '.join(map(str, SEEDS))}, one torch thread a run. `{VARIANT}` = `strategy=\"medyate\"` with "
        + ", ".join(f"`{k}={v!r}`" for k, v in VARIANT_OPTIONS.items())
        + ". TraDy and MeDyate are the benchmark's records (`results/runs/`), the variant ran here "
        "(`results/pilot_cost_aware/`). Intervals: 95 % t-interval over seeds (n = 2: t = 12.7, so wide); "
        "differences paired by seed.",
        "",
        "| method | budget (slots) | top-1 % | weight slots of the last draw (mean) |",
        "|---|---:|---|---:|",
    ]
    for method in METHODS:
        for budget in BUDGETS:
            values = list(top1.get((method, budget), {}).values())
            trained = share.get((method, budget))
            lines.append(f"| {method} | {budget:,} | {interval(values) if values else '-'} | "
                         f"{statistics.fmean(trained):,.0f} |" if trained else
                         f"| {method} | {budget:,} | {interval(values) if values else '-'} | - |")
    lines += ["", "| difference (pp, paired by seed) | " + " | ".join(f"{b:,}" for b in BUDGETS) + " |",
              "|---|" + "---|" * len(BUDGETS)]
    for a, b in ((VARIANT, "trady"), ("medyate", "trady"), (VARIANT, "medyate")):
        cells = []
        for budget in BUDGETS:
            x, y = top1.get((a, budget), {}), top1.get((b, budget), {})
            common = sorted(set(x) & set(y))
            cells.append(interval([x[s] - y[s] for s in common]) if common else "-")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    lines += ["", f"| budget trend {BUDGETS[-1]:,} − {BUDGETS[0]:,} (pp, paired by seed) | |", "|---|---|"]
    for method in METHODS:
        small, large = top1.get((method, BUDGETS[0]), {}), top1.get((method, BUDGETS[-1]), {})
        common = sorted(set(small) & set(large))
        lines.append(f"| {method} | {interval([large[s] - small[s] for s in common]) if common else '-'} |")
    missing = [s["id"] for s in all_specs if records[s["id"]] is None]
    if missing:
        lines += ["", f"Not run yet: {len(missing)} runs ({', '.join(missing)})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop launching runs after this long")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    all_specs = specs()
    if not args.report_only:
        PILOT_RUNS.mkdir(parents=True, exist_ok=True)
        todo = [s for s in all_specs if record_of(s) is None]
        benchmark.execute(todo, args.max_minutes, run_timeout=900, jobs=1, runs=PILOT_RUNS)
    notes = ""
    if REPORT.exists() and NOTES[0] in REPORT.read_text():  # the hand-written reading survives a regeneration
        text = REPORT.read_text()
        notes = text[text.index(NOTES[0]) : text.index(NOTES[1]) + len(NOTES[1])] + "\n"
    REPORT.write_text(report(all_specs) + ("\n" + notes if notes else ""))
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
