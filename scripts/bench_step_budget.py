"""budget_scope="step" against the papers' accounting, measured on the shipped backbones (results/step_budget.md).

Usage: `python scripts/bench_step_budget.py [network ...]`. Per network and budget (the papers' for the
MCU nets, the benchmark's for EfficientNet-Lite0 and MiniLM), strategies medyate (the shipped ranking)
and full_random (channels anywhere, so the frozen path is nearly the whole network), one measured
training step (`memory_report`, batch 8; 128x128 images or 64 tokens), lean backward on. Per sample:
saved activations / batch + weight gradients + head gradients (plain SGD: no optimizer state).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from bench_common import load_network
from peft import get_peft_model

from medyate_peft import MeDyateConfig

REPO = Path(__file__).resolve().parents[1]
NETWORKS = {
    "mcunet-5fps": [15_936, 64_832, 112_640],
    "proxyless-w0.3": [25_984, 72_960, 101_376],
    "mbv2-w0.35": [27_946, 66_592, 93_696],
    "efficientnet-lite0": [129_388, 308_316, 433_796],
    "minilm": [262_144, 1_048_576],
}
BATCH = 8


def batch_for(network: str):
    torch.manual_seed(0)
    if network == "minilm":
        return [64], {"input_ids": torch.randint(1000, 5000, (BATCH, 64)), "attention_mask": torch.ones(BATCH, 64)}
    return [3, 128, 128], torch.randn(BATCH, 3, 128, 128)


def measure(network: str, budget: int, strategy: str, scope: str) -> dict:
    model, _ = load_network(network, 10)
    size, batch = batch_for(network)
    config = MeDyateConfig(budget_kb=budget * 4 / 1024, input_size=size, strategy=strategy, budget_scope=scope,
                           modules_to_save=["classifier"])
    tuner = get_peft_model(model, config).base_model
    report = tuner.memory_report(**batch, compare_lean=False) if isinstance(batch, dict) else \
        tuner.memory_report(batch, compare_lean=False)
    saved = (report.measured_selected_saved_bytes + report.measured_frozen_path_saved_bytes) / BATCH
    step_used = saved + report.measured_weight_grad_bytes_used + report.measured_head_grad_bytes
    step_allocated = saved + report.measured_weight_grad_bytes_allocated + report.measured_head_grad_bytes
    budget_bytes = budget * 4
    return {
        "network": network, "budget_slots": budget, "strategy": strategy, "scope": scope,
        "papers_kb": report.used_kb, "planned_step_kb": None if report.step_slots is None else report.step_slots * 4 / 1024,
        "selected_act_kb": report.measured_selected_saved_bytes / BATCH / 1024,
        "frozen_path_kb": report.measured_frozen_path_saved_bytes / BATCH / 1024,
        "w_grad_used_kb": report.measured_weight_grad_bytes_used / 1024,
        "w_grad_allocated_kb": report.measured_weight_grad_bytes_allocated / 1024,
        "head_grad_kb": report.measured_head_grad_bytes / 1024,
        "step_used_over_budget": step_used / budget_bytes, "step_allocated_over_budget": step_allocated / budget_bytes,
    }


def main(networks: list[str]) -> None:
    torch.set_num_threads(1)
    out = REPO / "results" / "step_budget.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    for network in networks or NETWORKS:
        rows = [r for r in rows if r["network"] != network]
        for budget in NETWORKS[network]:
            for strategy in ("medyate", "full_random"):
                for scope in ("selection", "step"):
                    rows.append(measure(network, budget, strategy, scope))
                    print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    write_markdown(rows)


def write_markdown(rows: list[dict]) -> None:
    lines = [
        "# budget_scope='step': the whole training step within the budget", "",
        f"Command: `python scripts/bench_step_budget.py` (torch {torch.__version__}, 1 thread; one measured step "
        f"of batch {BATCH}, 128x128 images or 64 tokens, lean backward on, plain SGD: no optimizer state; "
        "strategies medyate, with the shipped ranking, and full_random, channels anywhere)",
        "", "Per sample, KiB. *papers*: the papers' slots of the selection; *planned*: what the step scope charged "
        "(head gradients + frozen path below the lowest trained layer + channels); measured: *sel. act.* "
        "(x[:, S]), *frozen* (every other saved byte: masks, recomputation inputs, the head's input), "
        "*W used* (the selection's weight-gradient slots), *W alloc.* (the flat gradient vector this "
        "version allocates: the whole budget, until the vector follows the selection), *head* (head "
        "gradients). *step/budget* = (sel. act. + frozen + W used + head) / budget; *alloc./budget* the same "
        "with W alloc.", "",
        "| network | budget slots | strategy | scope | papers | planned | sel. act. | frozen | W used | W alloc. "
        "| head | step/budget | alloc./budget |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        planned = "-" if r["planned_step_kb"] is None else f"{r['planned_step_kb']:.1f}"
        lines.append(
            f"| {r['network']} | {r['budget_slots']:,} | {r['strategy']} | {r['scope']} | {r['papers_kb']:.1f} | "
            f"{planned} | {r['selected_act_kb']:.1f} | {r['frozen_path_kb']:.1f} | {r['w_grad_used_kb']:.1f} | "
            f"{r['w_grad_allocated_kb']:.1f} | {r['head_grad_kb']:.1f} | {r['step_used_over_budget']:.3f} | "
            f"{r['step_allocated_over_budget']:.3f} |")
    (REPO / "results" / "step_budget.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        write_markdown(json.loads((REPO / "results" / "step_budget.json").read_text()))
    else:
        main(sys.argv[1:])
