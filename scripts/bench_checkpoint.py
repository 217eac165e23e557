"""A benchmark run's checkpoint: what `bench_common.run_one` needs to continue a run exactly.

One file per run (`results/checkpoints/<run id>.pt`), replaced atomically (medyate_peft.atomic): a
run killed while saving leaves the previous checkpoint, never a half-written one. It is removed once
the run's record is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medyate_peft.atomic import atomic_save

FORMAT = 1
# May differ between the pieces of one run: they change where and how fast it runs, not what it trains.
FREE_KEYS = ("threads", "device")


def _identity(spec: dict) -> dict:
    """What must not change within a run; the ranking by file name (the checkout may move between machines)."""
    identity = {k: v for k, v in spec.items() if k not in FREE_KEYS}
    if identity.get("ranking_path"):
        identity["ranking_path"] = Path(identity["ranking_path"]).name
    return identity


def save(path: Path, spec: dict, state: dict[str, Any]) -> None:
    atomic_save({"format": FORMAT, "spec": _identity(spec), **state}, path)


def load(path: Path, spec: dict) -> dict[str, Any] | None:
    """The checkpoint of `spec`'s run at `path`, or None if there is none; one clear error if it does not fit."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle: a damaged file
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}); delete it to "
                         "start this run over") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a format-{FORMAT} benchmark checkpoint; delete it to start this "
                         "run over")
    saved, wanted = state["spec"], _identity(spec)
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if changed:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {wanted.get(k)!r}" for k in changed)
        raise ValueError(f"checkpoint {path} belongs to another version of this run ({details}); restore the "
                         "config it was made with, or delete the checkpoint to start the run over")
    return state
