"""The README's first run: scripts/demo.py from a bare copy of the checkout, offline, nothing beside it."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
METHODS = ("MeDyate", "full fine-tuning", "classifier only", "LoRA")
EPOCHS = 2


def _bare_copy(target: Path) -> Path:
    """The files a clone has (tracked, plus untracked ones git does not ignore), copied to `target`."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout to list the repository's files")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a deleted but still tracked file is not in a clone either
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _environment(copy: Path, home: Path) -> dict[str, str]:
    """This interpreter's venv with the copy first on the path, no override variables, an empty HF cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDYATE_")}
    env.update(PYTHONPATH=str(copy), HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_demo_runs_from_a_bare_copy_offline(tmp_path: Path) -> None:
    """Embedded MCU weights + embedded data: per-epoch lines, the table and a PNG, with no shared/ anywhere near."""
    copy = _bare_copy(tmp_path / "clone")
    assert not (tmp_path / "shared").exists() and not (copy / "shared").exists()
    env = _environment(copy, tmp_path / "hf")
    where = subprocess.run(
        [sys.executable, "-c", "import medyate_peft.backbones.mcu as m; print(m.__file__); "
         "print(m.resolve_mcu_files('mcunet-5fps'))"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(copy) for p in where), where  # the copy's package and weights

    out = tmp_path / "runs"
    demo = subprocess.run(
        [sys.executable, "scripts/demo.py", "--train-samples", "16", "--eval-samples", "10", "--epochs", str(EPOCHS),
         "--batch-size", "8", "--output-dir", str(out)],
        cwd=copy, env=env, capture_output=True, text=True, timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    lines = demo.stdout.splitlines()
    assert str(copy / "scripts" / "demo_data" / "cifar10") in lines[0]
    assert "\r" not in demo.stdout + demo.stderr  # a log file gets lines, not a progress bar
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == [f"{i}/{EPOCHS}" for i in range(1, EPOCHS + 1)] * len(METHODS)
    header = next(i for i, line in enumerate(lines) if line.startswith("method ") and "test acc" in line)
    table = lines[header + 1 : header + 1 + len(METHODS)]
    assert [row.startswith(name) for row, name in zip(table, METHODS, strict=True)] == [True] * len(METHODS)
    assert all(re.search(r"\d+\.\d\d%", row) for row in table)
    plot = Path(re.search(r"^plot \(.*\): (.+)$", demo.stdout, re.M).group(1))
    assert plot.parent == out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.width > 600 and image.height > 300
    for method in ("medyate", "full", "head", "lora"):
        assert (out / method / "results.json").is_file()


def test_demo_data_not_found_is_one_clear_line(tmp_path: Path) -> None:
    """--data with a Hub name that is not reachable (offline here) stops the demo with the loader's message."""
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with pytest.raises(SystemExit, match=r"^demo: error: dataset 'nobody/no-such-data' is neither a local"):
        demo.main(["--data", "nobody/no-such-data", "--methods", "head", "--output-dir", str(tmp_path)])
