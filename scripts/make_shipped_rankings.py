"""Make the layer rankings that ship with the package (medyate_peft/rankings/), one per shipped backbone.

Usage: `python scripts/make_shipped_rankings.py [network ...]`. The benchmark's recipe: 50 dense SGD
steps (lr 0.01, batch 32) on CIFAR-10 (vision, 128x128) or AG News (text). A ranking depends on the
architecture, not on the dataset (spec section 3); the tuner re-normalises it to the input
resolution it trains at and takes it for exactly the layer names and shapes it was made on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from bench_common import make_ranking

from medyate_peft.ranking import load_ranking

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "medyate_peft" / "rankings"
NETWORKS = {
    "mcunet-5fps": ("cifar10", "vision"),
    "proxyless-w0.3": ("cifar10", "vision"),
    "mbv2-w0.35": ("cifar10", "vision"),
    "efficientnet-lite0": ("cifar10", "vision"),
    "minilm": ("agnews", "text"),
}


def main(networks: list[str]) -> None:
    for network in networks or NETWORKS:
        dataset, suite = NETWORKS[network]
        recipe = yaml.safe_load((REPO / "scripts" / "bench_configs" / f"{suite}.yaml").read_text())["recipe"]
        path = OUT / f"{network}.json"
        make_ranking(network, dataset, recipe, recipe["ranking_steps"], path)
        ranking = load_ranking(path)
        print(f"{path.name}: {len(ranking['lara'])} layers, fingerprint {ranking['fingerprint']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
