"""`medyate train` as a careless or unlucky user runs it: checkpoint rotation beside the user's folders,
two runs into one folder, damaged training states, and what is checked before the first step."""

from __future__ import annotations

import errno
import math
import shutil
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
from test_train import TINY, _run, image_folder  # noqa: F401 (a fixture)

from medyate_peft import preflight
from medyate_peft.train import (
    STATE_FILE,
    checkpoints,
    find_checkpoint,
    load_training_state,
    rotate_checkpoints,
)


def _checkpoint(folder: Path, name: str, state: bool = True) -> Path:
    path = folder / name
    path.mkdir(parents=True)
    if state:
        (path / STATE_FILE).write_bytes(b"state")
    return path


def test_rotation_touches_only_its_numbered_checkpoints_by_number(tmp_path: Path) -> None:
    """A user's `checkpoint-epoch003.bak/` stays, `checkpoint-epoch_best/` does not sort last, 1000 > 999."""
    user = [_checkpoint(tmp_path, "checkpoint-epoch003.bak"), _checkpoint(tmp_path, "checkpoint-epoch_best"),
            _checkpoint(tmp_path, "checkpoint-epoch007", state=False)]
    for epoch in (998, 999, 1000):
        _checkpoint(tmp_path, f"checkpoint-epoch{epoch:03d}")
    assert [n for n, _ in checkpoints(tmp_path)] == [998, 999, 1000]
    assert find_checkpoint(tmp_path).name == "checkpoint-epoch1000"
    rotate_checkpoints(tmp_path, 1000, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in user), "checkpoint-epoch1000"])


def test_rotation_after_resuming_from_an_earlier_epoch_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    """The replaced run's later checkpoints go, so that --resume then finds the new one."""
    for epoch in (2, 3, 5):
        _checkpoint(tmp_path, f"checkpoint-epoch{epoch:03d}")
    rotate_checkpoints(tmp_path, 3, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-epoch003"]


@pytest.fixture(scope="module")
def one_epoch(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:  # noqa: F811
    common = [*TINY, "--dataset", str(image_folder), "--epochs", "1", "--strategy", "full_random"]
    out = tmp_path_factory.mktemp("run") / "out"
    _run(*common, "--output-dir", str(out))
    return common, out


@pytest.mark.slow
def test_a_second_run_into_a_folder_with_another_runs_checkpoints_is_refused(one_epoch, tmp_path: Path) -> None:
    common, first = one_epoch
    out = tmp_path / "out"
    shutil.copytree(first, out)
    with pytest.raises(ValueError, match=r"holds the checkpoints of another run \(checkpoint-epoch001\); pass --resume"):
        _run(*common, "--output-dir", str(out))
    with pytest.raises(ValueError, match="--save-total-limit must be at least 1"):
        _run(*common, "--output-dir", str(tmp_path / "new"), "--save-total-limit", "0")
    assert not (tmp_path / "new").exists()
    # A changed rate and a longer run continue the same training; the schedule follows the new values.
    resumed = _run(*common[:-4], "--epochs", "2", "--strategy", "full_random", "--lr", "0.01",
                   "--output-dir", str(out), "--resume", str(out))
    steps = 6  # 48 samples, batch 8; one warm-up epoch, then cosine: the last step's rate at the new peak
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps)))
    assert [p.name for _, p in checkpoints(out)] == ["checkpoint-epoch002"]
    with pytest.raises(ValueError, match="after epoch 2, so --epochs 2 leaves nothing to train"):
        _run(*common[:-4], "--epochs", "2", "--strategy", "full_random", "--output-dir", str(out), "--resume", str(out))
    _run(*common, "--output-dir", str(out), "--overwrite")
    assert [p.name for _, p in checkpoints(out)] == ["checkpoint-epoch001"]  # the replaced run's epoch 2 is gone


def _tamper(state: dict, how: str) -> None:
    if how == "NaN head":
        next(v for k, v in state["model"].items() if "classifier" in k and v.is_floating_point()).fill_(float("nan"))
    elif how == "negative selection":
        state["medyate"]["selected"][0] = -3
    elif how == "epoch -1":
        state["epoch"] = -1


@pytest.mark.parametrize("how", ["truncated", "NaN head", "negative selection", "epoch -1"])
def test_a_tampered_training_state_is_one_clear_error_naming_the_file(one_epoch, tmp_path: Path, how: str) -> None:
    common, first = one_epoch
    out = tmp_path / "out"
    shutil.copytree(first, out)
    path = out / "checkpoint-epoch001" / STATE_FILE
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        state = torch.load(path, weights_only=True)
        _tamper(state, how)
        torch.save(state, path)
    with pytest.raises(ValueError, match=rf"{path}.*(truncated or corrupt|not a valid|does not fit)") as info:
        _run(*common[:-4], "--epochs", "2", "--strategy", "full_random", "--output-dir", str(out), "--resume", str(out))
    assert {"truncated": "truncated", "NaN head": "NaN/inf", "negative selection": "distinct indices",
            "epoch -1": "epoch -1"}[how] in str(info.value)
    assert not (out / "checkpoint-epoch002").exists()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_an_empty_eval_split_fails_before_the_first_step(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    common = [*TINY, "--dataset", str(image_folder), "--epochs", "1", "--strategy", "full_random"]
    with pytest.raises(ValueError, match="the 'test' split is empty"):
        _run(*common, "--output-dir", str(tmp_path / "out"), "--max-eval-samples", "0")
    assert not (tmp_path / "out").exists()  # no epoch ran: the folder it made goes again


def test_a_run_into_a_folder_another_run_is_writing_is_refused(tmp_path: Path) -> None:
    """Two runs started together into one folder: both passed the checks, one overwrote the other."""
    out = tmp_path / "out"
    with preflight.exclusive(out), pytest.raises(ValueError, match="another medyate train run is writing into"):
        _run(*TINY, "--dataset", str(tmp_path / "unused"), "--output-dir", str(out))
    with preflight.exclusive(out):  # released afterwards, also after an error
        pass


def test_a_failed_run_leaves_no_folder_it_made_and_keeps_the_users(tmp_path: Path, capsys) -> None:
    """A bad --dataset fails after the output folder (and its parents) were made: they go again, the lock with
    them; a folder the user made stays as it was; a second run into it is not refused."""
    from medyate_peft.cli import main as cli_main

    argv = ["train", *TINY, "--dataset", str(tmp_path / "no-such-dataset")]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "new" / "deeper" / "out")]) == 2
    assert "no-such-dataset" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for _ in range(2):  # the first failure released its lock
        assert cli_main([*argv, "--output-dir", str(user)]) == 2
        assert "another medyate train run" not in capsys.readouterr().err
        assert [(p.name, p.read_text()) for p in user.iterdir()] == [("notes.txt", "keep me")]


def test_a_folder_a_failed_run_wrote_into_stays(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), preflight.exclusive(out):
        (out / "log.json").write_text("[]")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["log.json"]
    with preflight.exclusive(out):  # the lock was released; a successful run keeps its folder and lock file
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted(["log.json", preflight.LOCK_FILE])


def test_unlabeled_and_out_of_range_labels_are_named() -> None:
    unlabeled = datasets.Dataset.from_dict({"label": [-1, -1, -1]})
    with pytest.raises(ValueError, match="'test' split has no label on every row.*pass --eval-split"):
        preflight.check_labels(unlabeled, "label", 4, "test", "eval")
    with pytest.raises(ValueError, match="label 7, but the training split has only 4 classes"):
        preflight.check_labels(datasets.Dataset.from_dict({"label": [0, 7]}), "label", 4, "validation", "eval")
    preflight.check_labels(datasets.Dataset.from_dict({"label": [0, 3]}), "label", 4, "validation", "eval")


def test_dry_evaluation_reports_a_failing_eval_step() -> None:
    class BrokenInEval(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                raise RuntimeError("shape mismatch in eval")
            return super().forward(x)

    model = BrokenInEval(3, 2)
    batch = {"x": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}
    with pytest.raises(RuntimeError, match="dry evaluation batch failed before training.*shape mismatch in eval"):
        preflight.dry_evaluation(model, batch, lambda b: model(b["x"]))
    assert model.training


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 kB tmpfs (needs root); read-only with `ro`."""
    def mount(options: str) -> Path:
        point = tmp_path / f"disk-{options}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=256k,{options}", "none", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root or CAP_SYS_ADMIN")
        mounted.append(point)
        return point

    mounted: list[Path] = []
    yield mount
    for point in mounted:
        subprocess.run(["umount", "--lazy", str(point)], check=False)


def test_disk_full_and_read_only_output_are_named(small_disk) -> None:
    full = small_disk("rw")
    with pytest.raises(OSError, match="no room for a checkpoint in .*MiB free, about .* MiB needed") as info:
        preflight.check_free_space(full, 2**20)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="no space left on the disk of .* while writing checkpoint-epoch001") as info:
        with preflight.disk_full_explained(full, "checkpoint-epoch001"):
            torch.save(torch.zeros(2**18), full / STATE_FILE)  # 1 MiB into 256 kB
    assert info.value.errno == errno.ENOSPC and "--resume" in str(info.value)
    with pytest.raises(OSError, match="--output-dir .* is not writable .*Read-only file system"):
        preflight.check_output_dir(small_disk("ro") / "out")


def test_load_training_state_refuses_a_foreign_file(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match=rf"{tmp_path / STATE_FILE} is not a valid training state \(it lacks"):
        load_training_state(tmp_path)
