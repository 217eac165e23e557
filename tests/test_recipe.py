"""`medyate train`'s recipe options: augmentation, gradient clipping, threads, the LoRA baseline, defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from medyate_peft.backbones import load_mcu_model
from medyate_peft.cli import main as cli_main
from medyate_peft.train import load_data_and_model, parse_args, train

REPO = Path(__file__).resolve().parents[1]
TIMM_TINY = ["--model", "timm:test_efficientnet", "--random-init", "--image-size", "32"]
QUIET = ["--no-progress", "--num-workers", "0", "--epochs", "1", "--batch-size", "8", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def halves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder of 2 classes whose images are dark on the left and bright on the right."""
    root = tmp_path_factory.mktemp("halves")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("test", 4)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 40, (32, 32, 3))
                pixels[:, 16:] += 200
                pixels[..., c] += 15
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _mirrored_share(args: list[str], halves: Path, draws: int = 24) -> float:
    """Share of training samples whose bright half is on the left: horizontally flipped ones."""
    _, _, train_set, _ = load_data_and_model(parse_args([*args, "--dataset", str(halves), "--output-dir", "x"]))
    flipped = 0
    for i in range(draws):
        x = train_set[i % len(train_set)]["pixel_values"]
        width = x.shape[-1]
        flipped += bool(x[..., : width // 2].mean() > x[..., width // 2 :].mean())
    return flipped / draws


@pytest.mark.parametrize("model", [TIMM_TINY, ["--model", "mcu:mcunet-5fps"]], ids=["timm", "mcu"])
def test_hflip_on_and_off(model: list[str], halves: Path) -> None:
    """Flips are on by default (about half the samples mirrored) and never happen with --no-hflip."""
    whole = [*model, "--crop-scale", "1", "1"]  # no crop that could hide which half is bright
    torch.manual_seed(0)
    assert 0.2 < _mirrored_share(whole, halves) < 0.8
    assert _mirrored_share([*whole, "--no-hflip"], halves) == 0


def test_crop_scale_reaches_the_transform_and_bad_values_are_refused(halves: Path, capsys) -> None:
    """--crop-scale 1 1 keeps whole images (two draws equal); the default crops (draws differ)."""
    for scale, same in ((["--crop-scale", "1", "1", "--no-hflip"], True), (["--no-hflip"], False)):
        _, _, train_set, _ = load_data_and_model(
            parse_args([*TIMM_TINY, *scale, "--dataset", str(halves), "--output-dir", "x"])
        )
        assert torch.equal(train_set[0]["pixel_values"], train_set[0]["pixel_values"]) is same
    argv = ["train", *TIMM_TINY, *QUIET, "--dataset", str(halves), "--crop-scale", "0", "1"]
    assert cli_main([*argv, "--output-dir", str(halves.parent / "bad")]) == 2
    assert "--crop-scale MIN MAX" in capsys.readouterr().err


def test_defaults_match_the_benchmark_recipe() -> None:
    """The options a user leaves alone are those of scripts/bench_configs/vision.yaml (epochs: README says why)."""
    recipe = yaml.safe_load((REPO / "scripts" / "bench_configs" / "vision.yaml").read_text())["recipe"]
    args = parse_args(["--model", "m", "--dataset", "d", "--output-dir", "o"])
    assert args.lr == recipe["lr"] and args.warmup_epochs == recipe["warmup_epochs"]
    assert args.batch_size == recipe["batch_size"] and args.clip_grad_norm == recipe["clip_grad_norm"]
    assert args.crop_scale == [0.25, 1.0] and args.hflip  # bench_common._random_resized_crop
    assert args.threads is None and args.method == "medyate"


def _head_change(halves: Path, tmp_path: Path, clip: str, lr: float) -> float:
    """Norm of the classifier's change after one epoch of --method head on MCUNet."""
    out = tmp_path / f"clip{clip}"
    train(parse_args(["--model", "mcu:mcunet-5fps", *QUIET, "--dataset", str(halves), "--method", "head",
                      "--lr", str(lr), "--warmup-epochs", "0", "--clip-grad-norm", clip, "--max-eval-samples", "2",
                      "--output-dir", str(out)]))
    trained = load_file(out / "model" / "model.safetensors")
    start = load_mcu_model("mcunet-5fps", num_classes=2).classifier  # seeded: the run's starting head
    with torch.no_grad():
        delta = torch.cat([(trained["classifier.weight"] - start.weight).flatten(), trained["classifier.bias"] - start.bias])
    return float(delta.norm())


def test_clip_grad_norm_bounds_every_step(halves: Path, tmp_path: Path) -> None:
    """SGD without momentum moves at most lr * clip per step; without clipping the same run moves far more."""
    lr, clip, steps = 1.0, 1e-4, 2  # 16 training images, batch 8
    clipped = _head_change(halves, tmp_path, str(clip), lr)
    free = _head_change(halves, tmp_path, "0", lr)
    assert 0 < clipped <= steps * lr * clip * (1 + 1e-4)
    assert free > 20 * steps * lr * clip


def test_threads_and_recipe_line(halves: Path, tmp_path: Path, capsys) -> None:
    """--threads sets torch's thread count for the run, and the recipe it prints says what it uses."""
    before = torch.get_num_threads()
    try:
        train(parse_args([*TIMM_TINY, *QUIET, "--dataset", str(halves), "--method", "head", "--threads", "1",
                          "--no-hflip", "--clip-grad-norm", "0", "--output-dir", str(tmp_path / "t")]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    recipe = next(line for line in out.splitlines() if line.startswith("recipe:"))
    assert "classifier only" in recipe and "no gradient clipping" in recipe and "1 torch threads" in recipe
    augmentation = next(line for line in out.splitlines() if line.startswith("augmentation:"))
    assert "scale=(0.25, 1.0)" in augmentation and "RandomHorizontalFlip" not in augmentation
    assert augmentation.endswith("no horizontal flip")
    argv = ["train", *TIMM_TINY, *QUIET, "--dataset", str(halves), "--output-dir", str(tmp_path / "bad")]
    assert cli_main([*argv, "--threads", "0"]) == 2 and "--threads must be at least 1" in capsys.readouterr().err
    assert cli_main([*argv, "--clip-grad-norm", "-1"]) == 2 and "--clip-grad-norm" in capsys.readouterr().err


def test_lora_targets_and_rank_rule_on_mcunet() -> None:
    """LoRA adapts every 1x1 conv of MCUNet (13 expansions + 14 projections), r gives ~the budget's values."""
    from medyate_peft.lora_baseline import lora_rank, lora_targets

    base = load_mcu_model("mcunet-5fps", num_classes=2)
    targets = lora_targets(base)
    assert len(targets) == 27 and all(base.get_submodule(t).kernel_size == (1, 1) for t in targets)
    assert "classifier" not in targets and "first_conv.conv" not in targets
    per_rank = sum(base.get_submodule(t).in_channels + base.get_submodule(t).out_channels for t in targets)
    r = lora_rank(base, targets, 15_936)  # 62.25 kB of fp32 values
    assert r >= 1 and abs(r * per_rank - 15_936) <= per_rank / 2
    assert lora_rank(base, targets, 1) == 1


def test_lora_baseline_trains_and_saves_a_peft_adapter(halves: Path, tmp_path: Path) -> None:
    """--method lora: PEFT LoRA on the pointwise layers with r from --budget-kb (or --lora-r), head trained."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from medyate_peft.lora_baseline import lora_rank, lora_targets
    from medyate_peft.models import load_model
    from medyate_peft.train import build_trainable

    budget_kb = 4.0  # 1,024 fp32 values
    result = train(parse_args([*TIMM_TINY, *QUIET, "--dataset", str(halves), "--method", "lora",
                               "--budget-kb", str(budget_kb), "--lr", "0.05", "--output-dir", str(tmp_path / "l")]))
    model = result["model"]
    base = load_model("timm:test_efficientnet", 2, pretrained=False, image_size=32).model
    targets = lora_targets(base)
    r = model.peft_config["default"].r
    assert isinstance(model, PeftModel) and r == lora_rank(base, targets, 1024)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == len(targets)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trained) and all("lora_" in n or "classifier" in n for n in trained)
    config = json.loads((tmp_path / "l" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == r
    assert config["base_model_name_or_path"] == "timm:test_efficientnet"
    assert result["history"][0]["memory"]["grad_kb"] > 0

    loaded = load_model("timm:test_efficientnet", 2, pretrained=False, image_size=32)
    pinned = build_trainable(loaded, parse_args([*TIMM_TINY, "--dataset", "d", "--output-dir", "o",
                                                 "--method", "lora", "--lora-r", "3"]))
    assert pinned.peft_config["default"].r == 3
