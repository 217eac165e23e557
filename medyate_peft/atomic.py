"""Crash-safe writes: a run killed during a save leaves the previous good file or the new complete one.

Files are written to a temporary sibling, flushed to disk and renamed over the target (`os.replace`
is atomic on POSIX and Windows). A directory written by a third-party function (PEFT's
`save_pretrained`) is written into a temporary sibling directory, completed with the old entries it
did not rewrite, and swapped in with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from . import staging

_UMASK = os.umask(0)
os.umask(_UMASK)
logger = logging.getLogger(__name__)
_CONFIG_NAMES = ("adapter_config.json", "config.json")  # replaced last in the file-by-file mode


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _final_mode(path: Path, default: int) -> int:
    """Keep the permissions of the file being replaced; a new one gets the usual umask mode."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return default & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is synced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging.remove_stale(path.parent)
    tmp = staging.make_file(path)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, _final_mode(path, 0o666))
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        staging.release(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` whose content only appears at `path` once the block completes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write only writes whole files (mode 'w' or 'wb'), got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically (training checkpoints)."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_json(obj: Any, path: str | os.PathLike, **dump_kwargs: Any) -> None:
    """`json.dump(obj, path)`, atomically (rankings, results)."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, **{"indent": 2, **dump_kwargs})
        handle.write("\n")


# -- directories --------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merge_old_entries(old: Path, new: Path) -> None:
    """Add to `new` every entry of `old` it lacks (what the writer left alone stays, as in place)."""
    for entry in old.iterdir():
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if not target.exists():
                target.mkdir()
                shutil.copystat(entry, target)
            if target.is_dir():
                _merge_old_entries(entry, target)
        elif not target.exists() and not target.is_symlink():
            _link_or_copy(entry, target)


def _set_file_modes(new: Path, old: Path) -> None:
    """Files written into `new` take the mode of the file they replace in `old`, new ones the umask's
    (as `atomic_path`): some writers create theirs 0600 (safetensors' adapter_model.safetensors)."""
    for file in new.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, _final_mode(old / file.relative_to(new), 0o666))


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _mount_points() -> set[str]:
    """Mount points of this process's mount namespace (Linux); empty elsewhere."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    unescape = {"\\040": " ", "\\011": "\t", "\\012": "\n", "\\134": "\\"}
    points = set()
    for line in lines:
        point = line.split()[4]
        for code, char in unescape.items():
            point = point.replace(code, char)
        points.add(point)
    return points


def _is_mount_point(path: Path) -> bool:
    """A mount point (bind mounts of the same file system included) cannot be renamed or swapped."""
    return path.is_dir() and (os.path.ismount(path) or str(path) in _mount_points())


def _replace_files(new: Path, path: Path) -> None:
    """Copy every file of `new` into `path`, each replaced atomically; configs last, so that a reader
    who sees a new config also sees the new weights."""
    files = sorted((f for f in new.rglob("*") if not f.is_dir()), key=lambda f: (f.name in _CONFIG_NAMES, str(f)))
    for source in files:
        target = path / source.relative_to(new)
        with atomic_path(target) as tmp:
            shutil.copy2(source, tmp, follow_symlinks=False)


def _swap_by_renames(new: Path, path: Path) -> None:
    """Fallback without an atomic exchange: the old directory is moved aside for an instant."""
    aside = staging.register(Path(f"{new}.old"))
    try:
        os.rename(path, aside)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(aside, path)
            raise
        shutil.rmtree(aside)
    finally:
        staging.release(aside)


def _swap_in(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path`: one atomic exchange where the system allows it."""
    if _is_mount_point(path):
        logger.warning("MeDyate: %s is a mount point: its files are replaced one by one (each atomically), "
                       "not the folder as a whole", path)
        _replace_files(new, path)
        return
    if not path.is_dir():
        os.rename(new, path)
        return
    _merge_old_entries(path, new)
    try:
        swapped = _exchange(new, path)
    except OSError as err:
        if err.errno not in (errno.EBUSY, errno.EXDEV):
            raise
        logger.warning("MeDyate: %s cannot be swapped (%s): its files are replaced one by one (each atomically)",
                       path, err.strerror)
        _replace_files(new, path)
        return
    if not swapped:
        _swap_by_renames(new, path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, seed_files: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` in one atomic step.

    The result is what writing in place would give: entries of the old directory that were not
    rewritten are carried over (hard links, no copy); `seed_files` are copied in beforehand, for
    writers that update an existing file (PEFT's model card). A kill at any moment leaves the old
    directory or the new complete one at `path`. Without an atomic exchange (non-Linux) the old
    directory is renamed aside for an instant before the new one takes its place. A mount point,
    which no rename can replace, gets its files replaced one by one, each atomically. Inside a
    staging folder of an enclosing `atomic_directory` the writer writes in place (no nesting).
    Leftovers of killed saves beside `path` are removed first (`staging.remove_stale`).
    """
    path = Path(os.path.realpath(path))
    if staging.inside_staging(path):  # within a folder that is itself swapped in atomically
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging.remove_stale(path.parent)
    tmp = staging.make_dir(path)
    try:
        os.chmod(tmp, _final_mode(path, 0o777))
        for name in seed_files:
            if (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
        yield tmp
        _set_file_modes(tmp, path)
        _fsync_tree(tmp)
        _swap_in(tmp, path)
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old folder, under our own name
        staging.release(tmp)
