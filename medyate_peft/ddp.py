"""DDP ranks must draw identical channels; ranks that disagree are caught instead of diverging.

Every rank maps its own selection onto the flat trainable vector, whose gradient the tuner
averages over ranks, so ranks built with different seeds or configs would mix gradients of different
channels (or all-reduce payloads of different sizes). At the first backward after each draw and at
each `resample()` (both collective steps) the ranks exchange a fingerprint of what decides the
selection and all raise the same error, naming what differs, if they disagree.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .planner import AdapterPlan

# Config fields that change which channels are drawn (their values are compared and shown).
SELECTION_FIELDS = (
    "budget_kb", "bytes_per_slot", "strategy", "seed", "input_size", "target_modules", "exclude_modules",
    "layer_ranking", "alpha_opt", "rgn_coverage", "lara_within_rgn", "max_activation_share", "draw_weights",
    "rescale_norms", "resample_every", "full_gradient_batches",
)
_SHOWN_CHARS = 60


def _canonical(value: Any) -> Any:
    """JSON-ready and independent of set order and hash seed (PEFT turns long target lists into sets)."""
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=_json)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _digest(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().numpy().tobytes()
    else:
        data = _json(_canonical(value)).encode()
    return hashlib.sha256(data).hexdigest()[:12]


def _shown(value: Any) -> str:
    text = _json(_canonical(value))
    return text if len(text) <= _SHOWN_CHARS else f"<digest {_digest(value)}>"


def fingerprint(config: Any, plan: AdapterPlan) -> dict[str, str]:
    """What must be equal on every rank: the config's `SELECTION_FIELDS`, epoch, pool, norms, RNG, selection."""
    out = {name: _shown(getattr(config, name)) for name in SELECTION_FIELDS}
    out["epoch"] = str(plan.epoch)
    out["random state"] = _digest(plan.generator.get_state())
    out["selected channels"] = _digest(plan.selected)
    if plan.pool is not None:
        out["channel pool"] = _digest([(c.name, c.in_channels, c.channel_slots) for c in plan.pool.costs])
        out["channel norms"] = _digest(plan.tracker.norms)
    return out


def check_ranks_agree(local: dict[str, str], when: str) -> None:
    """Under torch.distributed: raise on every rank, naming the differing entries, if ranks disagree."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    differing = [key for key in local if len({str(g.get(key)) for g in gathered}) > 1]
    if not differing:
        return
    details = "; ".join(
        f"{key}: " + ", ".join(f"rank {rank}={g.get(key)}" for rank, g in enumerate(gathered)) for key in differing
    )
    raise RuntimeError(
        f"MeDyate: DDP ranks disagree at {when} on {', '.join(differing)} ({details}). Every rank must be "
        "built with the same MeDyateConfig (same seed) and resumed from the same checkpoint; otherwise the "
        "ranks train different channels through one shared vector and silently diverge."
    )
