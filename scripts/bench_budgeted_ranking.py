"""Layer ranking within the budget against dense rankings, on the shipped backbones (results/budgeted_ranking.md).

Usage: `python scripts/bench_budgeted_ranking.py [--budgets B,...] [network ...]` (--budgets: only
these budgets, in slots; the JSON keeps other rows). Per network, 2K disjoint training batches (batch
32; CIFAR-10 at 128x128 with the benchmark's random crops, or AG News padded to the 64 tokens the
budget counts), K the most slices of its budgets. Three dense rankings, all the tuner's
`ranking_mode='dense'` (frozen BatchNorm, only the head trained, SGD lr 0.01), read after every batch:
*same*, over the k batches the budgeted probe used; *other*, over the next k batches of the other
half (what a second dense run of that length gives); *ref*, over all 2K batches (the averaged dense
reference). The budgeted ranking is `rank_layers(budget_kb=...)` over the first half, one rotation (k
batches, every channel once). Compared: Spearman of LaRa and RGN over the layers the budget can train,
and the alpha-rule pools (alpha_opt 0.2): *diff.* layers in one pool and not the other, *swap* the
larger one-sided difference (1: one layer replaced by another).
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
from peft import get_peft_model

from medyate_peft import MeDyateConfig
from medyate_peft.budget import activation_slots_of_input, layer_cost
from medyate_peft.ranking import (
    GradientStats,
    _candidate_layers,
    candidate_shapes,
    default_loss,
    rank_layers,
    scores_for_costs,
    select_by_alpha,
    shipped_ranking,
)
from medyate_peft.sparse_probe import rotation

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python scripts/bench_budgeted_ranking.py"
NOTES = "## Notes"
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


def batches_of(task, count: int, batch_size: int, image_size: int) -> list:
    """`count` batches of distinct samples, in a fixed random order (images with random crops)."""
    if task.kind == "text":
        order = torch.randperm(len(task.train[1]), generator=torch.Generator().manual_seed(0)).tolist()
        return [task._text_batch(task.train, order[i * batch_size:(i + 1) * batch_size], pad_to=task.input_size[0])
                for i in range(count)]
    return list(task.train_batches(batch_size, torch.Generator().manual_seed(0), image_size))[:count]


def dense_prefixes(model, batches: list, loss_fn, lr: float) -> list[GradientStats]:
    """The tuner's dense probe over `batches`: its statistics after 1, 2, ... len(batches) of them.

    The probe counts a batch when the next forward starts, so its `stats` are read at each forward
    (and after one more forward, without backward, for the last batch).
    """
    config = MeDyateConfig(budget_kb=1024, strategy="medyate", ranking_mode="dense", use_shipped_ranking=False,
                           ranking_batches=len(batches) + 2)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    prefixes = []
    for step, batch in enumerate([*batches, batches[0]]):
        loss = loss_fn(peft_model, batch)
        if step:
            prefixes.append(GradientStats.from_state_dict(peft_model.base_model.plans["default"].probe.stats.state_dict()))
        if step == len(batches):
            break
        peft_model.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert [p.steps for p in prefixes] == list(range(1, len(batches) + 1)), "a dense batch was not measured"
    return prefixes


def compared(costs, names: list[str], a: tuple[dict, dict], b: tuple[dict, dict], budget: int) -> dict:
    """Spearman of LaRa and RGN (a and b are (lara, rgn)) over `names`, and their alpha-rule pools."""
    pa, pb = set(select_by_alpha(costs, a[0], budget, 0.2)), set(select_by_alpha(costs, b[0], budget, 0.2))
    return {"rho_lara": spearman([a[0][n] for n in names], [b[0][n] for n in names]),
            "rho_rgn": spearman([a[1][n] for n in names], [b[1][n] for n in names]),
            "diff": len(pa ^ pb), "swap": max(len(pa - pb), len(pb - pa)), "size": len(pb)}


def main(networks: list[str], only: set[int] | None = None) -> None:
    torch.set_num_threads(1)
    rows = []
    for network in networks or NETWORKS:
        dataset, suite, budgets = NETWORKS[network]
        budgets = [b for b in budgets if only is None or b in only]
        recipe = yaml.safe_load((REPO / "scripts" / "bench_configs" / f"{suite}.yaml").read_text())["recipe"]
        model, tokenizer = load_network(network, num_classes(dataset))
        batch_size, lr = recipe["batch_size"], recipe.get("ranking_lr", 0.01)
        probe_task = load_task(dataset, recipe, tokenizer, train_size=4 * batch_size)
        costs = costs_of(model, batches_of(probe_task, 1, batch_size, recipe.get("image_size", 128))[0])
        slices = {b: len(rotation(costs, b)) for b in budgets}
        half = max(slices.values())
        task = load_task(dataset, recipe, tokenizer, train_size=2 * half * batch_size)
        batches = batches_of(task, 2 * half, batch_size, recipe.get("image_size", 128))
        loss_fn = (lambda m, b: m(**b).loss) if task.kind == "text" else default_loss
        start = time.perf_counter()
        first, second = (dense_prefixes(model, part, loss_fn, lr) for part in (batches[:half], batches[half:]))
        dense_seconds = time.perf_counter() - start
        reference = copy.deepcopy(first[-1])
        reference.merge(second[-1])
        shipped = shipped_ranking(candidate_shapes(model))
        for budget in budgets:
            start = time.perf_counter()
            budgeted = rank_layers(model, batches[:half], steps=1, lr=lr, progress=False, budget_kb=budget * 4 / 1024,
                                   loss_fn=loss_fn)
            seconds = time.perf_counter() - start
            k = int(re.search(r"(\d+) training batch", budgeted["source"]).group(1))
            assert k == slices[budget], (k, slices[budget])
            left_out = [n for n, v in budgeted["lara"].items() if v == 0]  # no channel fits the budget
            names = [c.name for c in costs if c.name not in left_out]
            scores = {"budgeted": scores_for_costs(budgeted, costs),
                      **{label: scores_for_costs(stats.ranking(costs, label), costs) for label, stats in
                         (("same", first[k - 1]), ("other", second[k - 1]), ("ref", reference))}}
            if shipped is not None:
                scores["shipped"] = scores_for_costs(shipped, costs)

            pairs = [("budgeted", "same"), ("budgeted", "ref"), ("other", "same"), ("same", "ref"),
                     ("budgeted", "shipped")]
            rows.append({
                "network": network, "budget_slots": budget, "batches": k, "layers": len(names),
                "left_out": len(left_out), "source": budgeted["source"],
                **{f"{x}_vs_{y}": compared(costs, names, scores[x], scores[y], budget) for x, y in pairs if y in scores},
                "seconds_budgeted": seconds, "seconds_dense_per_batch": dense_seconds / (2 * half),
            })
            print(json.dumps(rows[-1]), flush=True)
    out = REPO / "results" / "budgeted_ranking.json"
    old = json.loads(out.read_text()) if out.exists() else []
    done = {(r["network"], r["budget_slots"]) for r in rows}
    keep = [r for r in old if (r["network"], r["budget_slots"]) not in done and "budgeted_vs_same" in r]
    order = {n: i for i, n in enumerate(NETWORKS)}
    merged = sorted(keep + rows, key=lambda r: (order[r["network"]], r["budget_slots"]))
    out.write_text(json.dumps(merged, indent=1) + "\n")
    write_markdown(merged)


def write_markdown(rows: list[dict]) -> None:
    def pool(r: dict, key: str) -> str:
        p = r.get(key)
        return "-" if p is None else f"{p['diff']} / {p['swap']}"

    lines = [
        "# Layer ranking within the budget against dense rankings", "",
        f"Command: `{COMMAND}` (torch {torch.__version__}, 1 thread; see the script's docstring).", "",
        "*budgeted*: `rank_layers(budget_kb=...)`, one rotation of stratified slices (k batches, every channel "
        "measured once, each layer's channels spread over min(channels, k) batches), the head trained with SGD "
        "lr 0.01. Dense rankings, all the tuner's `ranking_mode='dense'` (frozen BatchNorm, head-only SGD): "
        "*same* over the same k batches, *other* over k other batches (a second dense run of that length), "
        "*ref* over all 2K batches of both halves (the averaged dense reference). rho: Spearman of LaRa over "
        "the layers the budget can train; pools: alpha-rule pools (alpha_opt 0.2), `diff / swap` = layers in "
        "one pool and not the other / the larger one-sided count (1 = one layer replaced).", "",
        "| network | budget slots | k batches | pool size (ref) | rho budgeted vs same | rho RGN budgeted vs same | "
        "pools budgeted vs same | pools budgeted vs ref | pools dense other vs same | pools dense same vs ref | "
        "rho budgeted vs shipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shipped = r.get("budgeted_vs_shipped")
        lines.append(
            f"| {r['network']} | {r['budget_slots']:,} | {r['batches']} | {r['budgeted_vs_ref']['size']} | "
            f"{r['budgeted_vs_same']['rho_lara']:.3f} | {r['budgeted_vs_same']['rho_rgn']:.3f} | "
            f"{pool(r, 'budgeted_vs_same')} | {pool(r, 'budgeted_vs_ref')} | {pool(r, 'other_vs_same')} | "
            f"{pool(r, 'same_vs_ref')} | {'-' if shipped is None else format(shipped['rho_lara'], '.3f')} |")
    out = REPO / "results" / "budgeted_ranking.md"
    old = out.read_text() if out.exists() else ""
    if NOTES in old:  # the written reading of the numbers stays across re-runs
        lines += ["", old[old.index(NOTES):].rstrip()]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--markdown"]:
        write_markdown(json.loads((REPO / "results" / "budgeted_ranking.json").read_text()))
    else:
        only = None
        if "--budgets" in args:
            i = args.index("--budgets")
            only = {int(b) for b in args[i + 1].split(",")}
            args = args[:i] + args[i + 2:]
        main(args, only)
