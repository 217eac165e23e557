"""Temporary siblings of atomic saves: who made them, and when a leftover may be removed.

A staging entry is named `.<target>.medyate-<owner>-<pid>-<start>-<random>[.tmp|.old]`: `owner` is a
hash of this host and PID namespace, `start` the process start time. A PID only says whether a
process lives in the namespace it came from, so a leftover is removed at once only when its owner
is this host and namespace and that exact process (PID and start time) is gone; one from another
host or container is removed only once it is older than `FOREIGN_AGE_S`. Removal first renames the
entry to a private name, so a folder another saver has just swapped in is never deleted through it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

MARK = ".medyate-"
FOREIGN_AGE_S = 24 * 3600  # a day: no save takes that long
# The second form (PID and random part only) is that of earlier versions' leftovers.
_PATTERN = re.compile(
    r"^\.(?P<name>.+)\.medyate-(?:(?P<owner>[0-9a-f]{10})-(?P<pid>\d+)-(?P<start>\d+)|\d+)-\w+(\.tmp|\.old)?$"
)
_CREATED: set[Path] = set()  # this process's staging entries while they are in use


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@functools.cache
def owner() -> str:
    """This host and PID namespace (the namespace link is the same in every process of a container)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    parts = (socket.gethostname(), _read("/etc/machine-id"), namespace)
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot ("0" where /proc is absent); None: no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        return stat.rpartition(")")[2].split()[19]
    if Path("/proc/self/stat").exists():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by someone else
        pass
    return "0"


def prefix(target: Path) -> str:
    """Name prefix of this process's staging entries for `target`."""
    pid = os.getpid()
    return f".{target.name}{MARK}{owner()}-{pid}-{_start_time(pid)}-"


def register(entry: Path) -> Path:
    _CREATED.add(entry)
    return entry


def release(entry: Path) -> None:
    _CREATED.discard(entry)


def make_dir(target: Path) -> Path:
    return register(Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix(target))))


def make_file(target: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix(target), suffix=".tmp")
    os.close(fd)
    return register(Path(name))


def inside_staging(path: Path) -> bool:
    """Whether `path` lies in a staging folder of this process: the enclosing save is atomic already."""
    path = Path(os.path.realpath(path))
    return any(folder == path or folder in path.parents for folder in _CREATED)


def is_stale(entry: Path) -> bool:
    """A leftover of a killed save (see the module docstring); never one of this process's live entries."""
    match = _PATTERN.match(entry.name)
    if match is None or entry in _CREATED:
        return False
    if match["owner"] == owner():
        pid = int(match["pid"])
        return pid != os.getpid() and _start_time(pid) != match["start"]
    try:
        return time.time() - entry.lstat().st_mtime > FOREIGN_AGE_S
    except FileNotFoundError:
        return False


def remove_stale(folder: Path) -> None:
    """Remove the leftovers of killed saves in `folder`, whatever their target; put back an old folder
    that the non-atomic fallback had moved aside if nothing took its place."""
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        if MARK not in entry.name or not is_stale(entry):
            continue
        target = folder / _PATTERN.match(entry.name)["name"]
        if entry.name.endswith(".old") and not target.exists() and not target.is_symlink():
            os.rename(entry, target)
            continue
        claimed = folder / f"{prefix(Path('trash'))}{os.urandom(4).hex()}"
        try:
            os.rename(entry, register(claimed))  # from here on the entry is ours alone
        except FileNotFoundError:  # another process took it first
            release(claimed)
            continue
        try:
            if claimed.is_dir() and not claimed.is_symlink():
                shutil.rmtree(claimed, ignore_errors=True)
            else:
                claimed.unlink(missing_ok=True)
        finally:
            release(claimed)
