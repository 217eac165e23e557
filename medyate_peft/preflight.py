"""What `medyate train` checks before its first step, so that no epoch is lost to a late failure.

An unlabeled or empty evaluation split, a read-only output folder or a full disk would otherwise
show only after a whole epoch of training (at the first evaluation or checkpoint). A dry
evaluation batch runs the evaluation path once on two samples.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_MIB = 2**20
_SLACK_BYTES = 16 * _MIB  # model card, configs, file system overhead
LOCK_FILE = ".medyate-train.lock"


def check_output_dir(folder: Path) -> list[Path]:
    """Create the output folder and write a file there, so a read-only or missing parent fails now.

    Returns the folders this call created, deepest first (empty if `folder` existed)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        _remove_if_empty(missing)
        raise OSError(err.errno, f"--output-dir {folder} is not writable ({err.strerror}); pick a folder you can "
                      "write to") from err
    return missing


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, as long as nothing is in them (`rmdir`
    cannot delete content: what the run wrote, or anyone else put there meanwhile, stays)."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold `folder/.medyate-train.lock` for the run: a second run started into the same folder meanwhile
    would write its checkpoints among this one's. Only rank 0 of a distributed run takes it.

    A run that fails leaves no trace of its own: the lock file it created and the folders it created
    go, unless something was written into them."""
    created = check_output_dir(folder)
    if int(os.environ.get("RANK", "0")) != 0:
        try:
            yield
        except BaseException:
            _remove_if_empty(created)
            raise
        return
    lock = folder / LOCK_FILE
    new_lock = not lock.exists()
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another medyate train run is writing into --output-dir {folder} (it holds {LOCK_FILE}); wait for it "
                "or pick another --output-dir"
            ) from None
        try:
            yield
        except BaseException:
            if new_lock:  # removed while still held, so that no other run can have taken it
                lock.unlink(missing_ok=True)
            _remove_if_empty(created)
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_labels(dataset: Any, label_column: str, num_classes: int, split: str, option: str) -> None:
    """Every row of the split holds a label in [0, num_classes); unlabeled test splits use -1."""
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split is empty (after --max-{option}-samples?): nothing to "
                         f"{'evaluate' if option == 'eval' else 'train'} on")
    labels = torch.as_tensor(list(dataset[label_column]))
    unlabeled = int((labels < 0).sum())
    if unlabeled:
        share = "every" if unlabeled == len(labels) else f"{unlabeled} of {len(labels)}"
        raise ValueError(
            f"the {split!r} split has no label on {share} row(s) (label -1, as in the unlabeled test split of many "
            f"Hub datasets): pass --{option}-split with a labeled split (e.g. validation), or leave --eval-split out "
            "to hold out 10% of the training split"
        )
    if int(labels.max()) >= num_classes:
        raise ValueError(f"the {split!r} split has label {int(labels.max())}, but the training split has only "
                         f"{num_classes} classes")


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """An upper estimate of one checkpoint: trained parameters (twice: state and adapter), buffers, optimizer state."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return 2 * trained + buffers + max(state, trained) + _SLACK_BYTES


def check_free_space(folder: Path, needed: int) -> None:
    """A checkpoint is written beside the previous one before that is removed: room for one more."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"no room for a checkpoint in {folder}: {free / _MIB:.1f} MiB free, about {needed / _MIB:.1f} MiB "
            "needed; free some space or pass --output-dir on another disk",
        )


def dry_evaluation(model: nn.Module, batch: dict[str, torch.Tensor], logits_fn: Any) -> None:
    """The evaluation step on a small batch (no gradient, eval mode), before the first training epoch."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            F.cross_entropy(logits_fn(batch), batch["labels"])
    except Exception as err:
        raise RuntimeError(f"a dry evaluation batch failed before training ({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    chain = [err, err.__cause__, err.__context__]
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    # torch.save reports a failed write as a RuntimeError without errno ("unexpected pos", "iostream error")
    return isinstance(err, RuntimeError) and shutil.disk_usage(folder).free < _SLACK_BYTES


@contextlib.contextmanager
def disk_full_explained(folder: Path, what: str) -> Iterator[None]:
    """Re-raise a write that failed for want of space as an ENOSPC error that says so and what to do."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not _is_disk_full(err, folder):
            raise
        free = shutil.disk_usage(folder).free / _MIB
        raise OSError(
            errno.ENOSPC,
            f"no space left on the disk of {folder} while writing {what} ({free:.1f} MiB free; {err}). The previous "
            "checkpoint is intact: free some space (or move --output-dir) and continue with --resume",
        ) from err


def first_rows(dataset: Any, count: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The first `count` rows of a transformed dataset as one batch on `device`."""
    from torch.utils.data import default_collate

    rows = dataset.__getitems__(list(range(min(count, len(dataset)))))
    return {k: v.to(device) for k, v in default_collate(rows).items()}
