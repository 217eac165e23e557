"""Time cost of the lean backward on a vision step, this tree's lean.py against an older revision's, one process.

    .venv/bin/python scripts/bench_lean_overhead.py [--against main] [--batch 32] [--rounds 9]

mbv2-w0.35 at 128x128 under MeDyate (`full_random`, 27,946 slots, the frozen path reaches the first
conv): the forward+backward of one batch with the lean backward off (plain autograd), with the
`--against` revision's lean.py (loaded from git beside this one) and with this tree's. The three are
interleaved round by round in one process, so machine load hits them alike; reported as ratios of
medians. Python calls per step (cProfile) measure the host-side work a fast accelerator would expose.
Writes results/lean_overhead.json and results/lean_overhead.md.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from peft import get_peft_model

import medyate_peft
from medyate_peft import MeDyateConfig, lean
from medyate_peft.backbones import load_mcu_model
from medyate_peft.medyate.layer import MeDyateLayer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def load_lean(revision: str) -> ModuleType:
    """lean.py of `revision` as module ``medyate_peft.lean_<rev>`` (its relative imports resolve in this tree)."""
    source = subprocess.run(["git", "show", f"{revision}:medyate_peft/lean.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = f"medyate_peft.lean_{''.join(c if c.isalnum() else '_' for c in revision)}"
    path = Path(tempfile.mkdtemp()) / "lean.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = medyate_peft.__name__
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _switch(model: torch.nn.Module, version: ModuleType | None) -> None:
    """Install one lean backward (None: none) on the MeDyate model's inner model."""
    inner = model.base_model.model
    for candidate in (lean, *_OLD):
        candidate.remove_lean_backward(inner)
    for layer in inner.modules():
        if isinstance(layer, MeDyateLayer):
            layer.lean_backward = version is not None
    if version is not None:
        version.apply_lean_backward(inner)


_OLD: list[ModuleType] = []


def _step(model, x, y) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def _python_calls(run: Callable[[], object]) -> int:
    profiler = cProfile.Profile()
    profiler.runcall(run)
    return sum(stat[1] for stat in pstats.Stats(profiler).stats.values())  # primitive + recursive calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="main", help="git revision whose lean.py is the 'before'")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MEDYATE_BENCH_THREADS", "1")))
    old = load_lean(args.against)
    _OLD.append(old)
    states = {"off": None, f"lean ({args.against})": old, "lean (this tree)": lean}
    config = MeDyateConfig(budget_kb=27_946 * 4 / 1024, input_size=[3, 128, 128], strategy="full_random", seed=0)
    model = get_peft_model(load_mcu_model("mbv2-w0.35", num_classes=10), config)
    model.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 128, 128, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    times: dict[str, list[float]] = {name: [] for name in states}
    calls = {}
    names = list(states)
    for i in range(args.rounds + 1):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate the order each round
            _switch(model, states[name])
            elapsed = _step(model, x, y)
            if i:  # round 0 warms up allocator and kernels
                times[name].append(elapsed)
    for name, version in states.items():
        _switch(model, version)
        calls[name] = _python_calls(lambda: _step(model, x, y))
    _switch(model, lean)
    median = {name: statistics.median(values) for name, values in times.items()}
    meta = {
        "command": " ".join([".venv/bin/python", "scripts/bench_lean_overhead.py", *map(shlex.quote, sys.argv[1:])]),
        "against": subprocess.run(["git", "rev-parse", "--short", args.against], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "loadavg": os.getloadavg()[0], "batch": args.batch, "rounds": args.rounds,
    }
    result = {"meta": meta, "median_ms": {k: 1000 * v for k, v in median.items()},
              "all_ms": {k: [round(1000 * v, 1) for v in vs] for k, vs in times.items()}, "python_calls": calls}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lean_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    base = median["off"]
    lines = [
        "# Lean backward: time cost on a vision step, before and after",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"mbv2-w0.35, 128x128, batch {args.batch}, MeDyate `full_random` at 27,946 slots; forward+backward of one "
        f"batch, median of {args.rounds} rounds, the states interleaved in one process (order rotated each round); "
        f"torch {meta['torch']}, {meta['threads']} thread, load average {meta['loadavg']:.1f} on 2 shared cores. "
        f"*before* = lean.py of `{args.against}` ({meta['against']}).",
        "",
        "| state | step ms (median) | / off | Python calls per step |",
        "|---|---:|---:|---:|",
    ]
    for name in states:
        lines.append(f"| {name} | {1000 * median[name]:.0f} | {median[name] / base:.2f} | {calls[name]:,} |")
    after, before = median["lean (this tree)"], median[f"lean ({args.against})"]
    lines += ["", f"This tree's lean step / {args.against}'s: {after / before:.2f}; lean overhead over plain autograd "
              f"{100 * (before / base - 1):+.0f} % before, {100 * (after / base - 1):+.0f} % after.", ""]
    (RESULTS / "lean_overhead.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
