"""Benchmark MeDyate/TraDy against full fine-tuning, classifier-only and LoRA on real data.

    .venv/bin/python scripts/benchmark.py scripts/bench_configs/vision.yaml scripts/bench_configs/text.yaml \
        --max-minutes 40

Each config describes a suite's full grid (networks x datasets x methods x budgets x seeds) and the
order in which to run it (`stages`). Every run trains in its own child process (peak RSS per run)
and leaves a JSON record in results/runs/; a run whose record exists is skipped, so the command
resumes where it stopped. Within a run, a checkpoint (results/checkpoints/<run id>.pt: weights,
optimizer, sampler, data order and RNG states, replaced atomically) is written after every epoch, so
a run killed at any point continues exactly from its last epoch (one stopped with SIGTERM, from its
current step). `--piece-minutes M` makes the command a piece of at most M minutes: past that, every
running run checkpoints after its current step, the report is rebuilt and the command exits with
status 75 (EX_TEMPFAIL); the same command again continues (exit 0 once every run is recorded). `--max-minutes` stops launching runs after that
long; `--jobs N` runs N at a time (step times then share the cores: each record keeps the load average
at its start and end). `--device auto|cpu|cuda` and `--precision fp32|bf16` override the config's
`device`/`precision` (default cpu, fp32). At the end (and with --report-only) the records become the
report: results/BENCHMARK.md, results/benchmark_runs.json and the plots, or the files a config's
`report:` names (its own suite's records only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
RESULTS = REPO / "results"
RUNS = RESULTS / "runs"
RANKINGS = RESULTS / "rankings"
CHECKPOINTS = RESULTS / "checkpoints"
PAUSED_STATUS = 75  # EX_TEMPFAIL: not finished, run the same command again
PIECE_RESERVE_S = 30  # of a piece, for the children's last step and checkpoint, the report and the exit
LAUNCH_MARGIN_S = 60  # no run is started this close to a piece's end (loading it would take most of that)
OVERRUN_S = 20  # a child still running this long after the piece's end is stopped (its last epoch stays)
DEFAULT_RANKING_STEPS = 50  # rankings made with another number of steps carry it in their file name
DEFAULT_REPORT = "BENCHMARK"
BUDGET_METHODS = ("static_random", "trady", "medyate", "det_rgn")
METHOD_LABEL = {
    "full": "full fine-tuning", "full_frozen_bn": "full fine-tuning, BN statistics frozen",
    "classifier": "classifier only", "lora": "LoRA (pointwise)",
    "static_random": "static random", "trady": "TraDy", "medyate": "MeDyate", "det_rgn": "D-DetRGN oracle",
    "medyate-ca": "MeDyate-CA (cost-aware)",
}
RANKED_STRATEGIES = ("trady", "medyate")
BASELINES = ("full", "classifier", "lora", "full_frozen_bn")
NOTES_START, NOTES_END = "<!-- notes: kept when the report is regenerated -->", "<!-- /notes -->"


# -- the grid ----------------------------------------------------------------------------------------
def load_config(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    config["path"] = str(path.relative_to(REPO) if path.is_absolute() and path.is_relative_to(REPO) else path)
    return config


def _spec(config: dict, cell: dict, method: str, seed: int, index: int | None) -> dict:
    """One run of `method` on `cell` (its budget `index`, None for the budget-free baselines)."""
    variant = config.get("variants", {}).get(method)
    strategy = variant["strategy"] if variant else method
    spec = {
        "suite": config["suite"], "network": cell["network"], "dataset": cell["dataset"], "method": method,
        "budget_slots": None if index is None else cell["budgets"][index], "budget_index": index, "seed": seed,
        "recipe": config["recipe"], "config": config["path"],
    }
    if variant:
        spec["strategy"] = strategy
    options = dict(variant.get("options", {})) if variant else {}
    if config["recipe"].get("resample_every") and method not in BASELINES and _dynamic(strategy):
        options["resample_every"] = config["recipe"]["resample_every"]  # a step cadence: many draws per run
    if options:
        spec["medyate_options"] = options
    if method == "lora":
        spec["lora_weight_slots"] = max(cell["budgets"])  # = the flat trainable vector at the largest budget
    if strategy in RANKED_STRATEGIES:
        source = config["ranking_dataset"][cell["dataset"]]
        spec["ranking_dataset"] = source
        spec["ranking_path"] = str(ranking_path(cell["network"], source, config["recipe"]))
    spec["device"] = config.get("device", "cpu")
    spec["precision"] = config.get("precision", "fp32")
    return spec


def _dynamic(strategy: str) -> bool:
    from medyate_peft.strategies import get_strategy

    return get_strategy(strategy).dynamic


def _is_budgeted(config: dict, method: str) -> bool:
    return method in BUDGET_METHODS or method in config.get("variants", {})


def grid(config: dict, runs: Path | None = None) -> list[dict]:
    """Every run of a suite, as a spec for bench_common.run_one.

    With `lr_sweep` in the config: first the sweep runs (every method the same learning rates, at the
    sweep seed and budget, scored on the validation split); a method's final runs (every seed and
    budget, at the learning rate its sweep chose) join the grid once its sweep is recorded in `runs`.
    """
    sweep = config.get("lr_sweep")
    specs = []
    for cell in config["cells"]:
        for method in config["methods"]:
            indices = list(range(len(cell["budgets"]))) if _is_budgeted(config, method) else [None]
            if not sweep:
                for seed, index in itertools.product(cell["seeds"], indices):
                    spec = _spec(config, cell, method, seed, index)
                    specs.append({**spec, "id": run_id(spec)})
                continue
            index = sweep["budget_index"] if indices != [None] else None
            tried = [{**_spec(config, cell, method, sweep["seed"], index), "lr": lr, "phase": "sweep"}
                     for lr in sweep["lrs"]]
            tried = [{**spec, "id": run_id(spec)} for spec in tried]
            specs += tried
            chosen = chosen_lr(tried, runs or RUNS)
            if chosen is None or sweep.get("only"):
                continue
            for seed, index in itertools.product(cell["seeds"], indices):
                spec = {**_spec(config, cell, method, seed, index), "lr": chosen, "phase": "final"}
                specs.append({**spec, "id": run_id(spec)})
    return specs


def chosen_lr(sweep: list[dict], runs: Path) -> float | None:
    """The sweep's learning rate with the best validation top-1 (ties: the smaller); None until all are
    recorded, or when every one diverged (a diverged run's record has no score and is left out).

    Only `val_top1` is read: sweep runs are never scored on the test split.
    """
    paths = [runs / f"{spec['id']}.json" for spec in sweep]
    if not all(path.exists() for path in paths):
        return None
    return best_lr([json.loads(path.read_text()) for path in paths])


def best_lr(records: list[dict]) -> float | None:
    """`chosen_lr` on a complete sweep's records: the best validation top-1 (ties: the smaller lr), None when
    every run diverged."""
    import bench_report as br

    scores = [(-r["val_top1"], r["lr"]) for r in records if not br.diverged(r)]
    return min(scores)[1] if scores else None


def run_id(spec: dict) -> str:
    """Names the record and the checkpoint; a precision other than the papers' fp32 is part of it."""
    budget = "na" if spec["budget_slots"] is None else str(spec["budget_slots"])
    precision = "" if spec.get("precision", "fp32") == "fp32" else f"__{spec['precision']}"
    base = (f"{spec['suite']}__{spec['network']}__{spec['dataset']}__{spec['method']}__b{budget}__s{spec['seed']}"
            f"{precision}")
    if "lr" not in spec:
        return base
    return f"{base}__lr{spec['lr']:g}" + ("__sweep" if spec.get("phase") == "sweep" else "")


def ranking_path(network: str, source: str, recipe: dict) -> Path:
    steps = recipe["ranking_steps"]
    return RANKINGS / f"{network}__{source}{'' if steps == DEFAULT_RANKING_STEPS else f'__{steps}steps'}.json"


def _matches(spec: dict, stage: dict) -> bool:
    for key, wanted in stage.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if spec.get(key) not in allowed:
            return False
    return True


def staged(config: dict) -> list[tuple[float, list[dict]]]:
    """(priority, runs) per stage, the last one what no stage named; seeds first within a stage.

    A stage's priority (default: its position) orders stages across suites; ties keep config order.
    """
    specs, out, seen = grid(config), [], set()
    stages = config.get("stages", [])
    for position, stage in enumerate([*stages, {}]):
        match = {k: v for k, v in stage.items() if k != "priority"}
        chosen = [s for s in specs if s["id"] not in seen and _matches(s, match)]
        chosen.sort(key=lambda s: (s["seed"], list(METHOD_LABEL).index(s["method"]), s["budget_index"] or 0,
                                   s.get("lr", 0)))
        out.append((stage.get("priority", position) if stage else float("inf"), chosen))
        seen.update(s["id"] for s in chosen)
    return out


def ordered(configs: list[dict]) -> list[dict]:
    """All suites' stages by priority (stable: config order, then stage order); unnamed runs last."""
    stages = [stage for config in configs for stage in staged(config)]
    return [spec for _, specs in sorted(stages, key=lambda st: st[0]) for spec in specs]


# -- running -------------------------------------------------------------------------------------------
def _child(target: str, *args: Any) -> None:
    sys.path.insert(0, str(SCRIPTS))
    import bench_common

    if getattr(bench_common, target)(*args) == bench_common.PAUSED:
        sys.exit(PAUSED_STATUS)


def _ensure_ranking(ctx: mp.context.BaseContext, spec: dict, timeout: float) -> str:
    """Make the spec's layer ranking first if it needs one that is not there yet (before any run uses it):
    "ok", "timeout" (the next command makes it) or "failed"."""
    path = spec.get("ranking_path")
    if not path or Path(path).exists():
        return "ok"
    print(f"ranking {Path(path).name} ...", flush=True)
    recipe = spec["recipe"]
    process = ctx.Process(target=_child, args=("make_ranking", spec["network"], spec["ranking_dataset"], recipe,
                                               recipe["ranking_steps"], Path(path), spec.get("device", "cpu")))
    process.start()
    process.join(max(timeout, 0))
    if process.is_alive():
        process.terminate()
        process.join()
        return "timeout"
    return "ok" if process.exitcode == 0 and Path(path).exists() else "failed"


def execute(
    specs: list[dict], max_minutes: float | None, run_timeout: float, jobs: int, runs: Path | None = None,
    piece_minutes: float | None = None, checkpoints: Path | None = None,
) -> int:
    """Run what has no record in `runs` (default RUNS) yet, `jobs` child processes at a time.

    Returns 0 when every run is recorded, PAUSED_STATUS when some are left for the next identical
    command (piece or time limit reached; their checkpoints in `checkpoints` carry them on), 1 when a
    run failed.
    """
    import bench_report as br

    runs, checkpoints = runs or RUNS, checkpoints or CHECKPOINTS
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "peft", "transformers", "timm"])
    start = time.time()
    deadline = None if piece_minutes is None else start + 60 * piece_minutes - PIECE_RESERVE_S
    todo = [s for s in specs if not (runs / f"{s['id']}.json").exists()]
    resuming = sum((checkpoints / f"{s['id']}.pt").exists() for s in todo)
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already recorded; {len(todo)} to go ({resuming} continue "
          f"from a checkpoint), {jobs} at a time", flush=True)
    running: list[tuple[Any, dict, float]] = []
    pending, done, left, failed = list(todo), 0, 0, 0
    while pending or running:
        elapsed = (time.time() - start) / 60
        piece_over = deadline is not None and time.time() > deadline - LAUNCH_MARGIN_S
        if pending and (piece_over or max_minutes is not None and elapsed >= max_minutes):
            print(f"time limit reached after {elapsed:.1f} min: {len(pending)} runs not started", flush=True)
            left += len(pending)
            pending = []
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            budget = run_timeout if deadline is None else min(run_timeout, deadline - time.time())
            ranking = _ensure_ranking(ctx, spec, budget)
            if ranking != "ok":
                print(f"  ranking {ranking}; {spec['id']} not started", flush=True)
                left, failed = left + (ranking == "timeout"), failed + (ranking == "failed")
                continue
            args = (spec, str(runs / f"{spec['id']}.json"), str(checkpoints / f"{spec['id']}.pt"), deadline)
            process = ctx.Process(target=_child, args=("run_one", *args))
            process.start()
            running.append((process, spec, time.monotonic()))
        time.sleep(1)
        for entry in list(running):
            process, spec, t = entry
            overrun = deadline is not None and time.time() > deadline + OVERRUN_S
            timed_out = time.monotonic() - t > run_timeout or overrun
            if process.is_alive() and not timed_out:
                continue
            if process.is_alive():
                process.terminate()  # SIGTERM: the run checkpoints after its current step
                process.join(OVERRUN_S)
            if process.is_alive():
                process.kill()  # its last epoch's checkpoint stays
            process.join()
            running.remove(entry)
            done += 1
            record = runs / f"{spec['id']}.json"
            ok = process.exitcode == 0 and record.exists()
            recorded = json.loads(record.read_text()) if ok else None  # a sweep run has a validation score only
            if ok and br.diverged(recorded):
                status = f"diverged at step {recorded['diverged_at_step']} (recorded, left out of the lr choice)"
            elif ok:
                status = "ok" + (f", top-1 {recorded['top1']:.4f}" if recorded.get("top1") is not None else "")
            elif process.exitcode == PAUSED_STATUS:
                status, left = "paused: the next identical command continues it from its checkpoint", left + 1
            elif timed_out:
                status, left = "timeout: the next identical command continues it from its last epoch", left + 1
            else:
                status, failed = f"failed ({process.exitcode})", failed + 1
            print(f"[{done}/{len(todo)}] {spec['id']}: {status} in {time.monotonic() - t:.0f} s", flush=True)
    if left:
        return PAUSED_STATUS
    return 1 if failed else 0


def execute_replanned(configs: list[dict], max_minutes: float | None, run_timeout: float, jobs: int,
                      threads: int = 1) -> int:
    """Run the grid `jobs` runs at a time, planning it anew after each: a finished sweep adds its final runs.

    The configs are read again before each plan, so a changed `stages` order applies from the next run on.
    A run that fails is not retried in this invocation (the next one tries it again).
    """
    start, tried = time.monotonic(), set()
    while True:
        configs = [load_config(REPO / c["path"]) for c in configs]
        left = None if max_minutes is None else max_minutes - (time.monotonic() - start) / 60
        todo = [s for s in ordered(configs) if s["id"] not in tried and not (RUNS / f"{s['id']}.json").exists()]
        if not todo or (left is not None and left <= 0):
            print("done" if not todo else f"time limit reached: {len(todo)} planned runs not started", flush=True)
            return 0
        tried.update(s["id"] for s in todo[:jobs])
        for spec in todo[:jobs]:
            spec["threads"] = threads
        status = execute(todo[:jobs], left, run_timeout, jobs)
        if status == PAUSED_STATUS:
            return status


# -- report ----------------------------------------------------------------------------------------
def load_records(suites: set[str] | None = None) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    return [r for r in records if suites is None or r["suite"] in suites]


def _group(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["suite"], r["network"], r["dataset"], r["method"], r["budget_slots"])].append(r)
    return groups


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _memory(r: dict) -> int:
    """Training-step memory beside weights and optimizer: saved activations + weight gradients (batch 32)."""
    return r["saved_activation_bytes"] + r["weight_grad_bytes"]


def _kib(n: float) -> str:
    return f"{n / 1024:,.0f}"


def headline_tables(records: list[dict]) -> list[str]:
    groups = _group(records)
    cells = sorted({k[:3] for k in groups}, key=lambda k: (k[0] != "vision", k))
    lines = []
    for suite, network, dataset in cells:
        full = groups.get((suite, network, dataset, "full", None), [])
        full_mem = _mean([_memory(r) for r in full]) if full else None
        full_step = _mean([r["step_time_median_s"] for r in full]) if full else None
        lines += [
            f"### {network} on {dataset} ({suite})", "",
            "| method | budget (slots) | top-1 % (mean ± sd, n) | analytical use (slots) | saved act. KiB | "
            "weight-grad KiB | memory / full FT | step ms | step / full FT | peak RSS MiB | adapter KiB | "
            "trainable |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        keys = sorted((k for k in groups if k[:3] == (suite, network, dataset)),
                      key=lambda k: (list(METHOD_LABEL).index(k[3]), k[4] or 0))
        for key in keys:
            rs = groups[key]
            top = [100 * r["top1"] for r in rs]
            mem, step = _mean([_memory(r) for r in rs]), _mean([r["step_time_median_s"] for r in rs])
            used = [r.get("analytical_used_slots") for r in rs]
            used_txt = "-" if used[0] is None else f"{_mean(used):,.0f}"
            extra = f" (r={rs[0]['lora_r']})" if key[3] == "lora" else ""
            lines.append(
                f"| {METHOD_LABEL[key[3]]}{extra} | {'-' if key[4] is None else f'{key[4]:,}'} | "
                f"{_mean(top):.2f} ± {_sd(top):.2f} ({len(rs)}) | {used_txt} | "
                f"{_kib(_mean([r['saved_activation_bytes'] for r in rs]))} | "
                f"{_kib(_mean([r['weight_grad_bytes'] for r in rs]))} | "
                f"{'-' if full_mem is None else f'{mem / full_mem:.3f}'} | {1000 * step:.0f} | "
                f"{'-' if full_step is None else f'{step / full_step:.2f}'} | "
                f"{_mean([r['peak_rss_bytes'] for r in rs]) / 2**20:,.0f} | "
                f"{_kib(_mean([r['adapter_bytes'] for r in rs]))} | {rs[0]['trainable_params']:,} |"
            )
        lines.append("")
    return lines


def method_summary(records: list[dict]) -> list[str]:
    """Per suite and method, over every network/dataset/budget row that has full fine-tuning beside it."""
    groups = _group(records)
    lines = [
        "| suite | method | rows | memory / full FT (min-max) | step / full FT (median) | "
        "top-1 − full FT, pp (min / mean / max) |",
        "|---|---|---:|---|---:|---|",
    ]
    for suite in sorted({k[0] for k in groups}, key=lambda s: (s != "vision", s)):
        for method in (m for m in METHOD_LABEL if m != "full"):
            mem, step, acc = [], [], []
            for key, rs in groups.items():
                full = groups.get((*key[:3], "full", None))
                if key[0] != suite or key[3] != method or not full:
                    continue
                mem.append(_mean([_memory(r) for r in rs]) / _mean([_memory(r) for r in full]))
                step.append(_mean([r["step_time_median_s"] for r in rs]) /
                            _mean([r["step_time_median_s"] for r in full]))
                acc.append(100 * (_mean([r["top1"] for r in rs]) - _mean([r["top1"] for r in full])))
            if mem:
                lines.append(
                    f"| {suite} | {METHOD_LABEL[method]} | {len(mem)} | {min(mem):.3f}-{max(mem):.3f} | "
                    f"{statistics.median(step):.2f} | {min(acc):+.2f} / {_mean(acc):+.2f} / {max(acc):+.2f} |"
                )
    return [*lines, ""]


def ordering_analysis(records: list[dict]) -> list[str]:
    """MeDyate >= TraDy >= static random at equal budget: per cell and budget, on the seeds all of them ran."""
    groups = _group(records)
    lines = [
        "| suite | network / dataset | budget | seeds | MeDyate | TraDy | static random | Δ MeDyate−TraDy (per seed) | "
        "Δ TraDy−static (per seed) | eval SE | ordering holds |",
        "|---|---|---:|---|---:|---:|---:|---|---|---:|---|",
    ]
    holds = total = 0
    for key in sorted(k for k in groups if k[3] == "medyate"):
        suite, network, dataset, _, budget = key
        trio = [groups.get((suite, network, dataset, m, budget), []) for m in ("medyate", "trady", "static_random")]
        by_seed = [{r["seed"]: 100 * r["top1"] for r in rs} for rs in trio]
        seeds = sorted(set.intersection(*(set(s) for s in by_seed if s)))
        if not trio[1] or not seeds:
            continue
        means = [_mean([s[seed] for seed in seeds]) if s else float("nan") for s in by_seed]
        d_mt = [by_seed[0][s] - by_seed[1][s] for s in seeds]
        d_ts = [by_seed[1][s] - by_seed[2][s] for s in seeds] if by_seed[2] else []
        p, n = means[0] / 100, trio[0][0]["eval_size"]
        se = 100 * (p * (1 - p) / n) ** 0.5
        ok = means[0] >= means[1] and (not by_seed[2] or means[1] >= means[2])
        holds += ok
        total += 1
        fmt = lambda ds: ", ".join(f"{d:+.2f}" for d in ds) or "-"  # noqa: E731
        lines.append(
            f"| {suite} | {network} / {dataset} | {budget:,} | {','.join(map(str, seeds))} | {means[0]:.2f} | "
            f"{means[1]:.2f} | {'-' if not by_seed[2] else f'{means[2]:.2f}'} | {fmt(d_mt)} | {fmt(d_ts)} | "
            f"{se:.2f} | {'yes' if ok else 'no'} |"
        )
    lines += ["", f"The full ordering holds (on the means over the seeds listed) in {holds} of {total} "
              "network/dataset/budget cells.", ""]
    return lines


def not_run(configs: list[dict], records: list[dict]) -> list[str]:
    done = {r["id"] for r in records}
    lines = []
    for config in configs:
        specs = grid(config)
        missing = [s for s in specs if s["id"] not in done]
        lines.append(f"- `{config['path']}`: {len(specs) - len(missing)} of {len(specs)} runs recorded.")
        by_cell: dict[tuple, list[str]] = defaultdict(list)
        for s in missing:
            budget = "" if s["budget_slots"] is None else f"@{s['budget_slots']}"
            by_cell[(s["network"], s["dataset"])].append(f"{s['method']}{budget}/s{s['seed']}")
        cell_sizes = defaultdict(int)
        for s in specs:
            cell_sizes[(s["network"], s["dataset"])] += 1
        for (network, dataset), items in by_cell.items():
            listed = "all of them" if len(items) == cell_sizes[(network, dataset)] else ", ".join(items)
            lines.append(f"  - not run, {network} / {dataset} ({len(items)}): {listed}")
    return lines


def plots(records: list[dict], prefix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    cells = sorted({k[:3] for k in groups})
    colours = dict(zip(METHOD_LABEL, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    cols = min(3, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, cell in zip(axes.flat, cells, strict=False):
        for method in METHOD_LABEL:
            keys = sorted((k for k in groups if k[:3] == cell and k[3] == method), key=lambda k: k[4] or 0)
            if not keys:
                continue
            vals = [[100 * r["top1"] for r in groups[k]] for k in keys]
            if keys[0][4] is None:
                ax.axhline(_mean(vals[0]), color=colours[method], ls="--", lw=1, label=METHOD_LABEL[method])
                continue
            x = [k[4] for k in keys]
            means = [_mean(v) for v in vals]
            err = [[m - min(v) for m, v in zip(means, vals, strict=True)],
                   [max(v) - m for m, v in zip(means, vals, strict=True)]]
            ax.errorbar(x, means, yerr=err, marker="o", capsize=3, color=colours[method], label=METHOD_LABEL[method])
        _style_axis(ax, cell, "budget (slots, per sample)", "top-1 % (bars: seed min-max)")
    _save_figure(fig, axes, len(cells), f"{prefix}accuracy_vs_budget.png")

    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, cell in zip(axes.flat, cells, strict=False):
        for method in METHOD_LABEL:
            rs = [r for k in groups if k[:3] == cell and k[3] == method for r in groups[k]]
            if rs:
                ax.scatter([_memory(r) / 2**20 for r in rs], [100 * r["top1"] for r in rs], s=18,
                           color=colours[method], label=METHOD_LABEL[method])
        _style_axis(ax, cell, "saved act. + weight grads, MiB (batch 32)", "top-1 %")
    _save_figure(fig, axes, len(cells), f"{prefix}memory_vs_accuracy.png")


def _style_axis(ax: Any, cell: tuple, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_title(f"{cell[1]} / {cell[2]} ({cell[0]})", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save_figure(fig: Any, axes: Any, used: int, name: str) -> None:
    """Hide the unused panels, add the shared legend, write results/<name>."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    _legend(fig, axes)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(RESULTS / name, dpi=110)
    plt.close(fig)


def _legend(fig: Any, axes: Any) -> None:
    """One legend for the figure, with every method that appears in any facet."""
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(entries.values(), entries.keys(), loc="center right", fontsize=8)


def _notes(path: Path) -> str:
    if path.exists():
        text = path.read_text()
        if NOTES_START in text and NOTES_END in text:
            return text[text.index(NOTES_START) : text.index(NOTES_END) + len(NOTES_END)]
    return f"{NOTES_START}\n(no notes yet)\n{NOTES_END}"


def recipe_lines(configs: list[dict]) -> list[str]:
    lines = []
    for config in configs:
        r = config["recipe"]
        lines.append(f"- **{config['suite']}** (`{config['path']}`): " + ", ".join(f"{k}={v}" for k, v in r.items()))
    return lines


def report_name(configs: list[dict]) -> str:
    """The report the configs name (`report:`; default BENCHMARK); one command writes one report."""
    names = {c.get("report", DEFAULT_REPORT) for c in configs}
    if len(names) > 1:
        raise ValueError(f"these configs write different reports ({', '.join(sorted(names))}): run each in its own "
                         "command")
    return names.pop()


def _where(records: list[dict]) -> str:
    if not records:
        return "nothing has run yet"
    gpus = sorted({r["gpu"] for r in records if r.get("gpu")})
    if not gpus:
        return ("2-core CPU, shared with other jobs: step times are noisy; each record has the load average at its "
                "start and end")
    precisions = sorted({r.get("precision", "fp32") for r in records})
    return f"on {', '.join(gpus)} where a record says so, precision {', '.join(precisions)}"


def _full_recipe_line(name: str) -> list[str]:
    if name != DEFAULT_REPORT:
        return []
    recorded = load_records({"vision_full_recipe"})
    if not recorded:
        return ["GPU run at the papers' full recipe (`scripts/bench_configs/vision_full_recipe.yaml`): not run: no "
                "GPU lent.", ""]
    return [f"GPU run at the papers' full recipe: {len(recorded)} runs recorded, in "
            "`results/BENCHMARK_full_recipe.md`.", ""]


def _sweep_and_finals(configs: list[dict], records: list[dict]) -> tuple[list[dict], list[dict], dict, list[str]]:
    """(sweep records, final records, chosen lr per (network, dataset, method), what did not run) of sweep suites."""
    by_id = {r["id"]: r for r in records}
    sweeps, finals, chosen, missing = [], [], {}, []
    for config in configs:
        specs = grid(config)
        for cell in config["cells"]:
            for method in config["methods"]:
                mine = [s for s in specs if (s["network"], s["dataset"], s["method"]) == (cell["network"],
                                                                                      cell["dataset"], method)]
                tried = [s for s in mine if s["phase"] == "sweep"]
                final = [s for s in mine if s["phase"] == "final"]
                finals += [by_id[s["id"]] for s in final if s["id"] in by_id]
                done = [by_id[s["id"]] for s in tried if s["id"] in by_id]
                sweeps += done
                # a sweep-only grid has no finals to read the choice from
                lr = final[0]["lr"] if final else best_lr(done) if len(done) == len(tried) else None
                if lr is not None:
                    chosen[(cell["network"], cell["dataset"], method)] = lr
                per_seed = len(cell["budgets"]) if _is_budgeted(config, method) else 1
                expected = 0 if config["lr_sweep"].get("only") else len(cell["seeds"]) * per_seed
                done_final = sum(s["id"] in by_id for s in final)
                if len(done) < len(tried) or done_final < expected:
                    absent = [f"s{s['seed']}" + ("" if s["budget_slots"] is None else f"@{s['budget_slots']}")
                              for s in final if s["id"] not in by_id]
                    missing.append(f"- {cell['network']} / {cell['dataset']} / {METHOD_LABEL[method]}: sweep "
                                   f"{len(done)} of {len(tried)}, final runs {done_final} of {expected}"
                                   + (f" (not run: {', '.join(absent)})" if absent else ""))
    return sweeps, finals, chosen, missing


def _determinism(sweeps: list[dict], finals: list[dict], chosen: dict) -> str:
    """The final run that repeats a sweep run (same seed, budget and lr) must reproduce its validation top-1."""
    pairs = []
    for f in finals:
        for s in sweeps:
            if (s["network"], s["dataset"], s["method"], s["budget_slots"], s["seed"], s["lr"]) == (
                    f["network"], f["dataset"], f["method"], f["budget_slots"], f["seed"], f["lr"]):
                pairs.append(abs(s["val_top1"] - f["val_top1"]))
    if not pairs:
        return "No final run repeats a sweep run yet."
    same = sum(d == 0 for d in pairs)
    return (f"Reproducibility: {same} of {len(pairs)} final runs that repeat a sweep run (seed 0 at the sweep "
            f"budget and the chosen lr, retrained from scratch) reproduce its validation top-1 exactly"
            + ("." if same == len(pairs) else f" (largest gap {100 * max(pairs):.2f} pp)."))


def resolved_report(configs: list[dict], command: str, records: list[dict], name: str = DEFAULT_REPORT) -> list[str]:
    """<name>.md of a grid with a learning-rate sweep: intervals, paired differences, the default's bar.

    A config's `title` heads the report; `compare_clipping` (a suite name) adds the sweep's validation
    top-1 against that suite's sweep, run by run, to say whether each method needs the other's clipping.
    """
    import bench_report as br

    sweeps, finals, chosen, missing = _sweep_and_finals(configs, records)
    default = name == DEFAULT_REPORT
    plot_prefix = "" if default else name.lower() + "_"
    if finals:
        plots(finals, plot_prefix)
    compute = sum(r["wall_seconds"] for r in sweeps + finals) / 60
    sweep = configs[0]["lr_sweep"]
    title = configs[0].get("title", "MeDyate / TraDy / a cost-aware MeDyate, with intervals that say what is resolved")
    compare = configs[0].get("compare_clipping")
    clipping = (["## Does every method need clipping? (validation top-1 %, seed 0, the same sweep)", "",
                 *br.clipping_table(sweeps, load_records({compare}), METHOD_LABEL)] if compare else [])
    return [
        f"# Benchmark: {title}", "",
        "Command (resumes: runs whose record exists in `results/runs/` are skipped):", "",
        "```", command, "```", "",
        f"{len(sweeps)} sweep runs and {len(finals)} final runs recorded, {compute:.1f} min of run wall-clock "
        "(one torch thread a run, on a 2-core CPU shared with other work: step times are noisy)."
        + (" The previous grid's report is `results/BENCHMARK_v1.md` (its records stay in `results/runs/`, suite "
           "`vision`/`text`)." if default else ""),
        "",
        "## Recipe (the same for every method)", "", *recipe_lines(configs), "",
        f"Learning rate: the same sweep for every method, lr ∈ {{{', '.join(f'{lr:g}' for lr in sweep['lrs'])}}}, "
        f"trained at seed {sweep['seed']} on the middle budget (index {sweep['budget_index']}; the budget-free "
        "baselines at their one setting) and scored on the validation split (carved from the training split, "
        "class-balanced, disjoint from the train subset). The lr with the best validation top-1 is chosen per "
        "(network, dataset, method) and used at every seed and budget. The test split is evaluated in the final "
        "runs only. Intervals: 95 % t-interval over seeds; differences paired by seed; *resolved* = the interval "
        "excludes 0.", "",
        _notes(RESULTS / f"{name}.md"), "",
        "## Learning-rate sweep (validation top-1 %, seed 0)", "",
        *br.sweep_table(sweeps, chosen, METHOD_LABEL), _determinism(sweeps, finals, chosen), "",
        *clipping,
        "## Results (test top-1 on the full test split)", "",
        "`draws`: channel selections that trained in a run (the first included); `weight slots of the last draw`: "
        "weight-gradient slots the last selection trains; `clipped steps`: share of steps whose global gradient "
        "norm exceeded the clip.", "",
        *br.results_table(finals, METHOD_LABEL),
        "## Ordering at equal budget", "",
        *br.claims_table(finals),
        "## Is full fine-tuning the upper bound? (full FT − each budgeted run, paired by seed)", "",
        *br.upper_bound_table(finals, METHOD_LABEL),
        "## Does more memory help? (per method, paired by seed)", "",
        *br.trend_table(finals, METHOD_LABEL),
        "## The default strategy's bar", "",
        "A default must be ≥ TraDy within the interval at every budget (a − TraDy not resolved below 0) and its "
        "accuracy must not fall as the budget grows (no budget step resolved below 0, and the largest budget's "
        "mean at least the smallest's).", "",
        *br.default_lines(finals, tuple(m for m in ("medyate", "medyate-ca", "trady")
                                        if any(m in c["methods"] for c in configs)), METHOD_LABEL),
        f"Plots: `results/{plot_prefix}accuracy_vs_budget.png`, `results/{plot_prefix}memory_vs_accuracy.png` "
        "(bars: seed min-max)" + ("; the previous grid's: `results/*_v1.png`." if default else "."), "",
        "## What was run and what was not", "",
        *(missing or ["- every planned run is recorded"]), "",
        *_full_recipe_line(name),
    ]


def report(configs: list[dict], command: str) -> None:
    name = report_name(configs)
    default = name == DEFAULT_REPORT
    records = load_records(None if default else {c["suite"] for c in configs})
    from medyate_peft.atomic import atomic_write, atomic_write_json

    atomic_write_json(records, RESULTS / ("benchmark_runs.json" if default else f"{name.lower()}_runs.json"),
                      sort_keys=True, indent=1)
    if any("lr_sweep" in c for c in configs):
        md = RESULTS / f"{name}.md"
        with atomic_write(md) as handle:
            handle.write("\n".join(resolved_report(configs, command, records, name)))
        print(f"wrote {md}")
        return
    if records:
        plots(records, "" if default else f"{name.lower()}_")
    compute = sum(r["wall_seconds"] for r in records) / 60
    md = RESULTS / f"{name}.md"
    text = [
        "# Benchmark: MeDyate / TraDy vs full fine-tuning, classifier-only and LoRA", "",
        "Command (resumes: runs whose record exists in `results/runs/` are skipped, a run with a checkpoint in "
        "`results/checkpoints/` continues from it):", "",
        "```", command, "```", "",
        f"{len(records)} runs recorded, {compute:.1f} min of run wall-clock in total ({_where(records)}).", "",
        "## Recipe (the same for every method of a suite)", "", *recipe_lines(configs), "",
        _notes(md), "",
        "## Results", "",
        "Memory columns are measured on one training step of batch 32 (`saved act.`: bytes autograd saved, "
        "parameters excluded; `weight-grad`: bytes of the `.grad` tensors, the head included; for MeDyate "
        "strategies the flat gradient vector as allocated). `memory / full FT` = (saved act. + weight-grad) "
        "over the same for full fine-tuning. `analytical use` = the papers' slot count per sample (full FT: "
        "every candidate layer). Peak RSS is `ru_maxrss` of the run's own process (includes the cached "
        "dataset tensors and the libraries, the same for every method).", "",
        "### Against full fine-tuning, per method (rows: network/dataset/budget with a full FT run)", "",
        *method_summary(records),
        *headline_tables(records),
        "## Ordering at equal budget: MeDyate ≥ TraDy ≥ static random?", "",
        *ordering_analysis(records),
        f"Plots: `results/{'' if default else name.lower() + '_'}accuracy_vs_budget.png`, "
        f"`results/{'' if default else name.lower() + '_'}memory_vs_accuracy.png`.", "",
        "## What was run and what was not", "",
        *not_run(configs, records), "",
        *_full_recipe_line(name),
    ]
    with atomic_write(md) as handle:
        handle.write("\n".join(text))
    print(f"wrote {md} ({len(records)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="suite configs (scripts/bench_configs/*.yaml)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop launching runs after this long")
    parser.add_argument("--piece-minutes", type=float, default=None,
                        help="checkpoint every run and exit (status 75) after this long; the same command continues")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds before one run is killed")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: stable on a shared CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where runs train (default: the config's "
                        "`device`, else cpu); auto: cuda when torch sees a GPU")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="default: the config's `precision`, else fp32 (the papers'); bf16: autocast")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from the records")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder of the records (its runs/) and of the report (default results/)")
    args = parser.parse_args()
    if args.results:
        global RESULTS, RUNS
        RESULTS, RUNS = args.results.resolve(), args.results.resolve() / "runs"
        RUNS.mkdir(parents=True, exist_ok=True)
    if args.piece_minutes is not None and args.piece_minutes * 60 <= PIECE_RESERVE_S + LAUNCH_MARGIN_S:
        parser.error(f"--piece-minutes {args.piece_minutes:g} leaves no time to train: give at least "
                     f"{(PIECE_RESERVE_S + LAUNCH_MARGIN_S) / 60 + 1:g}")
    sys.path.insert(0, str(SCRIPTS))
    configs = [load_config(p.resolve()) for p in args.configs]
    for config in configs:
        config.update({k: v for k, v in (("device", args.device), ("precision", args.precision)) if v})
    report_name(configs)  # one report per command, before anything runs
    options = [(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}")
               for k, v in (("max_minutes", args.max_minutes), ("piece_minutes", args.piece_minutes),
                            ("device", args.device), ("precision", args.precision)) if v]
    options += [f"--{k} {v}" for k, v in (("jobs", args.jobs), ("threads", args.threads)) if v > 1]
    command = " ".join(["python scripts/benchmark.py", *(c["path"] for c in configs), *options])
    status = 0
    if not args.report_only and any("lr_sweep" in c for c in configs):
        status = execute_replanned(configs, args.max_minutes, args.run_timeout, args.jobs, args.threads)
    elif not args.report_only:
        specs = ordered(configs)
        for spec in specs:
            spec["threads"] = args.threads
        status = execute(specs, args.max_minutes, args.run_timeout, args.jobs, piece_minutes=args.piece_minutes)
    report(configs, command)
    if status == PAUSED_STATUS:
        print(f"not finished: run the same command again to continue ({command}); exit status {PAUSED_STATUS}",
              flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
