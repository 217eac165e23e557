"""Layer ranking within the budget against the dense one, on the shipped backbones (results/budgeted_ranking.md).

Usage: `python scripts/bench_budgeted_ranking.py [--smallest] [--no-dense-probe] [network ...]`
(--smallest: each network's smallest budget only, the most slices; --no-dense-probe: only against
the shipped ranking). The dense reference is the shipped
ranking (medyate_peft/rankings/, made by scripts/make_shipped_rankings.py: 50 dense SGD steps, lr 0.01,
batch 32, on CIFAR-10 at 128x128 or AG News). The budgeted ranking sees the same batch sequence (cycled
until every channel was measured once per rotation; text padded to the 64 tokens the budget counts)
with `rank_layers(budget_kb=...)` at each budget of the benchmark (the papers' for the MCU nets), the
classifier trained with SGD lr 0.01. Compared: Spearman of LaRa and of RGN over all layers (scores
re-normalised to the same costs), and the alpha-rule pool (alpha_opt 0.2) of each ranking at that budget.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
import yaml
from bench_common import load_network, load_task, num_classes

from medyate_peft.budget import activation_slots_of_input, layer_cost
from medyate_peft.ranking import (
    _candidate_layers,
    candidate_shapes,
    default_loss,
    rank_in_tuner,
    rank_layers,
    scores_for_costs,
    select_by_alpha,
    shipped_ranking,
)

REPO = Path(__file__).resolve().parents[1]
NETWORKS = {  # dataset, suite, budgets (slots)
    "mcunet-5fps": ("cifar10", "vision", [15_936, 64_832, 112_640]),
    "proxyless-w0.3": ("cifar10", "vision", [25_984, 72_960, 101_376]),
    "mbv2-w0.35": ("cifar10", "vision", [27_946, 66_592, 93_696]),
    "efficientnet-lite0": ("cifar10", "vision", [129_388, 308_316, 433_796]),
    "minilm": ("agnews", "text", [262_144, 1_048_576]),
}


def costs_of(model, batch):
    layers = _candidate_layers(model)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, activation_slots_of_input(m, a[0])))
             for n, m in layers.items()]
    with torch.no_grad():
        model.eval()
        model(**batch) if isinstance(batch, dict) else model(batch[0])
    for h in hooks:
        h.remove()
    return [layer_cost(n, m, seen[n]) for n, m in layers.items() if n in seen]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (scores here have no ties)."""
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pool_difference(a: list[str], b: list[str]) -> int:
    return len(set(a) ^ set(b))


def main(networks: list[str], smallest: bool = False, dense_probe: bool = True) -> None:
    torch.set_num_threads(1)
    rows = []
    for network in networks or NETWORKS:
        dataset, suite, budgets = NETWORKS[network]
        recipe = yaml.safe_load((REPO / "scripts" / "bench_configs" / f"{suite}.yaml").read_text())["recipe"]
        model, tokenizer = load_network(network, num_classes(dataset))
        dense = shipped_ranking(candidate_shapes(model))
        steps, batch_size = recipe["ranking_steps"], recipe["batch_size"]
        task = load_task(dataset, recipe, tokenizer, train_size=min(steps * batch_size, recipe.get("ranking_size")))
        g = torch.Generator().manual_seed(0)
        batches = []
        while len(batches) < steps:
            batches += list(task.train_batches(batch_size, g, recipe.get("image_size", 128)))
        batches = batches[:steps]
        if task.kind == "text":
            batches = [task._text_batch(task.train, list(range(i * batch_size, (i + 1) * batch_size)),
                                        pad_to=task.input_size[0]) for i in range(steps)]

            def loss_fn(m, b):
                return m(**b).loss
        else:
            loss_fn = None
        costs = costs_of(model, batches[0])
        dense_lara, dense_rgn = scores_for_costs(dense, costs)
        for budget in budgets[:1] if smallest else budgets:
            start = time.perf_counter()
            kwargs = {"loss_fn": loss_fn} if loss_fn else {}
            budgeted = rank_layers(model, batches, steps=1, lr=recipe.get("ranking_lr", 0.01), progress=False,
                                   budget_kb=budget * 4 / 1024, **kwargs)
            seconds = time.perf_counter() - start
            lara, rgn = scores_for_costs(budgeted, costs)
            # the same estimation, dense: the tuner's dense probe over the same batches (frozen BatchNorm,
            # head-only SGD), every layer measured on every batch
            probe_batches = int(re.search(r"(\d+) training batch", budgeted["source"]).group(1))
            if dense_probe:
                in_tuner = rank_in_tuner(copy.deepcopy(model), batches, probe_batches, loss_fn or default_loss,
                                         recipe.get("ranking_lr", 0.01), False, budget * 4 / 1024, mode="dense")
                tuner_lara, tuner_rgn = scores_for_costs(in_tuner, costs)
            left_out = [n for n, v in budgeted["lara"].items() if v == 0]  # no channel fits the budget
            names = [c.name for c in costs if c.name not in left_out]
            rho_lara = spearman([dense_lara[n] for n in names], [lara[n] for n in names])
            rho_rgn = spearman([dense_rgn[n] for n in names], [rgn[n] for n in names])
            pool_dense = select_by_alpha(costs, dense_lara, budget, 0.2)
            pool_budgeted = select_by_alpha(costs, lara, budget, 0.2)
            pool_tuner = select_by_alpha(costs, tuner_lara, budget, 0.2) if dense_probe else None
            rows.append({
                "network": network, "budget_slots": budget, "layers": len(names), "left_out": len(left_out), "batches": budgeted["source"],
                "spearman_lara": rho_lara, "spearman_rgn": rho_rgn, "pool_dense": len(pool_dense),
                "pool_budgeted": len(pool_budgeted), "pool_difference": pool_difference(pool_dense, pool_budgeted),
                **({
                    "spearman_lara_vs_dense_probe": spearman([tuner_lara[n] for n in names], [lara[n] for n in names]),
                    "spearman_rgn_vs_dense_probe": spearman([tuner_rgn[n] for n in names], [rgn[n] for n in names]),
                    "pool_dense_probe": len(pool_tuner),
                    "pool_difference_vs_dense_probe": pool_difference(pool_tuner, pool_budgeted),
                    "spearman_lara_dense_probe_vs_shipped": spearman([dense_lara[n] for n in names],
                                                                     [tuner_lara[n] for n in names]),
                } if dense_probe else {}),
                "seconds": seconds,
            })
            print(json.dumps(rows[-1]), flush=True)
    out = REPO / "results" / "budgeted_ranking.json"
    old = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in old if (r["network"], r["budget_slots"]) not in {(x["network"], x["budget_slots"]) for x in rows}]
    out.write_text(json.dumps(keep + rows, indent=1) + "\n")
    write_markdown(keep + rows)


def write_markdown(rows: list[dict]) -> None:
    lines = [
        "# Layer ranking within the budget against the dense ranking", "",
        "Command: `python scripts/bench_budgeted_ranking.py [network ...]` (torch "
        f"{torch.__version__}, 1 thread; batch 32, CIFAR-10 at 128x128 or AG News padded to 64 tokens).", "",
        "*budgeted*: `rank_layers(budget_kb=...)`, one batch per budget-sized slice of channels, every channel "
        "measured once (one rotation), the head trained with SGD lr 0.01. Two dense references: *dense probe*, "
        "the tuner's `ranking_mode='dense'` over the same batches (same frozen BatchNorm, same head training, "
        "every layer measured on every batch: the estimator's own difference), and *shipped*, the shipped "
        "ranking (`rank_layers`: 50 dense SGD steps, lr 0.01, all weights trained, BatchNorm in train mode). "
        "rho: Spearman over the layers the budget can train (*left out*: a layer with one channel larger than "
        "the budget ranks last); *pool diff.*: layers in one alpha-rule pool (alpha_opt 0.2) and not the "
        "other.", "",
        "| network | budget slots | batches | left out | rho LaRa vs dense probe | rho RGN vs dense probe | "
        "pool diff. vs dense probe | rho LaRa vs shipped | rho RGN vs shipped | pool diff. vs shipped | "
        "rho LaRa dense probe vs shipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        batches = re.search(r"(\d+) training batch", r["batches"]).group(1)
        probe = (f"{r['spearman_lara_vs_dense_probe']:.3f} | {r['spearman_rgn_vs_dense_probe']:.3f} | "
                 f"{r['pool_difference_vs_dense_probe']} of {r['pool_dense_probe']}"
                 if "pool_dense_probe" in r else "- | - | -")
        versus = f"{r['spearman_lara_dense_probe_vs_shipped']:.3f}" if "pool_dense_probe" in r else "-"
        lines.append(
            f"| {r['network']} | {r['budget_slots']:,} | {batches} | {r['left_out']} | {probe} | "
            f"{r['spearman_lara']:.3f} | {r['spearman_rgn']:.3f} | {r['pool_difference']} of {r['pool_dense']} | "
            f"{versus} |")
    lines += [
        "", "-: not measured against the dense probe (those rows come from an earlier run of this script, "
        "before that reference was added; the 2-core machine had no time left for the rest).", "",
        "Reading: against the dense probe of the same batches the budgeted estimate keeps Spearman >= 0.9 "
        "(LaRa 0.91-0.99, RGN 0.98-0.99) but the alpha-rule pool moves by 2-6 layers: the pool's edge is decided "
        "by layers whose LaRa differ by less than one batch's noise, and the budgeted estimate has one "
        "measurement per layer where the dense one has one per batch (more rotations, "
        "`ranking_batches`, average it down). The shipped rankings differ from both on EfficientNet-Lite0 "
        "(rho 0.61-0.74) because `rank_layers` trains every weight with BatchNorm in train mode; the two "
        "in-tuner measurements agree with each other.",
    ]
    (REPO / "results" / "budgeted_ranking.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        write_markdown(json.loads((REPO / "results" / "budgeted_ranking.json").read_text()))
    else:
        flags = ("--smallest", "--no-dense-probe")
        main([a for a in sys.argv[1:] if a not in flags], smallest="--smallest" in sys.argv,
             dense_probe="--no-dense-probe" not in sys.argv)
