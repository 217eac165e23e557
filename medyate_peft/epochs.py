"""Noticing an epoch that went by without `resample()`: the training data came round again.

MeDyate draws new channels at every epoch boundary (`resample()`; MeDyateCallback calls it under the
Trainer). A hand-written loop that forgets it keeps training the same channels. The tuner never sees
the data loader, so it recognises samples instead: each training batch's main input is fingerprinted
per sample (its values at up to 256 fixed positions), and when more than half of a batch's samples
were already seen since the last `resample()`, the data has come round once. Two hashes into a fixed
table of 4 Mi flags keep the memory flat (4 MB) whatever the dataset size. A sample that differs at
every epoch (random augmentation) is not recognised, and then nothing is said.
"""

from __future__ import annotations

import torch

_POSITIONS = 256
_MULTIPLIERS = (0x9E3779B97F4A7C15 - (1 << 64), 0xC2B2AE3D27D4EB4F - (1 << 64))  # as signed int64


class EpochWatch:
    """Per-sample fingerprints of the training batches seen since the last reset."""

    def __init__(self, flags: int = 1 << 22) -> None:
        self.seen = torch.zeros(flags, dtype=torch.bool)
        self.batches = 0
        self._probes: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        self.seen.zero_()
        self.batches = 0

    def came_round(self, batch: torch.Tensor) -> bool:
        """Record one training batch; True if most of its samples were already seen since the last reset."""
        self.batches += 1
        if batch.dim() == 0 or batch.shape[0] == 0 or batch.is_meta:
            return False
        slots = self._slots(batch)
        before = self.seen[slots].all(dim=1)
        self.seen[slots.flatten()] = True
        return bool(before.float().mean() > 0.5)

    def _slots(self, batch: torch.Tensor) -> torch.Tensor:
        """Two table indices per sample, from its values at fixed positions (on the CPU, (N, 2))."""
        flat = batch.detach().reshape(batch.shape[0], -1)
        positions, weights = self._probe(flat.shape[1], flat.device)
        fingerprint = (flat[:, positions].to(torch.float64) @ weights).view(torch.int64)
        mixed = fingerprint ^ (fingerprint >> 29)
        slots = torch.stack([torch.remainder(mixed * m, len(self.seen)) for m in _MULTIPLIERS], dim=1)
        return slots.cpu()

    def _probe(self, features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (features, device)
        if key not in self._probes:
            generator = torch.Generator().manual_seed(features)
            positions = torch.randperm(features, generator=generator)[:_POSITIONS]
            weights = torch.rand(len(positions), generator=generator, dtype=torch.float64) + 0.5
            self._probes[key] = positions.to(device), weights.to(device)
        return self._probes[key]
