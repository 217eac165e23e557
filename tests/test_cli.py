"""The `medyate` command: plan tables that add up, adapter summaries, and one-line errors a user can act on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from peft import get_peft_model

from medyate_peft import MeDyateConfig
from medyate_peft.cli import main
from medyate_peft.hub import summarize_model, write_model_card
from medyate_peft.models import load_model

ROW = re.compile(r"^(\S+)\s+(conv|conv-dw|linear)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(yes|-)\s+(\d+|-)$")


def _plan_rows(text: str) -> list[tuple[str, int, int, str]]:
    """(layer, in channels, slots per channel, selected) of every table row."""
    rows = []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows.append((match[1], int(match[3]), int(match[6]), match[9]))
    return rows


def test_plan_mcunet_matches_the_papers_accounting(
    shared_assets: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDYATE_MCU_DIR", str(shared_assets / "models" / "mcu"))
    assert main(["plan", "--model", "mcunet-5fps", "--budget-kb", "62.25", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    # Spec section 2: full fine-tuning of MCUNet at 128x128 counts 1,309,808 slots; 62.25 kB = 15,936 slots.
    assert "(1,309,808 slots)" in out and "15,936 slots of 4 bytes" in out
    rows = _plan_rows(out)
    assert len(rows) == 42
    used = sum(int(sel) * slots for _, _, slots, sel in rows if sel != "-")
    channels = sum(int(sel) for *_, sel in rows if sel != "-")
    assert 15_936 - min(slots for _, _, slots, _ in rows) < used <= 15_936  # filled up to the cheapest channel
    assert f"selected: {channels:,} of {sum(r[1] for r in rows):,} input channels" in out
    assert f"{used:,} of 15,936 slots" in out
    # full_random pools every layer: its activation share is that of full fine-tuning, from the table's columns
    table = [ROW.match(line) for line in out.splitlines() if ROW.match(line)]
    stored = sum(int(m[3]) * int(m[5]) for m in table)
    share = f"{stored / 1_309_808:.1%}"
    assert f"pool: 42 of 42 layers, 1,309,808 slots, {share} of them stored activation; earliest layer " in out
    assert "(candidate 1 of 42 in network order)" in out


def test_plan_timm_model_with_input_size_and_measure(capsys: pytest.CaptureFixture) -> None:
    argv = ["plan", "--model", "timm:test_efficientnet", "--budget-kb", "8", "--input-size", "3", "48", "48",
            "--num-classes", "3", "--measure"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("timm:test_efficientnet, input [3, 48, 48], strategy full_random")
    rows = _plan_rows(out)
    stem = timm.create_model("test_efficientnet").conv_stem
    first_conv = next(r for r in rows if r[0] == "conv_stem")  # cost = C^W (outputs x kernel) + C^A (48 x 48 input)
    assert first_conv[2] == stem.out_channels * stem.kernel_size[0] * stem.kernel_size[1] + 48 * 48
    assert re.search(r"measured \(one step, batch 1, zero input\): saved activations of the selected channels "
                     r"[\d.]+ kB", out)


def test_plan_shows_what_the_cost_aware_pools_change(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The papers' fp32 MbV2 at its largest reference budget: the pool line of the alpha rule, then inside RGN-97 %."""
    from medyate_peft import rank_layers, save_ranking

    model = load_model("zoo:mbv2-w0.35", 10, pretrained=False).model
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 128, 128, generator=g), torch.tensor([1, 2]))]
    ranking = save_ranking(rank_layers(model, data, steps=1, lr=0.0, progress=False), tmp_path / "r.json")
    argv = ["plan", "--model", "zoo:mbv2-w0.35", "--num-classes", "10", "--budget-kb", "366", "--strategy",
            "medyate", "--layer-ranking", str(ranking)]
    shares = {}
    for extra in ([], ["--lara-within-rgn"], ["--max-activation-share", "0.4"]):
        assert main([*argv, *extra]) == 0
        out = capsys.readouterr().out
        assert "(1,252,320 slots)" in out and "93,696 slots of 4 bytes" in out
        match = re.search(r"pool: (\d+) of 52 layers, [\d,]+ slots, ([\d.]+)% of them stored activation; "
                          r"earliest layer (\S+) \(candidate (\d+) of 52", out)
        shares[tuple(extra)] = float(match[2])
    assert shares[("--max-activation-share", "0.4")] <= 40.0
    assert len(set(shares.values())) == 3  # each option changes the pool
    assert main([*argv[:-4], "--strategy", "full_random", "--max-activation-share", "0.5"]) == 2
    assert "pools every layer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--model", "no-such-net", "--budget-kb", "64"], "unknown model 'no-such-net'"),
        (["plan", "--model", "timm:test_efficientnet", "--budget-kb", "0.01"], "too small for any single channel"),
        (["plan", "--model", "timm:test_efficientnet", "--budget-kb", "8", "--strategy", "medyate"],
         "pass --layer-ranking FILE"),
        (["plan", "--model", "timm:test_efficientnet", "--budget-kb", "8", "--strategy", "nope"], "unknown strategy"),
        (["inspect", "/no/such/adapter"], "no such folder"),
        (["train", "--model", "timm:test_efficientnet", "--dataset", "/no/such/data.parquet", "--output-dir",
          "{tmp}/out"], "no such file or folder"),
    ],
)
def test_clear_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medyate {argv[0]}: error:") and message in err and "\n" not in err


def test_model_resolution_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--weights .*: no such file"):
        load_model("timm:test_efficientnet", 3, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(OSError, match="--weights PATH"):  # offline: Hub weights cannot be fetched
        load_model("test_efficientnet", 3)
    with pytest.raises(ValueError, match="MCU models load their own weights"):
        load_model("mcunet-5fps", 3, weights="w.pth")


@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[Path, object]:
    base = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    model = get_peft_model(base, MeDyateConfig(budget_kb=6, input_size=[3, 32, 32], strategy="full_random"))
    model.peft_config["default"].base_model_name_or_path = "timm:test_efficientnet"
    with torch.no_grad():
        model.base_model.medyate_values["default"].fill_(0.01)
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    write_model_card(model, tmp_path, dataset="tiny", metrics={"eval_accuracy": 0.75})
    return tmp_path, model


def test_inspect_summarises_a_saved_adapter(saved_adapter, capsys: pytest.CaptureFixture) -> None:
    folder, model = saved_adapter
    summary = summarize_model(model)
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "base model:  timm:test_efficientnet" in out
    assert "budget:      6 kB per sample (1,536 slots of 4 bytes)" in out
    assert f"updated:     {summary.channels_updated:,} input channels in {len(summary.layers)} layers" in out
    assert "evaluation:  accuracy 0.75 on tiny" in out
    for layer in summary.layers:
        assert re.search(rf"^{re.escape(layer.name)}\s+{layer.channels}/{layer.in_channels}\s", out, re.M)


def test_inspect_rejects_other_adapters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a saved adapter: it has no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["inspect", str(tmp_path)]) == 2
    assert "LORA adapter, not a MeDyate one" in capsys.readouterr().err


def test_console_script_is_installed(saved_adapter) -> None:
    """`medyate` (pyproject's console script) runs the same CLI."""
    folder, _ = saved_adapter
    script = Path(sys.executable).with_name("medyate")
    if not script.is_file():
        pytest.skip("package not installed into this interpreter's environment")
    proc = subprocess.run([str(script), "inspect", str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"MeDyate adapter in {folder}")
