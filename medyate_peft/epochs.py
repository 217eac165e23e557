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
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


CHECK_EVERY = {"cpu": 1}  # batches between host reads of the verdict, per device type
DEVICE_CHECK_EVERY = 32  # other device types (CUDA, ...): one wait for the device per 32 batches


class EpochWatch:
    """Per-sample fingerprints of the training batches seen since the last reset.

    Fingerprints, table and verdict stay on the batch's device; the verdict is read on the host (a wait
    for the device) every batch on the CPU, where that costs nothing, and every `DEVICE_CHECK_EVERY`
    batches elsewhere, so on a GPU the warning may come up to that many batches late.
    """

    def __init__(self, flags: int = 1 << 22) -> None:
        self.seen = torch.zeros(flags, dtype=torch.bool)
        self.batches = 0
        self._probes: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._verdict: tuple[torch.Tensor, torch.Tensor] | None = None  # (came round, batches before it)

    def reset(self) -> None:
        self.seen.zero_()
        self.batches = 0
        self._verdict = None

    def observe(self, batch: torch.Tensor) -> int | None:
        """Record one training batch. Returns, when a check finds it, how many batches went by before one
        whose samples were mostly seen already since the last reset (else None)."""
        self.batches += 1
        if batch.dim() == 0 or batch.shape[0] == 0 or batch.is_meta:
            return None
        if self.seen.device != batch.device:
            self.seen = self.seen.to(batch.device)
        slots = self._slots(batch)
        now = self.seen[slots].all(dim=1).float().mean() > 0.5
        self.seen[slots.flatten()] = True
        if self._verdict is None:
            self._verdict = (now, torch.zeros((), dtype=torch.long, device=batch.device))
        came, at = self._verdict
        self._verdict = came | now, torch.where(came, at, self.batches)  # the batch number it first came round at
        if self.batches % CHECK_EVERY.get(batch.device.type, DEVICE_CHECK_EVERY):
            return None
        return self.check()

    def check(self) -> int | None:
        """Read the verdict on the host (one wait for the device): the batches before the first that came round."""
        if self._verdict is None or not bool(self._verdict[0]):
            return None
        return int(self._verdict[1]) - 1

    def _slots(self, batch: torch.Tensor) -> torch.Tensor:
        """Two table indices per sample, from its values at fixed positions (on the batch's device, (N, 2))."""
        flat = batch.detach().reshape(batch.shape[0], -1)
        positions, weights = self._probe(flat.shape[1], flat.device)
        fingerprint = (_as_integers(flat[:, positions]) * weights).sum(dim=1)  # wraps: a hash, integer ops only
        mixed = fingerprint ^ (fingerprint >> 29)
        return torch.stack([torch.remainder(mixed * m, len(self.seen)) for m in _MULTIPLIERS], dim=1)

    def _probe(self, features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (features, device)
        if key not in self._probes:
            generator = torch.Generator().manual_seed(features)
            positions = torch.randperm(features, generator=generator)[:_POSITIONS]
            weights = torch.randint(-(1 << 62), 1 << 62, (len(positions),), generator=generator) | 1  # odd
            self._probes[key] = positions.to(device), weights.to(device)
        return self._probes[key]


def _as_integers(values: torch.Tensor) -> torch.Tensor:
    """Each value's bits as an int64 (floats read as same-width integers): no float64, which MPS lacks."""
    if values.is_floating_point():
        values = values.contiguous().view(_SAME_WIDTH_INT[values.element_size()])
    return values.to(torch.int64)
