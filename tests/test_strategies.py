"""Every strategy of the papers: pool layers, static/dynamic behaviour, oracles, Trainer epochs, MCUNet budgets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from test_ranking import INPUT, batches, net
from torch import nn

import medyate_peft  # noqa: F401
from medyate_peft import STRATEGIES, MeDyateCallback, MeDyateConfig, rank_layers
from medyate_peft.ranking import channel_norms, select_by_alpha, select_by_rgn
from medyate_peft.sampling import ChannelPool, greedy_fill

BUDGET_KB = 1.0  # 256 slots of the 2,216 that the test net's four layers cost


@pytest.fixture(scope="module")
def ranking() -> dict:
    return rank_layers(net(), batches(2), steps=2, progress=False)


def make(strategy: str, ranking: dict, seed: int = 0) -> nn.Module:
    config = MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy=strategy, layer_ranking=ranking, seed=seed)
    return get_peft_model(net(), config)


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: F.cross_entropy(model(x), y)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    model.train()
    for x, y in batches(2, size=8 + epoch):
        optimizer.zero_grad()
        F.cross_entropy(model(x) * (1 + epoch), y).backward()
        optimizer.step()


def snapshot(model: nn.Module) -> dict[str, list[int]]:
    return {k: v.tolist() for k, v in model.selection().items()}


def expected_det_rgn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, list[int]]:
    """DetRGN from scratch: dense autograd on a merged copy, n/cost per channel, best first, greedy fill."""
    tuner = model.base_model
    plan = tuner.plans["default"]
    pool = plan.pool or ChannelPool.build(tuner.layer_costs())  # det_rgn draws from every layer
    merged = copy.deepcopy(model).merge_and_unload().requires_grad_(True)
    F.cross_entropy(merged(x), y).backward()
    modules = dict(merged.named_modules())
    scores = torch.cat([
        channel_norms(modules[c.name].weight.grad, getattr(modules[c.name], "groups", 1)).double() / c.channel_slots
        for c in pool.costs
    ])
    taken = greedy_fill(torch.argsort(scores, descending=True, stable=True), pool.slots, plan.budget)
    return {k: v.tolist() for k, v in pool.to_selection(taken).items()}


def test_the_table_has_every_strategy_of_the_papers_with_its_cost():
    assert set(STRATEGIES) == {"medyate", "trady", "topk_random", "full_random", "static_random", "det_rgn",
                               "static_det_rgn", "prob_raw", "lara_trady", "prev_medyate", "lara_det_raw"}
    assert MeDyateConfig().strategy == "medyate"
    for strategy in STRATEGIES.values():
        assert "\n" not in strategy.summary and ("no extra" in strategy.summary or "dense backward" in strategy.summary)
        assert strategy.needs_full_gradient == ("dense backward" in strategy.summary)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_each_strategy_draws_from_its_layers_within_the_budget(name, ranking):
    strategy = STRATEGIES[name]
    model = make(name, ranking)
    tuner = model.base_model
    x, y = batches(1, size=8)[0]
    if strategy.needs_full_gradient:
        assert not tuner.is_planned("default")
        tuner.plan(full_gradient=closure_for(model, x, y))
    plan = tuner.plans["default"]
    costs = tuner.layer_costs()
    pool = sorted(c.name for c in plan.pool.costs)
    if strategy.layers == "all":
        assert pool == sorted(c.name for c in costs)
    elif strategy.layers == "lara":
        assert pool == sorted(select_by_alpha(costs, ranking["lara"], plan.budget, 0.2)) and len(pool) < len(costs)
    else:
        assert pool == sorted(select_by_rgn(costs, ranking["rgn"], 0.97))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    selections = [snapshot(model)]
    for epoch in range(3):
        train_epoch(model, optimizer, epoch)
        full_gradient = closure_for(model, *batches(1, size=5 + epoch)[0]) if strategy.needs_full_gradient else None
        model.resample(optimizer, full_gradient=full_gradient)
        selections.append(snapshot(model))
        used = int(plan.pool.slots[plan.selected].sum())
        left = torch.ones(len(plan.pool), dtype=torch.bool)
        left[plan.selected] = False
        assert used <= plan.budget and int(plan.pool.slots[left].min()) > plan.budget - used  # greedy fill
        assert set(selections[-1]) <= set(pool)
    if strategy.dynamic and strategy.order not in ("det_rgn", "det_raw"):
        assert len({str(s) for s in selections}) > 2, "a dynamic strategy re-draws"
    elif not strategy.dynamic:
        assert all(s == selections[0] for s in selections), "a static strategy keeps its channels"


@pytest.mark.parametrize("name", ["det_rgn", "static_det_rgn"])
def test_det_rgn_takes_the_best_channels_by_full_gradient_rgn(name, ranking):
    model = make(name, ranking)
    x, y = batches(1, size=8)[0]
    expected = expected_det_rgn(model, x, y)
    model.base_model.plan(full_gradient=closure_for(model, x, y))
    assert snapshot(model) == expected
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    train_epoch(model, optimizer, epoch=1)
    x2, y2 = batches(1, size=5)[0]
    moved = expected_det_rgn(model, x2, y2)
    model.resample(optimizer, full_gradient=closure_for(model, x2, y2))
    assert snapshot(model) == (moved if name == "det_rgn" else expected)


def test_ablations_swap_one_part_of_medyate_and_trady():
    """MeDyate's Fig. 8: LaRa TraDy = MeDyate's pool with TraDy's draws; Prev MeDyate = TraDy's pool, MeDyate's draws."""
    medyate, trady = STRATEGIES["medyate"], STRATEGIES["trady"]
    assert (STRATEGIES["lara_trady"].layers, STRATEGIES["lara_trady"].order) == (medyate.layers, trady.order)
    assert (STRATEGIES["prev_medyate"].layers, STRATEGIES["prev_medyate"].order) == (trady.layers, medyate.order)
    assert STRATEGIES["lara_det_raw"].layers == "lara" and STRATEGIES["lara_det_raw"].needs_full_gradient


def expected_det_raw(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, list[int]]:
    """LaRa DetRaw from scratch: raw channel norms summed over the batches, in the LaRa pool, best first."""
    tuner = model.base_model
    plan = tuner.plans["default"]
    merged = copy.deepcopy(model).merge_and_unload().requires_grad_(True)
    modules = dict(merged.named_modules())
    scores = torch.zeros(len(plan.pool), dtype=torch.float64)
    for x, y in data:
        merged.zero_grad()
        F.cross_entropy(merged(x), y).backward()
        scores += torch.cat([channel_norms(modules[c.name].weight.grad, getattr(modules[c.name], "groups", 1)).double()
                             for c in plan.pool.costs])
    taken = greedy_fill(torch.argsort(scores, descending=True, stable=True), plan.pool.slots, plan.budget)
    return {k: v.tolist() for k, v in plan.pool.to_selection(taken).items()}


def test_lara_det_raw_takes_the_top_raw_norms_of_several_batches(ranking):
    model = get_peft_model(net(), MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy="lara_det_raw",
                                                layer_ranking=ranking, full_gradient_batches=3))
    first = batches(3, size=8)
    calls = iter(first)
    model.base_model.plan(full_gradient=lambda: _loss(model, next(calls)))
    assert snapshot(model) == expected_det_raw(model, first)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    train_epoch(model, optimizer, epoch=1)
    later = batches(3, size=5)
    expected = expected_det_raw(model, later)
    calls = iter(later)
    model.resample(optimizer, full_gradient=lambda: _loss(model, next(calls)))
    assert snapshot(model) == expected
    with pytest.raises(StopIteration):  # exactly full_gradient_batches calls were made
        next(calls)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def test_full_gradient_of_several_batches_is_the_sum_of_their_norms(ranking):
    from medyate_peft.oracles import measure_full_gradient

    model = make("det_rgn", ranking).eval()  # eval: no lazy planning from these forwards
    layers = model.base_model.medyate_layers()
    data = batches(2, size=8)
    single = [measure_full_gradient(layers, lambda b=b: _loss(model, b)) for b in data]
    calls = iter(data)
    both = measure_full_gradient(layers, lambda: _loss(model, next(calls)), batches=2)
    assert both.steps == 2
    for name in layers:
        torch.testing.assert_close(both.channel[name], single[0].channel[name] + single[1].channel[name])
    with pytest.raises(ValueError, match="full_gradient_batches must be an int >= 1"):
        MeDyateConfig(strategy="det_rgn", full_gradient_batches=0)


def test_prob_raw_draws_measured_channels_first(ranking):
    model = make("prob_raw", ranking)
    x, y = batches(1, size=8)[0]
    tuner = model.base_model
    tuner.plan(full_gradient=closure_for(model, x, y))
    plan = tuner.plans["default"]
    assert plan.full_norms.min() >= 0 and plan.full_norms.max() > 0
    plan.full_norms = torch.zeros_like(plan.full_norms)
    favoured = torch.tensor([0, len(plan.pool) - 1])
    plan.full_norms[favoured] = 1.0
    tuner._draw("default")
    assert set(favoured.tolist()) <= set(plan.selected.tolist())


def test_dynamic_oracles_need_a_full_gradient_at_every_epoch(ranking):
    model = make("det_rgn", ranking)
    x, y = batches(1)[0]
    model.base_model.plan(full_gradient=closure_for(model, x, y))
    before = model.base_model.plans["default"].tracker.epochs_done
    with pytest.raises(ValueError, match="full_gradient="):
        model.resample()
    assert model.base_model.plans["default"].tracker.epochs_done == before  # nothing half-done


def test_optimizer_state_of_reassigned_slots_is_reset(ranking):
    model = make("medyate", ranking)
    values = model.base_model.medyate_values["default"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    train_epoch(model, optimizer, epoch=0)
    assert values in optimizer.state
    model.resample(optimizer)
    assert values not in optimizer.state
    assert any(p in optimizer.state for p in model.parameters() if p is not values)  # the head keeps its state


class Wrapped(nn.Module):
    """The test net with a transformers-style forward(x, labels) -> {loss, logits}."""

    def __init__(self) -> None:
        super().__init__()
        self.net = net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("strategy", ["full_random", "det_rgn"])
def test_trainer_callback_resamples_at_every_epoch(strategy, ranking, tmp_path):
    from transformers import Trainer, TrainingArguments

    x, y = batches(1, size=16)[0]
    dataset = [{"x": x[i], "labels": y[i]} for i in range(16)]
    config = MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy=strategy, ranking_batches=1,
                           modules_to_save=["net.classifier"])
    model = get_peft_model(Wrapped(), config)
    tuner = model.base_model
    first = snapshot(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    norms = []
    callback = MeDyateCallback()
    original = tuner.resample

    def spy(*a, **kw):
        original(*a, **kw)
        norms.append(None if tuner.plans["default"].full_norms is None else tuner.plans["default"].full_norms.clone())

    tuner.resample = spy
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()
    plan = tuner.plans["default"]
    assert plan.epoch == 3 and len(norms) == 3
    if strategy == "full_random":
        assert snapshot(model) != first
    else:  # planned after the first (dense) batch, then a fresh full gradient at each epoch end
        assert not first and norms[0] is not None and not torch.equal(norms[0], norms[-1])


def test_trainer_callback_resamples_every_n_steps(ranking, tmp_path):
    """resample_every=3 over 2 epochs of 4 steps: draws after steps 3 and 6 only, none at the epoch ends;
    the oracle's full gradient then sums full_gradient_batches train batches."""
    from transformers import Trainer, TrainingArguments

    x, y = batches(1, size=16)[0]
    dataset = [{"x": x[i], "labels": y[i]} for i in range(16)]
    config = MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy="det_rgn", ranking_batches=1,
                           modules_to_save=["net.classifier"], resample_every=3, full_gradient_batches=2)
    model = get_peft_model(Wrapped(), config)
    tuner = model.base_model
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    steps, full_gradient_batches = [], []
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[MeDyateCallback()])
    original_resample, original_full = tuner.resample, tuner._full_gradient

    def spy(*a, **kw):
        steps.append(trainer.state.global_step)
        original_resample(*a, **kw)

    def full_spy(closure, batches=1):
        stats = original_full(closure, batches)
        full_gradient_batches.append(stats.steps)
        return stats

    tuner.resample, tuner._full_gradient = spy, full_spy
    trainer.train()
    assert steps == [3, 6] and tuner.plans["default"].epoch == 2
    assert full_gradient_batches == [2, 2]


@pytest.mark.parametrize(("ranking_batches", "step", "every", "mode"),
                         [(1, 8, None, "dense"), (3, 2, None, "dense"), (1, 6, 4, "dense"), (3, 2, None, "budgeted")],
                         ids=["after-resample", "mid-ranking", "every-4-steps", "mid-budgeted-ranking"])
def test_trainer_resume_from_checkpoint_continues_exactly(tmp_path, ranking_batches, step, every, mode):
    """An interrupted Trainer run resumed mid-epoch ends with the same weights, deltas and channels.

    Also from a checkpoint taken while the first batches' dense gradients were still being measured,
    and with draws every 4 steps (not at epoch ends), from a checkpoint inside a sampling period.
    """
    from transformers import Trainer, TrainingArguments

    from medyate_peft.callbacks import TRAINING_STATE_NAME

    x, y = batches(1, size=24)[0]
    dataset = [{"x": x[i], "labels": y[i]} for i in range(24)]

    def make() -> nn.Module:
        torch.manual_seed(0)
        config = MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy="medyate",
                               ranking_batches=ranking_batches, modules_to_save=["net.classifier"],
                               resample_every=every, ranking_mode=mode)
        return get_peft_model(Wrapped(), config)

    def trainer(model: nn.Module, out: Path, callback: MeDyateCallback | None = None) -> Trainer:
        args = TrainingArguments(
            output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", report_to=[], save_strategy="steps", save_steps=step, logging_strategy="no",
            use_cpu=True, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        )
        return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback or MeDyateCallback()])

    whole = make()
    # 6 steps an epoch: checkpoint-8 is mid-epoch 2, after a resample; checkpoint-2 inside the 3 ranking batches
    trainer(whole, tmp_path / "whole").train()
    expected = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    checkpoint = tmp_path / "whole" / f"checkpoint-{step}"
    assert (checkpoint / TRAINING_STATE_NAME).is_file()

    for out, callback in [(tmp_path / "whole", None), (tmp_path / "moved", MeDyateCallback(resume_from=checkpoint))]:
        resumed = make()
        trainer(resumed, out, callback).train(resume_from_checkpoint=str(checkpoint))
        got = resumed.state_dict()
        assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
        draws = 3 if every is None else 4  # 18 steps: at 3 epoch ends, or after steps 4, 8, 12, 16
        if mode == "budgeted":
            draws = 2  # its ranking takes the first 10 batches (10 stratified slices of the budget): the 2nd and
            # 3rd epoch ends draw
        assert snapshot(resumed) == snapshot(whole) and resumed.base_model.plans["default"].epoch == draws

    (checkpoint / TRAINING_STATE_NAME).unlink()  # a checkpoint without it: said, not silent
    with pytest.warns(UserWarning, match="sampler starts afresh"):
        trainer(make(), tmp_path / "whole").train(resume_from_checkpoint=str(checkpoint))


class OverflowsOnce(Wrapped):
    """An fp16 overflow, as a GradScaler sees it: the first training batch's scaled loss is infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.overflowed = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = super().forward(x, labels)
        if self.training and out["loss"] is not None and not self.overflowed:
            self.overflowed = True
            out["loss"] = out["loss"] * float("inf")
        return out


def test_trainer_fp16_skips_overflowing_ranking_batches(tmp_path):
    """Under fp16 the callback leaves overflows to the scaler, and the ranking leaves the skipped batch out."""
    from transformers import Trainer, TrainingArguments

    x, y = batches(1, size=24)[0]
    dataset = [{"x": x[i], "labels": y[i]} for i in range(24)]
    config = MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy="medyate", ranking_batches=3,
                           ranking_mode="dense", modules_to_save=["net.classifier"])
    model = get_peft_model(OverflowsOnce(), config)
    assert model.peft_config["default"].detect_anomalies
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, fp16=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[MeDyateCallback()])
    # Accelerate makes no scaler on a CPU; this is the one fp16 on a GPU gets.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.train()

    assert trainer.accelerator.scaler.get_scale() == 2.0**15  # it skipped exactly one step
    assert not model.peft_config["default"].detect_anomalies
    ranking = model.peft_config["default"].layer_ranking
    assert ranking["steps"] == 2  # 3 ranking batches, the overflowing one left out
    assert all(0 < v < float("inf") for v in ranking["lara"].values())
    assert model.base_model.plans["default"].epoch == 2
    assert bool(torch.isfinite(model.base_model.medyate_values["default"]).all())


def test_dense_gradient_probe_strict_names_the_layer_lenient_skips_the_batch():
    from medyate_peft.guards import NonFiniteError

    x, y = batches(1, size=8)[0]

    def train(strict: bool, losses: list[float]) -> nn.Module:
        config = MeDyateConfig(budget_kb=BUDGET_KB, input_size=INPUT, strategy="medyate", ranking_batches=len(losses),
                               detect_anomalies=strict, ranking_mode="dense")
        model = get_peft_model(net(), config)
        for scale in [*losses, 1.0]:  # one more forward closes the probe
            (F.cross_entropy(model(x), y) * scale).backward()
        return model

    with pytest.raises(NonFiniteError, match=r"non-finite dense gradient in layer '\w+' during layer-ranking batch 1"):
        train(True, [float("inf"), 1.0])
    model = train(False, [float("inf"), 1.0, 1.0])
    assert model.peft_config["default"].layer_ranking["steps"] == 2
    with pytest.raises(RuntimeError, match="no finite dense gradient"):
        train(False, [float("inf"), float("nan")])


MCU_BUDGETS = [15_936, 64_832, 112_640]


@pytest.fixture(scope="module")
def mcunet(shared_assets):
    from medyate_peft.backbones import load_mcu_model

    return load_mcu_model("mcunet-5fps")


@pytest.mark.parametrize("slots", MCU_BUDGETS)
def test_mcunet_planner_counts_the_papers_costs_and_fills_their_budgets(mcunet, slots):
    config = MeDyateConfig(budget_kb=slots * 4 / 1024, bytes_per_slot=4, input_size=[3, 128, 128],
                           strategy="full_random")
    model = get_peft_model(copy.deepcopy(mcunet), config)
    tuner = model.base_model
    costs = tuner.layer_costs()
    assert len(costs) == 42 and all(c.kind == "conv" for c in costs)
    assert sum(c.layer_slots for c in costs) == 1_309_808  # full fine-tuning, classifier excluded
    plan = tuner.plans["default"]
    assert plan.budget == slots
    used = int(plan.pool.slots[plan.selected].sum())
    assert slots - max(c.channel_slots for c in costs) <= used <= slots
    assert model.memory_report().used_slots == used


def test_mcunet_alpha_rule_on_a_measured_ranking(mcunet):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 128, 128, generator=g), torch.tensor([1, 2]))]
    ranking = rank_layers(mcunet, data, steps=1, lr=0.0, progress=False)
    assert len(ranking["lara"]) == 42
    for slots in MCU_BUDGETS:
        config = MeDyateConfig(budget_kb=slots * 4 / 1024, input_size=[3, 128, 128], layer_ranking=ranking)
        tuner = get_peft_model(copy.deepcopy(mcunet), config).base_model
        plan = tuner.plans["default"]
        pool_slots = [c.layer_slots for c in plan.pool.costs]
        ranked = sorted(plan.pool.costs, key=lambda c: ranking["lara"][c.name])
        assert slots / sum(pool_slots) <= 0.2 < slots / (sum(pool_slots) - ranked[0].layer_slots)  # smallest K
        used = int(plan.pool.slots[plan.selected].sum())
        assert slots - int(plan.pool.slots.max()) <= used <= slots
