"""The benchmark in resumable pieces: a run cut anywhere (a piece's end, a kill while checkpointing)
continues to the bits of the uninterrupted run; the command exits 75 while runs are left, 0 when done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bench_checkpoint  # noqa: E402
import bench_common  # noqa: E402
import benchmark  # noqa: E402

# 24 CIFAR-10 images at 32 px, batch 8: 3 steps an epoch, 2 epochs, a real MCU network.
RECIPE = {"train_size": 24, "eval_size": 16, "epochs": 2, "warmup_epochs": 1, "batch_size": 8, "lr": 0.05,
          "clip_grad_norm": 1.0, "image_size": 32, "data_seed": 0, "timing_skip_steps": 0}
SAME = ("top1", "adapter_sha256", "adapter_bytes", "final_train_loss", "steps", "trainable_params",
        "saved_activation_bytes", "weight_grad_bytes")


def spec_of(method: str, precision: str = "fp32") -> dict:
    budget = None if method in bench_common.BASELINES else 4000
    spec = {"suite": "tiny", "network": "mcunet-5fps", "dataset": "cifar10", "method": method, "budget_slots": budget,
            "budget_index": 0, "seed": 1, "recipe": RECIPE, "config": "tiny.yaml", "lora_weight_slots": 4000,
            "device": "cpu", "precision": precision}
    return {**spec, "id": benchmark.run_id(spec)}


@pytest.fixture
def data(shared_assets: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict:
    cache = tmp_path_factory.getbasetemp() / "bench-cache"
    env = {"MEDYATE_DATA_DIR": str(shared_assets / "data"), "MEDYATE_BENCH_CACHE": str(cache)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(bench_common, "DATA_DIR", shared_assets / "data")
    monkeypatch.setattr(bench_common, "CACHE_DIR", cache)
    return env


def cut_at(monkeypatch: pytest.MonkeyPatch, check: int) -> None:
    """The piece ends at the run's `check`-th look at the clock (one after each step but an epoch's last, one
    after each epoch but the last)."""
    calls = iter(range(1, 1000))
    monkeypatch.setattr(bench_common, "_out_of_time", lambda deadline: next(calls) == check)


def run(spec: dict, folder: Path, checkpoint: bool = True) -> tuple[str, dict | None]:
    record = folder / f"{spec['id']}.json"
    status = bench_common.run_one(spec, str(record), str(folder / f"{spec['id']}.pt") if checkpoint else None, 0.0)
    return status, json.loads(record.read_text()) if record.exists() else None


# A piece's cuts, each the cut piece's n-th look at the clock; the steps each piece ended at.
MID_EPOCH_TWICE = ((1, 3), [1, 4, 6])  # after step 1; then after step 4 (epoch 1's checkpoint written before)
AT_EPOCH_END = ((3,), [3, 6])  # after steps 1, 2 and then at the end of epoch 1


@pytest.mark.parametrize("method,precision,cuts", [
    ("medyate", "fp32", MID_EPOCH_TWICE), ("det_rgn", "fp32", MID_EPOCH_TWICE), ("full", "fp32", MID_EPOCH_TWICE),
    ("lora", "fp32", MID_EPOCH_TWICE), ("medyate", "bf16", MID_EPOCH_TWICE), ("medyate", "fp32", AT_EPOCH_END),
], ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v[0])))
def test_a_run_in_pieces_trains_the_bits_of_the_uninterrupted_run(
    method: str, precision: str, cuts: tuple, data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same adapter digest, accuracy, loss and measured memory as one run without checkpoints (bf16:
    autocast), whether the pieces end inside an epoch or at its end."""
    spec = spec_of(method, precision)
    monkeypatch.setattr(bench_common, "_out_of_time", lambda deadline: False)
    _, whole = run(spec, tmp_path / "whole", checkpoint=False)
    pieces = tmp_path / "pieces"
    checkpoint = pieces / f"{spec['id']}.pt"
    checks, steps = cuts
    for check, step in zip(checks, steps, strict=False):
        cut_at(monkeypatch, check)
        assert run(spec, pieces) == (bench_common.PAUSED, None)
        state = bench_checkpoint.load(checkpoint, spec)
        assert (state["epoch"], state["position"], state["step"]) == (step // 3, step % 3, step)
    monkeypatch.setattr(bench_common, "_out_of_time", lambda deadline: False)
    status, resumed = run(spec, pieces)
    assert status == "done" and not checkpoint.exists()
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}
    assert [p["steps_to"] for p in resumed["pieces"]] == steps and resumed["steps"] == 6
    assert resumed["precision"] == precision and spec["id"].endswith("__bf16") == (precision == "bf16")


def test_sigterm_pauses_a_run_after_its_current_step(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's own stop (and `timeout`, a machine going away) sends SIGTERM: checkpoint, then continue."""
    spec = spec_of("trady")
    _, whole = run(spec, tmp_path / "whole", checkpoint=False)
    losses, loss_of = iter(range(1, 100)), bench_common.loss_of

    def terminated_in_step_2(model, batch):
        if next(losses) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_of(model, batch)

    monkeypatch.setattr(bench_common, "loss_of", terminated_in_step_2)
    folder = tmp_path / "run"
    record, checkpoint = folder / "run.json", folder / "run.pt"
    assert bench_common.run_one(spec, str(record), str(checkpoint), None) == bench_common.PAUSED
    assert bench_checkpoint.load(checkpoint, spec)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    monkeypatch.setattr(bench_common, "loss_of", loss_of)
    assert bench_common.run_one(spec, str(record), str(checkpoint), None) == "done"
    resumed = json.loads(record.read_text())
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}


@pytest.mark.parametrize("method", ["classifier", "medyate"])
def test_a_sweep_run_whose_loss_goes_non_finite_is_recorded_as_diverged(method: str, data: dict, tmp_path: Path) -> None:
    """A sweep run stops at the first non-finite loss (or, under MeDyate, at the tuner's own non-finite
    gradient check) and leaves a record without scores, so the sweep chooses among the rest; a final run
    that diverges fails, with no record."""
    recipe = {**RECIPE, "lr": 1e38, "clip_grad_norm": None}  # overflows fp32 within the first steps
    spec = {**spec_of(method), "recipe": recipe, "lr": 1e38, "phase": "sweep"}
    spec["id"] = benchmark.run_id(spec)
    path = tmp_path / f"{spec['id']}.json"
    assert bench_common.run_one(spec, str(path), str(tmp_path / f"{spec['id']}.pt"), None) == "done"
    record = json.loads(path.read_text())
    assert record["val_top1"] is None and record["top1"] is None and record["lr"] == 1e38
    assert 0 <= record["diverged_at_step"] <= 6
    assert record["diverged_why"].startswith(("loss is ", "non-finite weight gradient")), record["diverged_why"]
    assert not (tmp_path / f"{spec['id']}.pt").exists()
    final = {**spec, "phase": "final"}
    final["id"] = benchmark.run_id(final)
    with pytest.raises(FloatingPointError):
        run(final, tmp_path, checkpoint=False)
    assert not (tmp_path / f"{final['id']}.json").exists()


def test_a_checkpoint_of_another_recipe_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    spec, path = spec_of("medyate"), tmp_path / "run.pt"
    bench_checkpoint.save(path, {**spec, "ranking_path": "/here/results/rankings/r.json"}, {"epoch": 1})
    moved = {**spec, "device": "cuda", "threads": 4, "ranking_path": "/there/results/rankings/r.json"}
    assert bench_checkpoint.load(path, moved)["epoch"] == 1  # where it runs, not what it trains
    with pytest.raises(ValueError, match="ranking_path: checkpoint 'r.json' vs now 'other.json'"):
        bench_checkpoint.load(path, {**moved, "ranking_path": "/there/results/rankings/other.json"})
    with pytest.raises(ValueError, match=r"another version of this run \(recipe: checkpoint .*delete the checkpoint"):
        bench_checkpoint.load(path, {**moved, "recipe": {**RECIPE, "lr": 0.1}})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt"):
        bench_checkpoint.load(path, spec)
    assert bench_checkpoint.load(tmp_path / "none.pt", spec) is None


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {scripts!r})
import bench_common, torch
calls = iter(range(1, 100))
bench_common._out_of_time = lambda deadline: next(calls) == 4  # after steps 1, 2, epoch 1; the piece ends after step 4
saves, save = iter(range(1, 100)), torch.save
def dying_save(obj, handle, *args, **kwargs):
    if next(saves) == 1:  # the epoch-1 checkpoint is written whole
        return save(obj, handle, *args, **kwargs)
    handle.write(b"PK\\x03\\x04 half of a zip")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # killed while the piece's checkpoint is being written
torch.save = dying_save
bench_common.run_one({spec!r}, {record!r}, {checkpoint!r}, 0.0)
"""


@pytest.mark.slow  # a fresh interpreter: ~15 s
def test_a_kill_while_checkpointing_leaves_the_previous_checkpoint_and_the_run_continues_exactly(
    data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_of("medyate")
    monkeypatch.setattr(bench_common, "_out_of_time", lambda deadline: False)
    _, whole = run(spec, tmp_path / "whole", checkpoint=False)
    folder = tmp_path / "run"
    folder.mkdir()
    record, checkpoint = folder / f"{spec['id']}.json", folder / f"{spec['id']}.pt"
    script = KILLED_WRITER.format(scripts=str(REPO / "scripts"), spec=spec, record=str(record),
                                  checkpoint=str(checkpoint))
    env = {**os.environ, **data, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    state = bench_checkpoint.load(checkpoint, spec)  # whole: the epoch-1 checkpoint, not the half-written one
    assert (state["epoch"], state["position"], state["step"]) == (1, 0, 3)
    assert [p.name for p in folder.iterdir() if p.name != checkpoint.name] != []  # the killed save's temporary file
    status, resumed = run(spec, folder)
    assert status == "done" and {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}
    assert [p.name for p in folder.iterdir()] == [record.name]  # checkpoint and the killed save's leftover gone


@pytest.mark.slow
def test_the_command_exits_75_at_a_pieces_end_and_the_same_command_finishes(
    data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmark.execute: a piece whose time is up pauses the run after its first step (status 75, checkpoint
    kept); the next call continues it and returns 0; the record matches a run in one go."""
    spec = spec_of("trady")
    runs, checkpoints = tmp_path / "runs", tmp_path / "checkpoints"
    monkeypatch.setattr(benchmark, "PIECE_RESERVE_S", 60.0)  # piece_minutes=1: its end is its start ...
    monkeypatch.setattr(benchmark, "LAUNCH_MARGIN_S", -3600.0)  # ... and the run is started all the same
    assert benchmark.execute([spec], None, 600, 1, runs=runs, piece_minutes=1, checkpoints=checkpoints) == 75
    assert not (runs / f"{spec['id']}.json").exists()
    assert bench_checkpoint.load(checkpoints / f"{spec['id']}.pt", spec)["step"] == 1
    assert benchmark.execute([spec], None, 600, 1, runs=runs, checkpoints=checkpoints) == 0
    assert not (checkpoints / f"{spec['id']}.pt").exists()
    monkeypatch.setattr(bench_common, "_out_of_time", lambda deadline: False)
    _, whole = run(spec, tmp_path / "whole", checkpoint=False)
    resumed = json.loads((runs / f"{spec['id']}.json").read_text())
    assert {k: resumed[k] for k in SAME} == {k: whole[k] for k in SAME}
    assert torch.__version__ == resumed["torch"] and resumed["device"] == "cpu"
