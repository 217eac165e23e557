"""Layer ranking within the budget against the dense one, on the shipped backbones (results/budgeted_ranking.md).

Usage: `python scripts/bench_budgeted_ranking.py [network ...]`. The dense reference is the shipped
ranking (medyate_peft/rankings/, made by scripts/make_shipped_rankings.py: 50 dense SGD steps, lr 0.01,
batch 32, on CIFAR-10 at 128x128 or AG News). The budgeted ranking sees the same batch sequence (cycled
until every channel was measured once per rotation; text padded to the 64 tokens the budget counts)
with `rank_layers(budget_kb=...)` at each budget of the benchmark (the papers' for the MCU nets), the
classifier trained with SGD lr 0.01. Compared: Spearman of LaRa and of RGN over all layers (scores
re-normalised to the same costs), and the alpha-rule pool (alpha_opt 0.2) of each ranking at that budget.
"""

from __future__ import annotations

import json
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


def main(networks: list[str]) -> None:
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
        for budget in budgets:
            start = time.perf_counter()
            kwargs = {"loss_fn": loss_fn} if loss_fn else {}
            budgeted = rank_layers(model, batches, steps=1, lr=recipe.get("ranking_lr", 0.01), progress=False,
                                   budget_kb=budget * 4 / 1024, **kwargs)
            seconds = time.perf_counter() - start
            lara, rgn = scores_for_costs(budgeted, costs)
            left_out = [n for n, v in budgeted["lara"].items() if v == 0]  # no channel fits the budget
            names = [c.name for c in costs if c.name not in left_out]
            rho_lara = spearman([dense_lara[n] for n in names], [lara[n] for n in names])
            rho_rgn = spearman([dense_rgn[n] for n in names], [rgn[n] for n in names])
            pool_dense = select_by_alpha(costs, dense_lara, budget, 0.2)
            pool_budgeted = select_by_alpha(costs, lara, budget, 0.2)
            rows.append({
                "network": network, "budget_slots": budget, "layers": len(names), "left_out": len(left_out), "batches": budgeted["source"],
                "spearman_lara": rho_lara, "spearman_rgn": rho_rgn, "pool_dense": len(pool_dense),
                "pool_budgeted": len(pool_budgeted), "pool_difference": pool_difference(pool_dense, pool_budgeted),
                "seconds": seconds,
            })
            print(json.dumps(rows[-1]), flush=True)
    out = REPO / "results" / "budgeted_ranking.json"
    old = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in old if (r["network"], r["budget_slots"]) not in {(x["network"], x["budget_slots"]) for x in rows}]
    out.write_text(json.dumps(keep + rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
