"""Careless or unlucky use: bad configs, damaged or foreign adapter files, runs killed while saving,
non-finite training values and disagreeing DDP ranks. Each fails with a message that says what to
do, leaves the user's model as it was, and loses no previously saved work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import reliability_worker as worker
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

import medyate_peft
from medyate_peft import MeDyateConfig
from medyate_peft.atomic import atomic_directory, atomic_save, atomic_write, atomic_write_json
from medyate_peft.guards import NonFiniteError, check_channel_gradients
from medyate_peft.peft_patches import AdapterFileError

TESTS = Path(__file__).resolve().parent

INPUT = [3, 8, 8]


def net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4),
    )


def config(**overrides) -> MeDyateConfig:
    kwargs = {"budget_kb": 1.0, "input_size": INPUT, "strategy": "full_random", "modules_to_save": ["6"]}
    return MeDyateConfig(**{**kwargs, **overrides})


def trained(base: nn.Module | None = None, **overrides) -> nn.Module:
    """A MeDyate model after a few SGD steps and one resample (non-zero deltas and live values)."""
    model = get_peft_model(base if base is not None else net(), config(**overrides))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(8, *INPUT), torch.randint(0, 4, (8,))
    for step in range(4):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            model.base_model.resample(optimizer)
    return model


def fingerprint(model: nn.Module) -> dict:
    """Everything a failed load/injection could have changed on a plain model."""
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attributes": sorted(model.__dict__),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["modules"] == before["modules"], "the model was left wrapped"
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    for key in ("requires_grad", "training", "hooks", "attributes"):
        assert after[key] == before[key], key


# -- 1. configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"budget_kb": 0}, ValueError, "positive finite number of kB, got 0"),
        ({"budget_kb": -5}, ValueError, "positive finite"),
        ({"budget_kb": float("nan")}, ValueError, "got nan"),
        ({"budget_kb": float("inf")}, ValueError, "got inf"),
        ({"budget_kb": "64"}, TypeError, "must be a number of kB"),
        ({"budget_kb": True}, TypeError, "must be a number of kB"),
        ({"strategy": "medyat"}, ValueError, "unknown strategy 'medyat'; choose one of: medyate, trady"),
        ({"input_size": 224}, TypeError, "as a list such as [3, 224, 224]"),
        ({"input_size": [3, 0, 8]}, ValueError, "positive sizes"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
        ({"format_version": 99, "strategy": "from_the_future"}, ValueError, "upgrade with `pip install -U"),
        ({"format_version": "2"}, TypeError, "format_version must be an int (this version writes 1), got '2'"),
        ({"bytes_per_slot": 3}, ValueError, "bytes_per_slot must be the size of one element: one of (1, 2, 4, 8)"),
        ({"bytes_per_slot": 2.5}, TypeError, "bytes_per_slot must be an int (4 for fp32), got 2.5"),
        ({"bytes_per_slot": True}, TypeError, "bytes_per_slot must be an int (4 for fp32), got True (bool)"),
        ({"bytes_per_slot": float("nan")}, TypeError, "bytes_per_slot must be an int"),
        ({"bytes_per_slot": "4"}, TypeError, "bytes_per_slot must be an int (4 for fp32), got '4' (str)"),
        ({"detect_anomalies": "False"}, TypeError, "detect_anomalies must be True or False, got 'False' (str)"),
        ({"lean_backward": 1}, TypeError, "lean_backward must be True or False"),
        ({"seed": 2**70}, ValueError, "seed must be in [-2**63, 2**64 - 1] (what torch.Generator accepts)"),
        ({"input_size": [3, 2.5, 8]}, TypeError, "input_size must hold whole sizes (ints)"),
        ({"alpha_opt": "0.2"}, TypeError, "alpha_opt must be a number, got '0.2' (str)"),
        ({"ranking_batches": 1.5}, TypeError, "ranking_batches must be an int, got 1.5"),
    ],
)
def test_bad_config_values_are_refused(kwargs, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        MeDyateConfig(**kwargs)


def test_too_small_budget_names_the_smallest_that_works_and_leaves_the_model() -> None:
    base = net()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="too small for any single channel") as info:
        get_peft_model(base, config(budget_kb=0.01))
    assert_unchanged(base, before)
    suggested = float(re.search(r"use budget_kb >= ([\d.]+)", str(info.value)).group(1))
    model = get_peft_model(base, config(budget_kb=suggested))  # the advice works...
    assert sum(len(idx) for idx in model.base_model.selection().values()) >= 1
    with pytest.raises(ValueError, match="too small"):  # ...and is the smallest to 0.01 kB
        get_peft_model(net(), config(budget_kb=round(suggested - 0.01, 2)))


def test_budget_over_the_whole_model_trains_every_channel_and_says_so(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        model = get_peft_model(net(), config(budget_kb=10_000))
    assert "covers every candidate channel" in caplog.text
    layers = model.base_model.medyate_layers()
    assert {n: len(i) for n, i in model.base_model.selection().items()} == {n: m.in_channels for n, m in layers.items()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["0", "conv_typo"]}, "target_modules ['conv_typo'] match no module of the model"),
        ({"target_modules": "features\\..*"}, "target_modules ['features\\\\..*'] match no module"),
        ({"target_modules": ["1"]}, "is a ReLU; MeDyate trains input channels of nn.Conv2d, nn.Linear and"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save ['classifier'] match no module"),
        ({"input_size": [5, 8, 8]}, "input_size=[5, 8, 8] does not fit the model"),
    ],
)
def test_bad_targets_and_shapes_fail_clearly_and_leave_the_model(kwargs, message) -> None:
    base = net()
    before = fingerprint(base)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        get_peft_model(base, config(**kwargs))
    assert_unchanged(base, before)
    get_peft_model(base, config())  # the same model still takes a correct config


def test_missing_input_size_with_no_forward_says_how_to_fix() -> None:
    model = get_peft_model(net(), config(input_size=None))
    with pytest.raises(RuntimeError, match=r"pass input_size=\[...\]"):
        model.base_model.plan()


# -- 2. loading ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A saved adapter, a batch and the adapted model's output on it."""
    folder = tmp_path_factory.mktemp("adapter")
    model = trained()
    model.save_pretrained(folder)
    x = torch.randn(2, *INPUT)
    model.eval()
    with torch.no_grad():
        return folder, x, model(x)


def _damaged_copy(saved_folder: Path, target: Path, edit) -> Path:
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((saved_folder / name).read_bytes())
    edit(target)
    return target


def _rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def _delta_key(tensors: dict, kind: str) -> str:
    """The `kind` entry (medyate_index / medyate_delta) of the first layer in the file."""
    layer = min(k for k in tensors if k.endswith(".medyate_index")).removesuffix(".medyate_index")
    return f"{layer}.{kind}"


DAMAGES = {
    "missing weights": (
        lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError,
        r"adapter_model.safetensors is missing: .* save it again",
    ),
    "truncated weights": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:300]),
        AdapterFileError, r"adapter_model.safetensors is truncated or corrupt",
    ),
    "empty weights": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(b""), AdapterFileError, "truncated or corrupt",
    ),
    "truncated config": (
        lambda d: (d / "adapter_config.json").write_text((d / "adapter_config.json").read_text()[:200]),
        AdapterFileError, r"adapter_config.json is truncated or corrupt",
    ),
    "config from a newer version": (
        lambda d: (d / "adapter_config.json").write_text(
            json.dumps({**json.loads((d / "adapter_config.json").read_text()), "format_version": 7})
        ),
        ValueError, r"format version 7, newer than this medyate-peft understands",
    ),
    "channel index out of range": (
        lambda d: _rewrite_tensors(d, lambda t: t[_delta_key(t, "medyate_index")].add_(100)),
        ValueError, r"channel index out of range \[0, \d+\).*different base model",
    ),
    "delta shape of another layer": (
        lambda d: _rewrite_tensors(d, lambda t: t.__setitem__(_delta_key(t, "medyate_delta"),
                                                             torch.zeros(len(t[_delta_key(t, "medyate_index")]), 3, 9))),
        ValueError, r"does not fit this layer, which needs .*different base model",
    ),
    "NaN delta": (
        lambda d: _rewrite_tensors(d, lambda t: t[_delta_key(t, "medyate_delta")].fill_(float("nan"))),
        ValueError, "must be finite",
    ),
    "config is a JSON list": (
        lambda d: _edit_config(d, lambda c: [c]), AdapterFileError, r"adapter_config.json holds a JSON list, not an",
    ),
    "config lacks peft_type": (
        lambda d: _edit_config(d, lambda c: _without(c, "peft_type")), AdapterFileError,
        r"adapter_config.json lacks 'peft_type', but .*adapter_model.safetensors holds a MeDyate adapter",
    ),
    "config lacks budget_kb": (
        lambda d: _edit_config(d, lambda c: _without(c, "budget_kb")), AdapterFileError,
        r"adapter_config.json lacks the required key 'budget_kb'",
    ),
    "config says LORA": (
        lambda d: _edit_config(d, lambda c: {**c, "peft_type": "LORA"}), AdapterFileError,
        r"says peft_type 'LORA', but .* holds a MeDyate adapter",
    ),
    "head weights missing": (
        lambda d: _rewrite_tensors(d, lambda t: [t.pop(k) for k in list(t) if k.startswith("base_model.model.6.")]),
        AdapterFileError, r"holds no weights of '6', which the config names in modules_to_save",
    ),
    "NaN head": (
        lambda d: _rewrite_tensors(d, lambda t: t["base_model.model.6.weight"].fill_(float("nan"))),
        ValueError, r"6.modules_to_save.default.weight: values must be finite",
    ),
    "head of another shape": (
        lambda d: _rewrite_tensors(d, lambda t: t.__setitem__("base_model.model.6.weight", torch.zeros(5, 8))),
        ValueError, r"shape \(5, 8\) in the adapter, \(4, 8\) in the model; .*different base model",
    ),
}


def _edit_config(folder: Path, change) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_adapter_fails_clearly_and_leaves_the_base_model(saved, tmp_path, damage) -> None:
    folder, x, expected = saved
    edit, error, message = DAMAGES[damage]
    damaged = _damaged_copy(folder, tmp_path / "damaged", edit)
    base = net()
    before = fingerprint(base)
    with pytest.raises(error, match=message):
        PeftModel.from_pretrained(base, damaged)
    assert_unchanged(base, before)
    loaded = PeftModel.from_pretrained(base, folder)  # the same base still loads the good adapter
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_failed_load_of_another_peft_method_leaves_the_base_model(tmp_path) -> None:
    """The rollback is not MeDyate's only: a LoRA adapter for other widths fails after PEFT wrapped the model."""
    from peft import LoraConfig

    get_peft_model(net(width=16), LoraConfig(target_modules=["0"], r=2)).save_pretrained(tmp_path / "lora")
    base = net()
    before = fingerprint(base)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(base, tmp_path / "lora")
    assert_unchanged(base, before)


def test_a_head_replaced_after_get_peft_model_or_holding_nan_is_not_saved(tmp_path) -> None:
    model = trained()
    model.save_pretrained(tmp_path / "good")
    good = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()
    model.base_model.model[6] = nn.Linear(8, 4)  # no longer PEFT's trained copy: it would be left out
    with pytest.raises(ValueError, match="modules_to_save names '6', but the model's '6' is not PEFT's trained copy"):
        model.save_pretrained(tmp_path / "good")
    nan_head = trained()
    with torch.no_grad():
        nan_head.base_model.model[6].modules_to_save["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"6.weight \(modules_to_save of adapter 'default'\) holds NaN/inf"):
        nan_head.save_pretrained(tmp_path / "good")
    assert (tmp_path / "good" / "adapter_model.safetensors").read_bytes() == good


def test_a_ranking_of_another_width_is_refused_though_the_names_match() -> None:
    """mobilenetv2_050 and mobilenetv2_100 share layer names; their shapes differ."""
    from medyate_peft import rank_layers

    loader = [(torch.randn(4, *INPUT), torch.randint(0, 4, (4,)))]
    ranking = rank_layers(net(width=8), loader, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"made for another architecture: \d+ of \d+ layers have other weight shapes"):
        get_peft_model(net(width=16), config(strategy="medyate", layer_ranking=ranking, modules_to_save=["6"]))
    get_peft_model(net(width=8), config(strategy="medyate", layer_ranking=ranking))  # its own architecture


@pytest.mark.parametrize("damage", ["truncated weights", "config is a JSON list", "config lacks budget_kb"])
def test_inspect_of_a_damaged_adapter_is_a_clear_error(saved, tmp_path, capsys, damage) -> None:
    from medyate_peft.cli import main

    damaged = _damaged_copy(saved[0], tmp_path / "damaged", DAMAGES[damage][0])
    assert main(["inspect", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert re.search(DAMAGES[damage][2], err) and "Traceback" not in err


def test_missing_folder_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no adapter folder .*typo"):
        PeftModel.from_pretrained(net(), tmp_path / "typo")


def test_adapter_for_another_base_fails_and_leaves_that_base(saved) -> None:
    folder, _, _ = saved
    other = net(width=16)
    before = fingerprint(other)
    with pytest.raises(ValueError, match="the adapter was made for a different base model"):
        PeftModel.from_pretrained(other, folder)
    assert_unchanged(other, before)


def test_failed_load_adapter_keeps_the_loaded_one(saved, tmp_path) -> None:
    folder, x, expected = saved
    model = PeftModel.from_pretrained(net(), folder)
    truncated = _damaged_copy(folder, tmp_path / "t", DAMAGES["truncated weights"][0])
    out_of_range = _damaged_copy(folder, tmp_path / "r", DAMAGES["channel index out of range"][0])
    keys = set(model.state_dict())
    for bad in (truncated, out_of_range):
        with pytest.raises(ValueError):
            model.load_adapter(bad, "second")
        assert list(model.peft_config) == ["default"] and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    model.load_adapter(folder, "second")  # the name is free again
    assert list(model.peft_config) == ["default", "second"]


# -- 3. atomic writes ------------------------------------------------------------------------------
def test_atomic_file_writes_keep_the_old_file_on_error(tmp_path) -> None:
    target = tmp_path / "results.json"
    atomic_write_json({"run": 1}, target)
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write('{"run": 2, "trunc')
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"run": 1}
    atomic_save({"w": torch.ones(2)}, tmp_path / "ckpt.pt")
    assert torch.equal(torch.load(tmp_path / "ckpt.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "results.json"]  # no temporary left
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("exchange", ["renameat2", "fallback"])
def test_atomic_directory_is_all_or_nothing_and_keeps_other_files(tmp_path, monkeypatch, exchange) -> None:
    if exchange == "fallback":
        monkeypatch.setattr(medyate_peft.atomic, "_exchange", lambda new, path: False)
    target = tmp_path / "adapter"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("v1")
        (staging / "README.md").write_text("card v1 + my notes")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights").write_text("v2, half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    with atomic_directory(target, seed_files=["README.md"]) as staging:
        assert (staging / "README.md").read_text() == "card v1 + my notes"  # writers may update it
        (staging / "weights").write_text("v2")
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        "weights": "v2", "notes.txt": "mine", "README.md": "card v1 + my notes"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_save_pretrained_is_atomic_and_otherwise_peft_behaviour(tmp_path) -> None:
    model = trained()
    target = tmp_path / "out"
    model.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    model.add_adapter("second", config())
    model.save_pretrained(target)  # PEFT layout: default at the top, others in subfolders
    names = {str(p.relative_to(target)) for p in target.rglob("*")}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "notes.txt",
            "second", "second/adapter_model.safetensors", "second/adapter_config.json"} == names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with torch.no_grad():
        model.base_model.medyate_values["default"].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="holds NaN/inf deltas; not saving"):
        model.save_pretrained(target)
    PeftModel.from_pretrained(net(), target)  # the previous save is intact


def test_saving_with_a_loader_spec_as_base_name_asks_no_hub_question(tmp_path) -> None:
    """`medyate train` records 'mcu:...'/'timm:...' as the base model; PEFT's vocabulary check must not warn."""
    import warnings

    model = trained()
    model.peft_config["default"].base_model_name_or_path = "mcu:mcunet-5fps"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "out")
    assert not [w for w in caught if "config file" in str(w.message)]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "mcu:mcunet-5fps")


def test_saving_into_the_working_directory_stays_in_place(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        trained().save_pretrained(".")
    assert "saved in place, not atomically: it holds the working directory" in caplog.text
    assert Path.cwd() == tmp_path and (tmp_path / "adapter_model.safetensors").is_file()


def _run_worker(out: Path, kill_in: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(TESTS / "reliability_worker.py"), "kill", str(out), "--kill-in", kill_in,
         "--kill-epoch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


@pytest.mark.slow
def test_killed_saves_keep_the_previous_files_and_resume_reaches_the_same_weights(tmp_path) -> None:
    """SIGKILL half-way through the checkpoint, half-way through the adapter weights, and just before
    the adapter folder is swapped in; then resume from the checkpoint left and compare with a run
    that was never interrupted."""
    runs = {kill: (tmp_path / kill, _run_worker(tmp_path / kill, kill)) for kill in ("checkpoint", "adapter", "swap")}
    threads = torch.get_num_threads()
    reference, adapters = tmp_path / "reference", {}
    try:
        model = worker.train(reference, on_epoch=lambda e, m: adapters.__setitem__(
            e, {k: v.clone() for k, v in get_peft_model_state_dict(m).items()}))
        uninterrupted = worker.final_state(model)
        for kill, (out, process) in runs.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == -9, f"{kill}: {stderr[-2000:]}"
            assert stdout.splitlines() == ["saved epoch 1"], kill
            saved_adapter = 2 if kill == "checkpoint" else 1  # the adapter is saved before the checkpoint
            on_disk = load_file(out / "adapter" / "adapter_model.safetensors")
            assert on_disk.keys() == adapters[saved_adapter].keys()
            assert all(torch.equal(on_disk[k], v) for k, v in adapters[saved_adapter].items()), kill
            assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
            PeftModel.from_pretrained(worker.tiny_net(), out / "adapter")
        out = runs["checkpoint"][0]
        resumed = worker.final_state(worker.train(out, resume=True))
    finally:
        torch.set_num_threads(threads)
    for key, value in uninterrupted["trained"].items():
        assert torch.equal(resumed["trained"][key], value), key
    for key in ("values", "selected", "generator", "epoch"):
        assert torch.equal(torch.as_tensor(resumed["medyate"][key]), torch.as_tensor(uninterrupted["medyate"][key]))
    for name, entry in uninterrupted["medyate"]["layers"].items():
        assert torch.equal(resumed["medyate"]["layers"][name]["delta"], entry["delta"]), name
    assert torch.equal(resumed["medyate"]["tracker"]["norms"], uninterrupted["medyate"]["tracker"]["norms"])
    left = sorted(p.name for p in runs["swap"][0].iterdir())
    assert any(".medyate-" in name for name in left)  # the killed save's staging folder...
    worker.make_model().save_pretrained(runs["swap"][0] / "adapter")
    assert sorted(p.name for p in runs["swap"][0].iterdir()) == ["adapter", "last.pt"]  # ...is cleaned up later


# -- 4. training faults ----------------------------------------------------------------------------
def test_nan_loss_is_reported_before_and_during_backward() -> None:
    model = get_peft_model(net(), config())
    loss = model(torch.randn(2, *INPUT)).sum() * float("nan")
    with pytest.raises(NonFiniteError, match="loss = nan is not finite"):
        model.base_model.check_finite(loss)
    last_selected = list(model.base_model.selection())[-1]
    with pytest.raises(NonFiniteError, match=rf"layer '{last_selected}' \(epoch 0\) on all \d+ selected input channels"):
        loss.backward()


def test_channel_diagnosis_names_the_channels() -> None:
    norms = torch.tensor([1.0, float("inf"), 2.0, float("nan")], dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"layer 'features.3' \(epoch 2\) on input channels \[5, 9\] of 4 selected"):
        check_channel_gradients("features.3", torch.tensor([1, 5, 7, 9]), norms, 2)


def test_non_finite_trained_values_stop_resample_before_anything_changes() -> None:
    model = trained()
    tuner = model.base_model
    plan = tuner.plans["default"]
    epoch, selected = plan.epoch, plan.selected.clone()
    with torch.no_grad():
        tuner.medyate_values["default"][0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"values trained in layer '\S+' during epoch 1 are not finite"):
        tuner.resample()
    assert plan.epoch == epoch and torch.equal(plan.selected, selected)


def test_detect_anomalies_off_skips_bad_steps_in_the_channel_statistics() -> None:
    model = get_peft_model(net(), config(detect_anomalies=False, strategy="medyate", layer_ranking={
        "lara": {"0": 1.0, "2": 1.0}, "rgn": {"0": 1.0, "2": 1.0}}, alpha_opt=0.01))
    x = torch.randn(2, *INPUT)
    (model(x).sum() * float("nan")).backward()  # a step a GradScaler would skip: no error
    model(x).sum().backward()
    tracker = model.base_model.plans["default"].tracker
    assert torch.isfinite(tracker.epoch_sum).all() and tracker.epoch_count.max() == 1


def test_resume_with_another_config_or_base_is_refused_before_anything_changes() -> None:
    state = trained().base_model.training_state_dict()
    other = get_peft_model(net(), config(strategy="static_random"))
    with pytest.raises(ValueError, match="trained with strategy 'full_random', this adapter uses 'static_random'"):
        other.base_model.load_training_state_dict(state)
    wider = get_peft_model(net(width=16), config()).base_model  # same layer names, other shapes
    before = wider.training_state_dict()
    with pytest.raises(ValueError, match="does not fit this layer.*different base model"):
        wider.load_training_state_dict(state)
    after = wider.training_state_dict()
    assert torch.equal(after["values"], before["values"]) and torch.equal(after["selected"], before["selected"])
    assert all(torch.equal(after["layers"][n]["delta"], e["delta"]) for n, e in before["layers"].items())


# -- 5. DDP ----------------------------------------------------------------------------------------
@pytest.mark.ddp
def test_ddp_ranks_with_different_seeds_fail_at_their_first_backward_on_every_rank(tmp_path) -> None:
    logs = [(tmp_path / f"rank{rank}.log").open("w") for rank in range(2)]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "reliability_worker.py"), "ddp-rank", str(rank), str(tmp_path / "store"),
             str(tmp_path)],
            stdout=logs[rank], stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        for rank in range(2)
    ]
    try:
        for process in ranks:  # generous for a loaded 2-core box; a stuck collective fails after 60 s (gloo)
            process.wait(timeout=300)
    finally:
        for process, log in zip(ranks, logs, strict=True):
            process.kill()
            log.close()
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
        same, different = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert same == "ok"
        assert "DDP ranks disagree at the first backward of adapter 'default', epoch 0 on seed" in different
        assert "rank 0=0, rank 1=1" in different and "selected channels" in different


# -- 6. the optimizer at resample() ----------------------------------------------------------------
def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    x, y = torch.randn(8, *INPUT), torch.randint(0, 4, (8,))
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_resample_refuses_what_is_not_the_models_optimizer() -> None:
    model = get_peft_model(net(), config())
    head_only = torch.optim.SGD(model.base_model.model[6].parameters(), lr=0.1)
    _epoch(model, head_only)
    with pytest.raises(TypeError, match="takes the torch.optim.Optimizer that trains the model, got 'sgd' \\(str\\)"):
        model.base_model.resample("sgd")
    with pytest.raises(ValueError, match="does not hold the trainable vector of adapter 'default'.*trains only"):
        model.base_model.resample(head_only)
    assert model.base_model.plans["default"].epoch == 0  # refused before anything changed


def test_resample_without_an_optimizer_warns_that_nothing_trained_the_channels(caplog) -> None:
    model = get_peft_model(net(), config())
    _epoch(model, torch.optim.SGD(model.base_model.model[6].parameters(), lr=0.1))
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        model.base_model.resample()
    assert "no optimizer step changed the trainable vector of adapter 'default' during epoch 0" in caplog.text


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), lambda p: torch.optim.Adam(p)])
def test_resample_without_the_optimizer_resets_its_stale_state_and_says_so(caplog, make) -> None:
    """Carried over, momentum moved a newly drawn channel by 0.69 on a step with zero gradient."""
    model = get_peft_model(net(), config())
    optimizer = make([p for p in model.parameters() if p.requires_grad])
    _epoch(model, optimizer)
    values = model.base_model.medyate_values["default"]
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        model.base_model.resample()  # the optimizer is not passed
    assert "resample() was called without the optimizer" in caplog.text and "was reset" in caplog.text
    values.grad = torch.zeros_like(values)
    optimizer.step()  # a zero gradient moves nothing
    assert not values.detach().any()


# -- 7. the Hub and portable files -----------------------------------------------------------------
def test_push_is_private_and_uploads_no_local_path(tmp_path, caplog) -> None:
    from test_hub import RecordingApi

    from medyate_peft import save_ranking
    from medyate_peft.hub import local_paths, push_adapter_to_hub

    loader = [(torch.randn(4, *INPUT), torch.randint(0, 4, (4,)))]
    ranking = medyate_peft.rank_layers(net(), loader, steps=1, progress=False)
    ranking["source"] = f"medyate rank --model hf:{tmp_path}/models/tiny-net --dataset data"
    path = save_ranking(ranking, tmp_path / "rankings" / "net.json")
    model = trained(strategy="medyate", layer_ranking=str(path))
    model.peft_config["default"].base_model_name_or_path = f"hf:{tmp_path}/models/tiny-net"
    api = RecordingApi(tmp_path / "uploaded")
    with caplog.at_level(logging.WARNING, logger="medyate_peft"):
        push_adapter_to_hub(model, "someone/tiny", api=api, dataset="data")
    assert api.calls[0][1]["private"] is True  # unless asked otherwise
    assert "local paths replaced by their last part" in caplog.text
    uploaded = {p.name: p.read_text() for p in (tmp_path / "uploaded").iterdir() if p.suffix in (".json", ".md")}
    assert uploaded.keys() == {"adapter_config.json", "README.md"}
    for name, text in uploaded.items():
        assert str(tmp_path) not in text and not local_paths(text), name
    config = json.loads(uploaded["adapter_config.json"])
    assert config["base_model_name_or_path"] == "hf:tiny-net"
    assert config["layer_ranking"]["lara"] == ranking["lara"]  # by content, not by path


def test_a_ranking_path_is_stored_by_content_so_the_adapter_loads_from_anywhere(tmp_path, monkeypatch) -> None:
    from medyate_peft import save_ranking

    loader = [(torch.randn(4, *INPUT), torch.randint(0, 4, (4,)))]
    monkeypatch.chdir(tmp_path)
    save_ranking(medyate_peft.rank_layers(net(), loader, steps=1, progress=False), "ranking.json")
    trained(strategy="medyate", layer_ranking="ranking.json").save_pretrained(tmp_path / "adapter")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = PeftModel.from_pretrained(net(), tmp_path / "adapter", is_trainable=True)
    assert isinstance(model.peft_config["default"].layer_ranking, dict)


@pytest.mark.parametrize("name", ["/tmp/escape", "../escape", "a/b", "x.y", ""])
def test_adapter_names_that_are_paths_are_refused(tmp_path, name) -> None:
    base = net()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="adapter name .* is not allowed: use a non-empty name without"):
        get_peft_model(base, config(), adapter_name=name)
    assert_unchanged(base, before)
    model = trained()
    with pytest.raises(ValueError, match="is not allowed"):
        model.add_adapter(name, config())
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
