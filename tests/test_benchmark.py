"""The benchmark harness's bookkeeping: every grid run scheduled once, recorded runs skipped, the ordering table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402

CONFIGS = sorted((REPO / "scripts" / "bench_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_stages_schedule_every_run_of_the_grid_once(path: Path) -> None:
    config = benchmark.load_config(path)
    specs = benchmark.grid(config)
    ids = [s["id"] for s in specs]
    assert len(set(ids)) == len(ids)
    assert sorted(s["id"] for s in benchmark.ordered([config])) == sorted(ids)
    for cell in config["cells"]:
        for method in config["methods"]:
            runs = [s for s in specs if (s["network"], s["dataset"], s["method"]) == (cell["network"], cell["dataset"],
                                                                                  method)]
            budgets = cell["budgets"] if method in benchmark.BUDGET_METHODS else [None]
            assert sorted((s["seed"], s["budget_slots"] or 0) for s in runs) == sorted(
                (seed, b or 0) for seed in cell["seeds"] for b in budgets)


def test_the_full_recipe_names_its_device_precision_rankings_and_report() -> None:
    """device auto / fp32 from the config; bf16 runs get ids of their own; its 500-step rankings do not take
    the 50-step files of the CPU grid; one command writes one report."""
    full = benchmark.load_config(REPO / "scripts" / "bench_configs" / "vision_full_recipe.yaml")
    specs = benchmark.grid(full)
    assert len(specs) == 90 and {(s["device"], s["precision"]) for s in specs} == {("auto", "fp32")}
    assert {Path(s["ranking_path"]).name for s in specs if "ranking_path" in s} == {
        "mbv2-w0.35__caltech101__500steps.json", "mcunet-5fps__caltech101__500steps.json"}
    cpu = benchmark.load_config(REPO / "scripts" / "bench_configs" / "vision.yaml")
    assert all(Path(s["ranking_path"]).exists() for s in benchmark.grid(cpu) if "ranking_path" in s)
    assert all(s["device"] == "cpu" and s["precision"] == "fp32" for s in benchmark.grid(cpu))
    bf16 = benchmark.grid({**full, "precision": "bf16"})
    assert [s["id"] for s in bf16] == [f"{s['id']}__bf16" for s in specs]
    assert benchmark.report_name([full]) == "BENCHMARK_full_recipe" and benchmark.report_name([cpu]) == "BENCHMARK"
    with pytest.raises(ValueError, match="different reports"):
        benchmark.report_name([cpu, full])


def test_recorded_runs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    config = benchmark.load_config(REPO / "scripts" / "bench_configs" / "text.yaml")
    specs = benchmark.ordered([config])
    for spec in specs:
        (tmp_path / f"{spec['id']}.json").write_text("{}")
    monkeypatch.setattr(benchmark, "RUNS", tmp_path)
    benchmark.execute(specs, max_minutes=None, run_timeout=1, jobs=2)
    assert f"{len(specs)} of {len(specs)} runs already recorded; 0 to go" in capsys.readouterr().out


def _record(method: str, seed: int, top1: float, budget: int | None = 1000) -> dict:
    return {"suite": "vision", "network": "net", "dataset": "data", "method": method, "budget_slots": budget,
            "seed": seed, "top1": top1, "eval_size": 2000}


def test_ordering_table_per_seed_differences_and_verdict() -> None:
    records = [
        _record("medyate", 0, 0.62), _record("medyate", 1, 0.60),
        _record("trady", 0, 0.61), _record("trady", 1, 0.58),
        _record("static_random", 0, 0.55), _record("static_random", 1, 0.59),
        _record("medyate", 0, 0.50, 2000), _record("trady", 0, 0.52, 2000), _record("trady", 1, 0.40, 2000),
    ]
    rows = [line for line in benchmark.ordering_analysis(records) if line.startswith("| vision |")]
    assert len(rows) == 2
    first = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert first[2:9] == ["1,000", "0,1", "61.00", "59.50", "57.00", "+1.00, +2.00", "+6.00, -1.00"]
    assert first[-1] == "yes"
    second = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert second[3:6] == ["0", "50.00", "52.00"] and second[-1] == "no"  # seed 1 of TraDy alone is left out
    assert "holds (on the means over the seeds listed) in 1 of 2" in "\n".join(benchmark.ordering_analysis(records))


def test_method_summary_ratios_against_full_fine_tuning() -> None:
    def run(method: str, budget: int | None, top1: float, memory: int, step: float) -> dict:
        return {**_record(method, 0, top1, budget), "saved_activation_bytes": memory - 100, "weight_grad_bytes": 100,
                "step_time_median_s": step}

    records = [run("full", None, 0.50, 10_000, 1.0), run("medyate", 1000, 0.55, 500, 0.5),
               run("medyate", 2000, 0.45, 1_000, 0.7)]
    rows = [line for line in benchmark.method_summary(records) if line.startswith("| vision |")]
    assert rows == ["| vision | MeDyate | 2 | 0.050-0.100 | 0.60 | -5.00 / +0.00 / +5.00 |"]


def test_pilot_reuses_the_benchmark_runs_and_adds_only_the_variant(tmp_path: Path, monkeypatch) -> None:
    import pilot_cost_aware as pilot

    specs = pilot.specs()
    assert len(specs) == len(pilot.SEEDS) * len(pilot.METHODS) * len(pilot.BUDGETS)
    grid = {s["id"]: s for s in benchmark.grid(benchmark.load_config(REPO / "scripts" / "bench_configs" /
                                                                      "vision.yaml"))}
    for spec in specs:
        if spec.get("medyate_options"):
            assert spec["method"] == "medyate" and f"__{pilot.VARIANT}__" in spec["id"] and spec["id"] not in grid
        else:
            assert spec == grid[spec["id"]]  # the benchmark's own run, so its record is reused as it is
    monkeypatch.setattr(benchmark, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(pilot, "PILOT_RUNS", tmp_path / "pilot")
    for folder in (tmp_path / "runs", tmp_path / "pilot"):
        folder.mkdir()
    for i, spec in enumerate(specs[:-1]):  # one run still missing
        folder = tmp_path / ("pilot" if spec.get("medyate_options") else "runs")
        (folder / f"{spec['id']}.json").write_text(json.dumps({"recipe": spec["recipe"], "top1": 0.5 + i / 100}))
    text = pilot.report(specs)
    assert "| medyate-ca − trady |" in text and "| trady | 0.78 ± 0.95 (n=2) |" not in text
    assert f"Not run yet: 1 runs ({specs[-1]['id']})" in text
    spec = specs[0]
    (tmp_path / "runs" / f"{spec['id']}.json").write_text(json.dumps({"recipe": {"lr": 1}, "top1": 0.5}))
    with pytest.raises(ValueError, match="another recipe"):
        pilot.report(specs)
