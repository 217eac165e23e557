"""The benchmark harness's bookkeeping: every grid run scheduled once, recorded runs skipped, the ordering table;
the resolved grid's validation split, learning-rate choice, intervals and ordering marks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import benchmark  # noqa: E402

CONFIGS = sorted((REPO / "scripts" / "bench_configs").glob("*.yaml"))
SWEEP_CONFIGS = [p for p in CONFIGS if "lr_sweep" in benchmark.load_config(p)]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in SWEEP_CONFIGS], ids=lambda p: p.stem)
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


# -- the resolved grid: validation split, lr sweep, intervals, ordering marks ------------------------------
def test_validation_split_is_disjoint_from_the_train_subset_balanced_and_fixed_by_the_seed() -> None:
    import bench_common

    g = __import__("torch").Generator().manual_seed(3)
    counts = [300, 300, 300, 60, 300]  # one class too small to fill both splits evenly
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    labels = [labels[i] for i in __import__("torch").randperm(len(labels), generator=g).tolist()]
    train = bench_common._balanced_indices(labels, 500, seed=0)
    val = bench_common.validation_indices(labels, 400, seed=0, train_n=500)
    assert len(val) == 400 and len(set(val)) == 400 and not set(val) & set(train)
    per_class = [sum(labels[i] == c for i in val) for c in range(len(counts))]
    assert per_class[3] == 60 - sum(labels[i] == 3 for i in train)  # the small class: what the train subset left
    assert max(per_class) - min(c for i, c in enumerate(per_class) if i != 3) <= 1
    assert val == bench_common.validation_indices(labels, 400, seed=0, train_n=500)
    assert val != bench_common.validation_indices(labels, 400, seed=1, train_n=500)


def _sweep_config(tmp_path: Path) -> dict:
    config = benchmark.load_config(REPO / "scripts" / "bench_configs" / "vision_resolved.yaml")
    config["cells"] = config["cells"][:1]
    config["methods"] = ["classifier", "static_random", "trady", "medyate-ca"]
    return config


def _write(runs: Path, spec: dict, **record: object) -> None:
    runs.mkdir(exist_ok=True)
    (runs / f"{spec['id']}.json").write_text(json.dumps({**spec, **record}))


def test_lr_is_chosen_on_validation_only_then_every_seed_and_budget_runs_at_it(tmp_path: Path) -> None:
    config = _sweep_config(tmp_path)
    runs = tmp_path / "runs"
    sweep = [s for s in benchmark.grid(config, runs) if s["method"] == "trady"]
    assert [s["phase"] for s in sweep] == ["sweep"] * 3 and [s["lr"] for s in sweep] == config["lr_sweep"]["lrs"]
    assert {s["budget_slots"] for s in sweep} == {config["cells"][0]["budgets"][config["lr_sweep"]["budget_index"]]}
    # the test top-1 (which no sweep run records in practice) would pick 0.05; validation picks 0.125
    for i, (spec, val, test) in enumerate(zip(sweep, (0.50, 0.60, 0.55), (0.90, 0.10, 0.10), strict=True)):
        assert not [s for s in benchmark.grid(config, runs) if s["method"] == "trady" and s["phase"] == "final"], i
        _write(runs, spec, val_top1=val, top1=test)
    finals = [s for s in benchmark.grid(config, runs) if s["method"] == "trady" and s["phase"] == "final"]
    cell = config["cells"][0]
    assert sorted((s["seed"], s["budget_slots"]) for s in finals) == sorted(
        (seed, b) for seed in cell["seeds"] for b in cell["budgets"])
    assert {s["lr"] for s in finals} == {0.125} and all(s["id"].endswith("__lr0.125") for s in finals)
    assert not [s for s in benchmark.grid(config, runs) if s["method"] == "medyate-ca" and s["phase"] == "final"]
    # a tie goes to the smaller learning rate
    for spec in [s for s in benchmark.grid(config, runs) if s["method"] == "classifier"]:
        _write(runs, spec, val_top1=0.5)
    assert {s["lr"] for s in benchmark.grid(config, runs) if s["method"] == "classifier" and s["phase"] == "final"} \
        == {0.05}


def test_sweep_grid_ids_are_unique_and_only_dynamic_strategies_get_the_step_cadence(tmp_path: Path) -> None:
    config = _sweep_config(tmp_path)
    runs = tmp_path / "runs"
    for spec in benchmark.grid(config, runs):
        _write(runs, spec, val_top1=0.5)
    specs = benchmark.grid(config, runs)
    ids = [s["id"] for s in specs]
    assert len(ids) == len(set(ids)) and sorted(s["id"] for s in benchmark.ordered([config])) != []
    every = config["recipe"]["resample_every"]
    for s in specs:
        options = s.get("medyate_options", {})
        assert (options.get("resample_every") == every) == (s["method"] in ("trady", "medyate-ca")), s["id"]
    ca = next(s for s in specs if s["method"] == "medyate-ca")
    assert ca["strategy"] == "medyate" and ca["medyate_options"]["draw_weights"] == "norm_per_cost"
    assert ca["ranking_path"].endswith("mbv2-w0.35__caltech101.json")


def test_interval_is_the_95_percent_t_interval_and_resolved_when_it_excludes_zero() -> None:
    import bench_report as br

    iv = br.Interval.of([0.02, 0.03, 0.04])
    assert iv.mean == pytest.approx(0.03) and iv.n == 3
    assert iv.half == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert iv.resolved and iv.text(signed=True) == "+3.00 ± 2.48 (n=3)"
    assert not br.Interval.of([0.01, 0.02, 0.03]).resolved  # 2.00 ± 2.48 includes 0
    assert br.Interval.of([-0.02, -0.03, -0.04]).resolved
    assert not br.Interval.of([0.05]).resolved and br.Interval.of([0.05]).text() == "5.00 (n=1)"
    assert br.Interval.of([]).text() == "-"


def _final(method: str, seed: int, budget: int, top1: float) -> dict:
    return {"network": "net", "dataset": "data", "method": method, "budget_slots": budget, "seed": seed, "top1": top1}


def test_ordering_marks_which_differences_are_resolved_and_the_default_bar() -> None:
    import bench_report as br

    finals = []
    for seed, noise in enumerate((0.0, 0.004, -0.003)):
        finals += [_final("trady", seed, 100, 0.60 + noise), _final("trady", seed, 200, 0.62 + noise),
                   _final("static_random", seed, 100, 0.55 + noise / 2), _final("static_random", seed, 200, 0.56),
                   _final("medyate", seed, 100, 0.61 + noise), _final("medyate", seed, 200, 0.57 + noise),
                   _final("medyate-ca", seed, 100, 0.60 + (0.01 if seed == 1 else -0.005)),
                   _final("medyate-ca", seed, 200, 0.625 + noise)]
    rows = {(claim, budget): (diff, br.verdict(diff)) for _, claim, budget, diff in br.claim_rows(finals)}
    without_ca = {claim for _, claim, _, _ in br.claim_rows([r for r in finals if r["method"] != "medyate-ca"])}
    assert without_ca == {"MeDyate ≥ TraDy", "TraDy ≥ static random", "MeDyate ≥ static random"}
    assert rows[("TraDy ≥ static random", 100)][1] == "**holds, resolved**"
    assert rows[("MeDyate ≥ TraDy", 200)][0].mean == pytest.approx(-0.05)
    assert rows[("MeDyate ≥ TraDy", 200)][1] == "**fails, resolved**"
    assert rows[("MeDyate-CA ≥ TraDy", 100)][1] in ("holds, not resolved", "fails, not resolved")
    trends = {(m, small, large): diff for _, m, small, large, diff in br.trend_rows(finals)}
    assert trends[("medyate", 100, 200)].resolved and trends[("medyate", 100, 200)].mean < 0
    ok, reasons = br.meets_default_bar(finals, "medyate")
    assert not ok and any("below trady, resolved" in r for r in reasons) and any("falls" in r for r in reasons)
    ok, checked = br.meets_default_bar(finals, "medyate-ca")
    assert ok and checked == ["net / data @ 100", "net / data @ 200"]
    assert not br.meets_default_bar([r for r in finals if r["seed"] == 0], "medyate-ca")[0]  # n = 1 decides nothing
    ok, checked = br.meets_default_bar(finals, "trady")  # the reference: its trend alone
    assert ok and checked == ["net / data @ 100", "net / data @ 200"]


def test_upper_bound_table_pairs_full_fine_tuning_with_every_budgeted_run() -> None:
    import bench_report as br

    finals = [{**_final("full", s, None, 0.80 + d), "method": "full"} for s, d in enumerate((0.0, 0.005, -0.004))]
    finals += [_final("trady", s, b, top) for s in range(3) for b, top in ((100, 0.70 + s / 1000), (200, 0.80))]
    table = "\n".join(br.upper_bound_table(finals, {"trady": "TraDy", "full": "full"}))
    assert "| net / data | full − TraDy | 100 | +9.93 ± " in table and "**yes, resolved**" in table
    assert "| net / data | full − TraDy | 200 | +0.03 ± " in table and "yes, not resolved" in table
    assert "no full" not in table and len(table.splitlines()) == 4
    assert br.upper_bound_table([r for r in finals if r["method"] != "full"], {})[0].startswith("No network")


def test_clipping_table_says_which_methods_need_the_clip() -> None:
    import bench_report as br

    def sweep(method: str, lr: float, val: float, norm: float | None = None) -> dict:
        return {"network": "net", "dataset": "data", "method": method, "budget_slots": 5, "seed": 0, "lr": lr,
                "val_top1": val, "phase": "sweep", "grad_norm_median": norm}

    unclipped = [sweep("trady", 0.1, 0.60, 3.0), sweep("trady", 0.3, 0.50, 4.0), sweep("full", 0.1, 0.30, 9.0),
                 {**sweep("full", 1.0, None), "diverged_at_step": 2}]  # no score: its lr is lost without the clip
    clipped = [sweep("trady", 0.1, 0.55), sweep("trady", 0.3, 0.58), sweep("full", 0.1, 0.25),
               sweep("full", 0.3, 0.40),  # its unclipped run diverged: no record, the clipped one still counts
               {**sweep("full", 0.1, 0.99), "phase": "final"}]  # finals are never compared
    lines = br.clipping_table(unclipped, clipped, {"trady": "TraDy", "full": "full"})
    verdicts = {line.split(" | ")[1]: line.rsplit(" | ", 1)[1] for line in lines if line.count("|") == 6 and
                line.split(" | ")[-1].strip("| ") in ("yes", "no")}
    assert verdicts == {"TraDy": "no |", "full": "yes |"}
    assert "| net / data | TraDy | 0.3 | 50.00 | 58.00 | 4.00 |" in lines
    assert "| net / data | full | 1 | diverged (step 2) | - | - |" in lines


def test_a_diverged_sweep_run_is_left_out_of_the_choice_and_the_sweep_completes(tmp_path: Path) -> None:
    import bench_report as br

    config = _sweep_config(tmp_path)
    runs = tmp_path / "runs"
    sweep = [s for s in benchmark.grid(config, runs) if s["method"] == "trady"]
    _write(runs, sweep[0], val_top1=0.40)
    _write(runs, sweep[1], val_top1=None, top1=None, diverged_at_step=7)  # would be the best: it is not trained
    _write(runs, sweep[2], val_top1=0.45)
    finals = [s for s in benchmark.grid(config, runs) if s["method"] == "trady" and s["phase"] == "final"]
    assert finals and {s["lr"] for s in finals} == {sweep[2]["lr"]}
    for spec in [s for s in benchmark.grid(config, runs) if s["method"] == "classifier"]:
        _write(runs, spec, val_top1=None, top1=None, diverged_at_step=3)
    assert not [s for s in benchmark.grid(config, runs) if s["method"] == "classifier" and s["phase"] == "final"]
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    lines = br.sweep_table(records, {("mbv2-w0.35", "cifar10", "trady"): sweep[2]["lr"]}, {})
    trady = next(line for line in lines if "| trady |" in line)
    assert "diverged (step 7)" in trady and f"**{45.0:.2f}**" in trady and trady.endswith(f"| {sweep[2]['lr']:g} |")
    assert next(line for line in lines if "| classifier |" in line).endswith("| every lr diverged |")


def test_a_sweep_only_grid_plans_no_final_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _sweep_config(tmp_path)
    config["lr_sweep"] = {**config["lr_sweep"], "only": True}
    runs = tmp_path / "runs"
    for spec in benchmark.grid(config, runs):
        _write(runs, spec, val_top1=0.5 + 0.1 * (spec["lr"] == config["lr_sweep"]["lrs"][1]))
    assert {s["phase"] for s in benchmark.grid(config, runs)} == {"sweep"}
    # its report names each method's choice and expects no final run
    monkeypatch.setattr(benchmark, "RUNS", runs)
    records = [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    sweeps, finals, chosen, missing = benchmark._sweep_and_finals([config], records)
    assert len(sweeps) == len(records) and not finals and not missing
    assert set(chosen.values()) == {config["lr_sweep"]["lrs"][1]} and len(chosen) == len(config["methods"])


def test_full_fine_tuning_with_frozen_bn_statistics_trains_every_weight_and_keeps_the_running_stats() -> None:
    import bench_common
    import torch
    from torch import nn

    for method, stats_move in (("full", True), ("full_frozen_bn", False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        model(torch.randn(2, 3, 6, 6))
        setup = bench_common.setup_method({"method": method}, model, None)
        setup.train_mode()
        mean, weight = model[1].running_mean.clone(), model[1].weight.detach().clone()
        optimizer = torch.optim.SGD(setup.params, lr=0.1)
        model(torch.randn(8, 3, 6, 6) + 3).sum().backward()
        optimizer.step()
        assert len(setup.params) == len(list(model.parameters()))
        assert not torch.equal(model[1].weight, weight), method  # BN's affine weights train either way
        assert torch.equal(model[1].running_mean, mean) != stats_move, method
