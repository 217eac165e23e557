"""Training-step time of every method against its floor, side by side in one process (interleaved rounds).

    .venv/bin/python scripts/bench_speed.py --rounds 5

The floor of a channel-sparse step is what any implementation must do: the forward, the input
gradients from the lowest trained layer up (nothing below it needs a backward) and the compact
weight gradients of the selected channels. It is timed on the method's own wrapped model with its
MeDyate layers switched to their plain base layers, every weight frozen, the lowest selected layer's
input made to require grad, and hooks computing each selected layer's dW[:, S] with the kernels'
formula; plain autograd through the frozen path (no lean backward). Each network's methods are
timed on one batch in rounds that visit every method once in a shuffled order, so that a load
change hits all of them; ratios are of per-round medians. On the CPU each step is timed twice: wall
clock, and the CPU time of the one thread that runs it (torch runs one thread here, backward
included). On a shared machine the wall clock also counts the time the process waits for a core
(load 6 on 2 cores: a step's wall time is about twice its CPU time, in bursts), so there the ratios
and the 1.10x target are read on CPU time, the wall ratios reported beside them; on a GPU on the
(synchronised) wall clock. On glibc the allocator is set to keep freed memory first (`--system-allocator`
leaves it as it is): page faults of fresh memory otherwise swamp the differences measured. Where a sparse step is
above 1.10x its floor, three profiled steps of each
(torch.profiler, per-op self time, median) say which ops hold the difference, and a dispatch mode
counts the bytes each op writes beyond the floor's (independent of the load). Writes results/speed.md
and results/speed.json; on a GPU (`--device cuda`, each step synchronised before its clock is read;
`--precisions fp32 bf16` times both, bf16 as autocast) results/speed_cuda.md and results/speed_cuda.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402  (also registers the MEDYATE peft type)
from benchmark import RANKINGS, RESULTS  # noqa: E402

from medyate_peft.atomic import atomic_write, atomic_write_json  # noqa: E402
from medyate_peft.kernels import conv_channel_grad  # noqa: E402
from medyate_peft.lean import lean_backward  # noqa: E402
from medyate_peft.medyate.layer import Conv2d as MeDyateConv2d  # noqa: E402

SPARSE = ("trady", "medyate")
# Budgets (fp32 slots): the papers' smallest per MCU network, EfficientNet-Lite0 the same fraction of its
# full-fine-tuning slots as MbV2-w0.35's (scripts/bench_configs/vision.yaml), 1 MiB for the transformers.
VISION_BUDGETS = {"mbv2-w0.35": 27946, "mcunet-5fps": 15936, "proxyless-w0.3": 25984, "efficientnet-lite0": 129388}
TEXT_BUDGET = 262144
TEXT_NETWORKS = ("minilm", "bert-base", "llama-100m")
TARGET = 1.10
CPU = torch.device("cpu")


@dataclass
class Entry:
    setup: bench_common.Setup
    optimizer: torch.optim.Optimizer
    mode: str  # "step" (lean backward as configured), "lean off", "floor"
    device: torch.device = CPU
    precision: str = "fp32"


# -- networks --------------------------------------------------------------------------------------
def text_network(name: str) -> nn.Module:
    """MiniLM with its weights; the BERT-base-sized encoder and the ~110M Llama-style decoder from config."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if name == "minilm":
        return bench_common.load_network("minilm", 2)[0]
    if name == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=2))
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=32000, num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(config)


def head_name(model: nn.Module) -> str:
    return "score" if hasattr(model, "score") else "classifier"


def text_batch(batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, 1000, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


# -- methods ---------------------------------------------------------------------------------------
def sparse_setup(method: str, model: nn.Module, kind: str, budget: int, input_size: list[int],
                 ranking: Path | None) -> bench_common.Setup:
    from peft import get_peft_model

    config = bench_common.medyate_config({"method": method, "budget_slots": budget, "seed": 0,
                                          "ranking_path": str(ranking) if ranking else None}, input_size)
    config.modules_to_save = [head_name(model)]
    peft_model = get_peft_model(model, config)
    return bench_common.Setup(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                              peft_model.train, {})


def lora_setup(model: nn.Module, budget: int) -> bench_common.Setup:
    from peft import LoraConfig, get_peft_model

    head = head_name(model)
    targets = [n for n in bench_common.lora_targets(model) if not n.startswith(head)]
    r = bench_common.lora_rank(model, targets, budget)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets,
                                                  modules_to_save=[head]))
    return bench_common.Setup(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                              bench_common.train_keeping_bn_stats(peft_model), {"lora_r": r})


def entries_for(base: nn.Module, kind: str, budget: int, input_size: list[int], ranking: Callable[[str], Path | None],
                batch, device: torch.device = CPU, precision: str = "fp32") -> dict[str, Entry]:
    out = {}
    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    out["full"] = bench_common.Setup(full, list(full.parameters()), full.train, {})
    out["lora"] = lora_setup(copy.deepcopy(base), budget)
    entries = {label: Entry(s, torch.optim.SGD(s.params, lr=1e-4), "step", device, precision)
               for label, s in out.items()}
    for method in SPARSE:
        setup = sparse_setup(method, copy.deepcopy(base), kind, budget, input_size, ranking(method))
        optimizer = torch.optim.SGD(setup.params, lr=1e-4)
        tuner = setup.model.base_model
        while not tuner.is_planned("default"):  # the automatic layer ranking's dense batches, if no ranking
            time_step(Entry(setup, optimizer, "step", device, precision), batch)
        for mode in ("step", "lean off", "floor"):
            entries[method if mode == "step" else f"{method} {mode}"] = Entry(setup, optimizer, mode, device, precision)
    return entries


# -- the floor -------------------------------------------------------------------------------------
@contextlib.contextmanager
def floor_of(peft_model: nn.Module) -> Iterator[None]:
    """The floor step on the wrapped model: base layers only, gradients from the lowest selected layer up."""
    tuner = peft_model.base_model
    layers, selection = tuner.medyate_layers(), tuner.selection()
    handles = []
    for name, layer in layers.items():
        layer._disable_adapters = True
        if name in selection:
            handles.append(layer.register_forward_pre_hook(_start_gradient))
            handles.append(layer.register_forward_hook(_compact_grad_hook(layer, selection[name])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            layer._disable_adapters = False


def _start_gradient(layer: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if not torch.is_grad_enabled() or x.requires_grad:
        return None
    return (x.detach().requires_grad_(), *args[1:])


def _compact_grad_hook(layer: nn.Module, idx: torch.Tensor) -> Callable:
    """After the layer's forward: keep x[:, S]; in backward compute dW[:, S] from it (and drop it)."""
    conv = isinstance(layer, MeDyateConv2d)
    spec = layer._spec() if conv else None

    def hook(module: nn.Module, args: tuple, y: torch.Tensor) -> None:
        x = args[0]
        x_sel = x.detach().index_select(1 if conv else -1, idx)

        def weight_grad(grad_y: torch.Tensor) -> None:
            if conv:
                padded = x_sel if spec.pads is None else F.pad(x_sel, spec.pads(x.shape), mode=spec.pad_mode)
                conv_channel_grad(padded, grad_y, spec, idx)
            else:
                x_sel.reshape(-1, x_sel.shape[-1]).t() @ grad_y.reshape(-1, grad_y.shape[-1])

        if y.requires_grad:
            y.register_hook(weight_grad)

    return hook


# -- timing ----------------------------------------------------------------------------------------
def time_step(entry: Entry, batch, clip: float = 1.0,
              profiler: contextlib.AbstractContextManager | None = None) -> tuple[float, float]:
    """(wall, thread CPU) seconds of one training step; switching the lean backward or the floor on happens
    outside the timing."""
    setup, optimizer = entry.setup, entry.optimizer
    setup.train_mode()
    lean_off = entry.mode != "step" and hasattr(setup.model, "base_model")
    with (lean_backward(setup.model, False) if lean_off else contextlib.nullcontext()), \
            (floor_of(setup.model) if entry.mode == "floor" else contextlib.nullcontext()), \
            (profiler or contextlib.nullcontext()):
        synchronize(entry.device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        with bench_common.autocast(entry.device, entry.precision):
            loss = bench_common.loss_of(setup.model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.params, clip)
        optimizer.step()
        synchronize(entry.device)  # a GPU step ends when its kernels do, not when they are queued
        return time.perf_counter() - start, time.thread_time() - start_cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_times(entry: Entry, batch) -> dict[str, float]:
    """Self CPU (+ self GPU, on a GPU) milliseconds per op name over one profiled step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if entry.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    time_step(entry, batch, profiler=prof)
    return {e.key: (e.self_cpu_time_total + getattr(e, "self_device_time_total", 0)) / 1000
            for e in prof.key_averages()}


def excess_ops(entry: Entry, floor: Entry, batch, top: int = 4, steps: int = 3) -> str:
    """The ops whose median self time over `steps` profiled steps (interleaved) most exceeds the floor's."""
    runs = [(op_times(entry, batch), op_times(floor, batch)) for _ in range(steps)]
    keys = {k for mine, base in runs for k in (*mine, *base)}
    diff = sorted(((statistics.median(m.get(k, 0.0) - b.get(k, 0.0) for m, b in runs), k) for k in keys), reverse=True)
    return ", ".join(f"`{k}` +{d:.1f} ms" for d, k in diff[:top] if d > 0)


def op_work(entry: Entry, batch) -> dict[str, list[int]]:
    with bench_common.OpWork() as counter:
        time_step(entry, batch)
    return counter.work


def excess_work(entry: Entry, floor: Entry, batch, top: int = 4) -> str:
    """The ops that write the most bytes beyond the floor's (calls beside), and the total written."""
    mine, base = op_work(entry, batch), op_work(floor, batch)
    diff = sorted(((mine.get(k, [0, 0])[1] - base.get(k, [0, 0])[1], k) for k in set(mine) | set(base)), reverse=True)
    total = sum(v[1] for v in mine.values()) / max(1, sum(v[1] for v in base.values()))
    listed = ", ".join(f"`{k}` +{d / 2**20:.0f} MiB ({mine.get(k, [0, 0])[0]} vs {base.get(k, [0, 0])[0]} calls)"
                       for d, k in diff[:top] if d > 0)
    return f"bytes written {total:.2f}x the floor's; {listed}"


def batch_size(batch) -> str:
    if isinstance(batch, dict):
        return f"{batch['input_ids'].shape[0]}x{batch['input_ids'].shape[1]} tokens"
    return f"{batch[0].shape[0]}x{batch[0].shape[-1]}x{batch[0].shape[-1]}"


def run_network(network: str, entries: dict[str, Entry], batch, rounds: int, warmup: int) -> list[dict]:
    first = next(iter(entries.values()))
    on_cpu = first.device.type == "cpu"  # the thread's CPU time is the work there; on a GPU the wall clock is
    walls: dict[str, list[float]] = {label: [] for label in entries}
    clocks: dict[str, list[float]] = {label: [] for label in entries}
    order = list(entries)
    rng = random.Random(0)
    for round_ in range(rounds + warmup):
        rng.shuffle(order)
        for label in order:
            wall, cpu = time_step(entries[label], batch)
            if round_ >= warmup:
                walls[label].append(wall)
                clocks[label].append(cpu if on_cpu else wall)
    rows = []
    for label in entries:
        ts, cs = walls[label], clocks[label]
        row = {"network": network, "method": label, "command": command(), "batch": batch_size(batch), "rounds": len(ts),
               "device": str(first.device), "precision": first.precision,
               "median_ms": 1000 * statistics.median(ts),
               "ratio_to_full": statistics.median(cs) / statistics.median(clocks["full"]),
               "ratio_to_lora": statistics.median(cs) / statistics.median(clocks["lora"]),
               "wall_ratio_to_lora": statistics.median(ts) / statistics.median(walls["lora"])}
        if on_cpu:
            row["median_cpu_ms"] = 1000 * statistics.median(cs)
        method = label.split()[0]
        if method in SPARSE:
            floor, floor_clock = walls[f"{method} floor"], clocks[f"{method} floor"]
            per_round = sorted(t / f for t, f in zip(cs, floor_clock, strict=True))
            row |= {"ratio_to_floor": statistics.median(cs) / statistics.median(floor_clock),
                    "wall_ratio_to_floor": statistics.median(ts) / statistics.median(floor),
                    "floor_round_p25": per_round[len(per_round) // 4],
                    "floor_round_p75": per_round[(3 * len(per_round)) // 4]}
            if label == method and row["ratio_to_floor"] > TARGET:
                row["excess_ops"] = excess_ops(entries[label], entries[f"{method} floor"], batch)
                row["excess_work"] = excess_work(entries[label], entries[f"{method} floor"], batch)
        rows.append(row)
        print(f"{network:<20} {first.precision} {label:<18} {1000 * statistics.median(cs):8.1f} ms  "
              f"/full {row['ratio_to_full']:.2f}  /floor {row.get('ratio_to_floor', float('nan')):.2f} "
              f"(wall {row.get('wall_ratio_to_floor', float('nan')):.2f})", flush=True)
    return rows


def command() -> str:
    return f"python scripts/bench_speed.py {' '.join(sys.argv[1:])}"


def where(device: torch.device, threads: int) -> str:
    """The machine line of the report: the CPU under load, or the GPU."""
    host = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} torch thread(s)"
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), {host} on the host; every step "
                "synchronised before its clock is read; bf16 rows: autocast (weights, gradients, optimizer fp32)")
    return (f"{host}, CPU only (no GPU run yet), measured on a shared 2-core machine (its load average per "
            "network in the last column): ratios of medians in one process are the numbers to read, absolute times "
            "are not. Ratios without a label are of the thread's CPU time (the work; the wall clock also counts "
            "waiting for a core, see the module docstring); *wall* ratios beside them. Rows whose CPU columns read "
            "— are kept from an earlier run (wall clock only, marked *previous*)")


def _allocators(rows: list[dict]) -> str:
    """Which rows ran with glibc keeping freed memory (`bench_common.keep_freed_memory`), which without."""
    kept = sorted({r["network"] for r in rows if r.get("allocator") == "kept"})
    system = sorted({r["network"] for r in rows if r.get("allocator") != "kept"})
    if not kept:
        return "Memory: the system allocator as it is."
    text = (f"Memory: glibc's malloc kept freed memory ({', '.join(kept)}), as a GPU's caching allocator does; "
            "with its defaults, page faults of freshly mapped memory doubled a vision forward's CPU time and moved "
            "a step's ratio to its floor by up to ±0.15 from run to run")
    return text + (f"; the system allocator as it is for {', '.join(system)}." if system else ".")


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(row[key]) if key in row else "—"


def _row(r: dict) -> str:
    """One table line; a row of an earlier run (wall clock only) is marked previous, its ratios in the wall columns."""
    previous = "wall_ratio_to_lora" not in r
    method = f"{r['method']} (previous)" if previous else r["method"]
    wall_floor = r.get("ratio_to_floor") if previous else r.get("wall_ratio_to_floor")
    wall_lora = r["ratio_to_lora"] if previous else r["wall_ratio_to_lora"]
    ratios = ["—"] * 3 if previous else [_cell(r, k) for k in ("ratio_to_full", "ratio_to_lora", "ratio_to_floor")]
    spread = "—" if previous or "ratio_to_floor" not in r else f"{r['floor_round_p25']:.2f}-{r['floor_round_p75']:.2f}"
    return (f"| {r['network']} | {r['batch']} | {r.get('precision', 'fp32')} | {method} | {r['rounds']} | "
            f"{_cell(r, 'median_cpu_ms', '{:.1f}')} | {r['median_ms']:.1f} | {ratios[0]} | {ratios[1]} | {wall_lora:.2f} | "
            f"{ratios[2]} | {'—' if wall_floor is None else f'{wall_floor:.2f}'} | {spread} | {r.get('load', '—')} |")


def write(rows: list[dict], args: argparse.Namespace, device: torch.device) -> None:
    """results/speed.{md,json} (speed_cuda.* on a GPU); with --keep-others, rows of networks (and precisions) not
    run now are kept from the last file."""
    stem = "speed" if device.type == "cpu" else "speed_cuda"
    if args.keep_others and (RESULTS / f"{stem}.json").exists():
        ran = {(r["network"], r.get("precision", "fp32")) for r in rows}
        kept = [r for r in json.loads((RESULTS / f"{stem}.json").read_text())
                if (r["network"], r.get("precision", "fp32")) not in ran]
        rows = kept + rows
    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines = [
        "# Step time against the floor (one process, interleaved rounds)", "",
        "Commands (one process per network group, each network's methods interleaved within it):", "",
        *[f"    {c}" for c in commands], "",
        f"{where(device, args.threads)}. {_allocators(rows)} Vision: one real cifar10 "
        "batch; transformers: random tokens (column *batch*). Timed rounds (column *rounds*) "
        f"after warm-up round(s); each round times one training step (forward, backward, clip, "
        "SGD step) of every method in a shuffled order. *lean off*: the same model stepped with plain autograd "
        "through the frozen path. *floor*: the same model's base layers with every weight frozen, gradients from "
        "the lowest selected layer up plus the compact weight gradients (module docstring). LoRA: r matched to "
        "the budget's weight slots over the pointwise convs / every Linear.", "",
        "| network | batch | precision | method | rounds | CPU ms | wall ms | / full FT | / LoRA | / LoRA wall "
        "| / its floor | / floor wall | per-round / floor p25-p75 | load |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(_row(r))
    held = [r for r in rows if r.get("excess_ops")]
    if held:
        lines += ["", f"## Above {TARGET:.2f}x the floor: where the extra time goes", "",
                  "Self time per op (on a GPU: + self GPU time), median over three profiled steps of the method minus "
                  "its floor's, interleaved (largest first; profiler times are wall clock, so read them as where, not "
                  "how much):", ""]
        lines += [f"- {r['network']} {r.get('precision', 'fp32')}, {r['method']} ({r['ratio_to_floor']:.2f}x"
                  f"{'' if 'wall_ratio_to_lora' in r else ', previous'}): {r['excess_ops']}" for r in held]
        worked = [r for r in held if r.get("excess_work")]
        lines += ["", "Bytes written per op in one step (a TorchDispatchMode: fresh outputs and in-place targets; "
                  "independent of the load), the method minus its floor (largest first):", ""]
        lines += [f"- {r['network']} {r.get('precision', 'fp32')}, {r['method']}: {r['excess_work']}" for r in worked]
        lines += ["", "The lean path's work per activation, op by op against plain autograd's and the alternatives "
                  "tried: `results/lean_ops.md` (`scripts/bench_lean_ops.py`)."]
    with atomic_write(RESULTS / f"{stem}.md") as handle:
        handle.write("\n".join(lines) + "\n")
    atomic_write_json(rows, RESULTS / f"{stem}.json", indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=SCRIPTS / "bench_configs" / "vision.yaml",
                        help="vision recipe (batch size, image size)")
    parser.add_argument("--networks", nargs="+", default=[*VISION_BUDGETS, *TEXT_NETWORKS])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per network")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark runs use 1)")
    parser.add_argument("--text-batch", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=128)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where to time (auto: cuda when torch sees a GPU); a GPU writes results/speed_cuda.*")
    parser.add_argument("--precisions", nargs="+", choices=bench_common.PRECISIONS, default=["fp32"],
                        help="fp32 and/or bf16 (autocast), each network timed in each")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the recorded rows of networks not run now (to run networks one process at a time)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave glibc's malloc as it is (default: it keeps freed memory, see the report)")
    args = parser.parse_args()
    allocator = "kept" if not args.system_allocator and bench_common.keep_freed_memory() else "system"
    torch.set_num_threads(args.threads)
    device = bench_common.run_device(args.device)
    recipe = yaml.safe_load(args.config.read_text())["recipe"]
    rows = []
    for network in args.networks:
        if network in TEXT_NETWORKS:
            base, kind, budget = text_network(network), "text", TEXT_BUDGET
            batch, input_size = text_batch(args.text_batch, args.text_length), [args.text_length]
            rankings = {"minilm": RANKINGS / "minilm__agnews.json"}
        else:
            base, _ = bench_common.load_network(network, bench_common.num_classes("cifar10"))
            kind, budget = "image", VISION_BUDGETS[network]
            task = bench_common.load_task("cifar10", {**recipe, "eval_size": recipe["batch_size"]},
                                          train_size=recipe["batch_size"])
            batch, input_size = task.measure_batch(recipe["batch_size"]), task.input_size
            rankings = {network: RANKINGS / f"{network}__caltech101.json"}
        path = rankings.get(network)
        base, batch = base.to(device), bench_common.to_device(batch, device)
        for precision in args.precisions:
            entries = entries_for(base, kind, budget, input_size,
                                  lambda method, p=path: p if p is not None and p.exists() else None, batch, device,
                                  precision)
            load_before = os.getloadavg()[0]
            ran = run_network(network, entries, batch, args.rounds, args.warmup)
            for row in ran:
                row["load"] = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
                row["allocator"] = allocator
            rows += ran
            del entries
            write(rows, args, device)
        del base


if __name__ == "__main__":
    main()
