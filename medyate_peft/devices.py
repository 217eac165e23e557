"""What the accelerators the tuner runs on can compute: Apple's MPS has no float64."""

from __future__ import annotations

import torch


def wide_float(device: torch.device) -> torch.dtype:
    """The float that sums kept on a device accumulate in: float64 where the device has it, else float32 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64
