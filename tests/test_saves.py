"""Saves onto mount points, beside savers in other PID namespaces, and after killed runs.

Mount points need root (`mount`), the other PID namespace `unshare --pid --fork`; where the system
does not allow them the test is skipped and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peft import PeftModel
from test_reliability import net, trained

import medyate_peft.atomic
from medyate_peft import staging
from medyate_peft.atomic import atomic_directory

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _mount(kind: str, source: Path, point: Path) -> None:
    point.mkdir()
    source.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", "size=16m", "none", str(point)] if kind == "tmpfs" else [
        "mount", "--bind", str(source), str(point)]
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this system")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode}): needs root or CAP_SYS_ADMIN")


@pytest.mark.parametrize("kind", ["tmpfs", "bind"])
def test_save_onto_a_mount_point(tmp_path, kind, caplog) -> None:
    """PEFT saves into a mount point in place; an atomic folder swap there fails with EBUSY."""
    point = tmp_path / "adapter"
    _mount(kind, tmp_path / "source", point)
    try:
        model = trained()
        (point / "notes.txt").write_text("mine")
        model.save_pretrained(point)
        model.save_pretrained(point)  # the second save replaces the files of the first
        assert ADAPTER_FILES | {"notes.txt", "README.md"} == {p.name for p in point.iterdir()}
        assert "is a mount point: its files are replaced one by one" in caplog.text
        PeftModel.from_pretrained(net(), point)
        assert not [p for p in tmp_path.iterdir() if staging.MARK in p.name]
    finally:
        subprocess.run(["umount", str(point)], check=False)


_FOREIGN_SAVER = """
import os, sys, time
from pathlib import Path
# /proc is still the outer namespace's: fork until this namespace's PID is one no outer process holds,
# so that judged by PID alone (os.kill(pid, 0) outside) the staging folder would look abandoned.
while Path(f"/proc/{os.getpid()}").exists():
    child = os.fork()
    if child:
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
from medyate_peft.atomic import atomic_directory
target, go = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_directory(target) as tmp:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp / name).write_text("foreign")
    print(os.getpid(), tmp, flush=True)
    while not go.exists():
        time.sleep(0.05)
"""


def test_a_saver_in_another_pid_namespace_keeps_its_staging_folder(tmp_path) -> None:
    """Its PID means nothing here: its live staging folder must survive our saves beside it."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode:
        pytest.skip("`unshare --pid --fork` is not available here (needs root or user namespaces)")
    target, go = tmp_path / "adapter", tmp_path / "go"
    with atomic_directory(target) as tmp:
        for name in ADAPTER_FILES:
            (tmp / name).write_text("ours")
    script = tmp_path / "saver.py"
    script.write_text(_FOREIGN_SAVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    saver = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, str(script), str(target), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        pid, _, folder = saver.stdout.readline().strip().partition(" ")
        foreign = Path(folder)
        assert foreign.parent == tmp_path and staging.MARK in foreign.name, saver.stderr.read()
        assert not Path(f"/proc/{pid}").exists()  # no process here holds the saver's PID
        for _ in range(3):  # our saves beside it, each cleaning up leftovers first
            with atomic_directory(target) as tmp:
                for name in ADAPTER_FILES:
                    (tmp / name).write_text("ours again")
            assert foreign.is_dir() and ADAPTER_FILES == {p.name for p in foreign.iterdir()}
            assert ADAPTER_FILES <= {p.name for p in target.iterdir()}
        go.touch()
        _, err = saver.communicate(timeout=60)
    finally:
        saver.kill()
    assert saver.returncode == 0, err
    assert {p.name: p.read_text() for p in target.iterdir()} == dict.fromkeys(ADAPTER_FILES, "foreign")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "go", "saver.py"]


def _dead_pid_staging(folder: Path, target_name: str) -> Path:
    """A staging folder named as one of this host's processes, since ended, would name it."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    left = folder / f".{target_name}{staging.MARK}{staging.owner()}-{ended.pid}-12345-abc123"
    (left / "half").mkdir(parents=True)
    (left / "half" / "adapter_model.safetensors").write_text("half")
    return left


def test_leftovers_of_killed_saves_are_removed_by_the_next_save_whatever_their_target(tmp_path, monkeypatch) -> None:
    """A checkpoint's nested staging folder (target `.checkpoint-epoch001.medyate-...`) included; each is
    renamed to a private name before it is deleted, so no rmtree runs through a name another saver swaps."""
    nested = _dead_pid_staging(tmp_path, ".checkpoint-epoch001.medyate-0123456789-1-1-xyz")
    plain = _dead_pid_staging(tmp_path, "checkpoint-epoch001")
    removed = []
    rmtree = shutil.rmtree
    monkeypatch.setattr(staging.shutil, "rmtree", lambda path, **kw: removed.append(Path(path)) or rmtree(path, **kw))
    with atomic_directory(tmp_path / "checkpoint-epoch002") as tmp:
        (tmp / "state").write_text("2")
    assert not nested.exists() and not plain.exists()
    assert len(removed) >= 2 and all(p.name.startswith(f".trash{staging.MARK}{staging.owner()}-") for p in removed[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-epoch002"]


def test_foreign_leftovers_wait_for_a_generous_age_and_user_files_stay(tmp_path) -> None:
    foreign = tmp_path / ".adapter.medyate-ffffffffff-12-345-abc"  # another host or container
    foreign.mkdir()
    user = tmp_path / ".adapter.medyate-notes"  # not a name this library makes
    user.write_text("mine")
    with atomic_directory(tmp_path / "adapter") as tmp:
        (tmp / "w").write_text("1")
    assert foreign.is_dir()
    old = time.time() - staging.FOREIGN_AGE_S - 60
    os.utime(foreign, (old, old))
    os.utime(user, (old, old))
    with atomic_directory(tmp_path / "adapter") as tmp:
        (tmp / "w").write_text("2")
    assert not foreign.exists() and user.read_text() == "mine"


def test_a_save_inside_a_staging_folder_is_not_nested(tmp_path, monkeypatch) -> None:
    """`medyate train` saves the adapter into its checkpoint's staging folder: one level of staging only
    (a nested one, killed, was left where no later save looks)."""
    swapped = []
    exchange = medyate_peft.atomic._exchange
    monkeypatch.setattr(medyate_peft.atomic, "_exchange", lambda new, path: swapped.append(path) or exchange(new, path))
    with atomic_directory(tmp_path / "checkpoint-epoch001") as tmp:
        trained().save_pretrained(tmp)
        assert [p.name for p in tmp_path.iterdir()] == [tmp.name]
        assert ADAPTER_FILES <= {p.name for p in tmp.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-epoch001"]
    assert swapped == []  # a new folder is renamed into place; the inner save wrote in place
