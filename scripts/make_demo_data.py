"""Rebuild scripts/demo_data/cifar10/: a class-balanced CIFAR-10 subset for the offline demo.

    python scripts/make_demo_data.py --source ../shared/assets/data/cifar10

Takes `--train-per-class` / `--test-per-class` rows of every class, drawn at random (seeded) from
the official train / test parquet files, and writes them shuffled, with the source's schema (and
so its class names) and its JPEG bytes unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

OUTPUT = Path(__file__).resolve().parent / "demo_data" / "cifar10"


def balanced_rows(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` row indices of every label, drawn without replacement, then shuffled together."""
    picked = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise ValueError(f"class {label} has {len(rows)} rows, fewer than {per_class}")
        picked.append(rng.choice(rows, per_class, replace=False))
    return rng.permutation(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with CIFAR-10 train/test.parquet")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        table = pq.read_table(args.source / f"{split}.parquet")
        rows = balanced_rows(table.column("label").to_numpy(), per_class, rng)
        pq.write_table(table.take(rows), OUTPUT / f"{split}.parquet", compression="zstd")
        print(f"{split}: {len(rows)} rows ({per_class} per class) -> {OUTPUT / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
