"""Which layers and channels TraDy and MeDyate train at each benchmark budget (planning only, no training).

    .venv/bin/python scripts/bench_pools.py scripts/bench_configs/vision.yaml

For every vision cell of the config whose layer ranking exists in results/rankings/, plans both
strategies as the benchmark does and writes results/pools.md and results/pools.json: the layer pool
(TraDy: 97 % of cumulative RGN; MeDyate: the alpha rule), the earliest block it reaches, and how the
epoch-1 draw splits the budget between weight-gradient slots and stored-activation slots. It explains
part of the accuracy differences: slots spent on early, high-resolution activations train no weights.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml
from peft import get_peft_model

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402  (also registers the MEDYATE peft type)
from benchmark import RANKINGS, RESULTS  # noqa: E402

from medyate_peft.atomic import atomic_write, atomic_write_json  # noqa: E402

STRATEGIES = ("trady", "medyate")


def _block(name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match[1]) if match else None


def plan_row(network: str, dataset: str, budget: int, strategy: str, ranking: Path, image_size: int) -> dict:
    model, _ = bench_common.load_network(network, bench_common.num_classes(dataset))
    spec = {"method": strategy, "budget_slots": budget, "seed": 0, "ranking_path": str(ranking)}
    tuner = get_peft_model(model, bench_common.medyate_config(spec, [3, image_size, image_size])).base_model
    pool = tuner.plans["default"].pool.costs
    selection = tuner.selection()
    drawn = {c.name: len(selection.get(c.name, ())) for c in pool}
    weights = sum(n * c.weight_slots for c, n in zip(pool, drawn.values(), strict=True))
    activations = sum(n * c.activation_slots for c, n in zip(pool, drawn.values(), strict=True))
    blocks = [b for b in map(_block, (c.name for c in pool)) if b is not None]
    return {
        "network": network, "dataset": dataset, "budget_slots": budget, "strategy": strategy,
        "pool_layers": len(pool), "earliest_block": min(blocks) if blocks else None,
        "channels_drawn": sum(drawn.values()), "weight_slots": weights, "activation_slots": activations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a vision suite config (scripts/bench_configs/vision.yaml)")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    rows = []
    for cell in config["cells"]:
        source = config["ranking_dataset"][cell["dataset"]]
        ranking = RANKINGS / f"{cell['network']}__{source}.json"
        if not ranking.exists():
            print(f"skip {cell['network']} / {cell['dataset']}: no {ranking.name}")
            continue
        for budget in cell["budgets"]:
            for strategy in STRATEGIES:
                rows.append(plan_row(cell["network"], cell["dataset"], budget, strategy, ranking,
                                     config["recipe"]["image_size"]))
    lines = [
        "# Layer pools and the epoch-1 draw of TraDy and MeDyate at the benchmark budgets", "",
        f"Command: `python scripts/bench_pools.py {args.config}` (planning only; seed 0; rankings from "
        "`results/rankings/`).", "",
        "| network / dataset | budget | strategy | pool layers | earliest block | channels drawn | "
        "weight slots | activation slots | activation share |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        used = r["weight_slots"] + r["activation_slots"]
        lines.append(
            f"| {r['network']} / {r['dataset']} | {r['budget_slots']:,} | {r['strategy']} | {r['pool_layers']} | "
            f"{'-' if r['earliest_block'] is None else r['earliest_block']} | {r['channels_drawn']:,} | "
            f"{r['weight_slots']:,} | {r['activation_slots']:,} | {r['activation_slots'] / used:.0%} |"
        )
    with atomic_write(RESULTS / "pools.md") as handle:
        handle.write("\n".join(lines) + "\n")
    atomic_write_json(rows, RESULTS / "pools.json", indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
