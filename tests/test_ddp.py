"""Under DDP every rank draws the same channels every epoch (2 CPU processes, gloo)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    # Own process group, so a hung rank is killed with its parent on timeout.
    run = subprocess.Popen([sys.executable, str(WORKER), str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        pytest.fail(f"DDP workers hung:\n{output[-4000:]}")
    assert run.returncode == 0, output[-4000:]
    return torch.load(out / "ranks.pt", weights_only=False)


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["medyate", "prob_raw"])
def test_ranks_agree_on_ranking_selection_norms_and_weights(ranks, strategy):
    first, second = ranks[0][strategy], ranks[1][strategy]
    assert len(first) == len(second) == 4
    assert first[0]["lara"] == second[0]["lara"]  # the ranking made from the first batches is shared
    local_differs = False
    for epoch, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a["selection"] == b["selection"], f"epoch {epoch}: ranks selected different channels"
        assert torch.equal(a["norms"], b["norms"])
        assert torch.equal(a["values"], b["values"])
        if a["full_norms"] is not None:
            assert torch.equal(a["full_norms"], b["full_norms"])
        if a["local_sums"] is not None:
            local_differs |= not torch.equal(a["local_sums"], b["local_sums"])
    assert local_differs, "ranks saw the same data: the test could not catch a missing synchronisation"
    assert len({str(h["selection"]) for h in first}) > 1, "the selection never changed"
    if strategy == "medyate":
        assert first[-1]["norms"].max() > 0  # weighted draws from measured norms happened


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["medyate", "prob_raw"])
def test_all_reduce_payload_is_what_is_trained(ranks, strategy):
    """DDP's buckets carry the head only; of the flat vector, the selection's slots are all-reduced, every epoch."""
    for epoch in ranks[0][strategy]:
        assert epoch["ddp_payload"] == epoch["other_trainable"] > 0
        assert 0 < epoch["selection_slots"] < epoch["capacity"]
        assert epoch["selection_slots"] in epoch["reduced_sizes"] and epoch["capacity"] not in epoch["reduced_sizes"]

@pytest.mark.ddp
@pytest.mark.parametrize("run", ["medyate", "prob_raw", "full_random, budget_scope=step"])
def test_the_layers_deltas_are_not_broadcast_before_every_forward(ranks, run):
    """They are buffers: DDP's default broadcast_buffers=True would send every trained channel's delta from rank 0."""
    history = ranks[0][run]
    assert history[-1]["delta_bytes"] > 0  # there were deltas to broadcast
    assert [epoch["broadcast_medyate_bytes"] for epoch in history] == [0] * len(history)


@pytest.mark.ddp
def test_a_step_scoped_vector_fixed_at_the_first_batch_trains_under_a_wrapper_built_before(ranks):
    """The vector shrinks to the first draw's weight slots when the first batch plans; DDP and SGD with momentum
    were built on the budget-sized one and keep working over resamples; ranks agree; what is trained is reduced."""
    first, second = ranks[0]["full_random, budget_scope=step"], ranks[1]["full_random, budget_scope=step"]
    assert len({str(e["selection"]) for e in first}) > 1, "the selection never changed"
    for a, b in zip(first, second, strict=True):
        assert a["selection"] == b["selection"] and torch.equal(a["values"], b["values"])
        assert a["capacity"] == first[0]["capacity"] < 2 * 1024 // 4  # fixed, below the budget's slots
        assert 0 < a["selection_slots"] <= a["capacity"]
        assert a["ddp_payload"] == a["other_trainable"] > 0
        assert a["selection_slots"] in a["reduced_sizes"]


@pytest.mark.ddp
def test_ranks_replan_alike_for_the_longest_inputs_of_any_rank(ranks):
    first, second = ranks[0]["growth"], ranks[1]["growth"]
    assert first == second
    slots = dict(first["costs"])
    assert slots["bert.encoder.layer.0.attention.self.query"] == 32  # rank 1's length, planned at 8


_FINGERPRINT = """
import json, sys
import torch
from medyate_peft import MeDyateConfig
from medyate_peft.ddp import fingerprint
from medyate_peft.planner import AdapterPlan
config = MeDyateConfig(budget_kb=4)
config.target_modules = {f"layer{i}.{kind}" for i in range(8) for kind in ("query", "key", "value")}
config.layer_ranking = {"lara": {f"layer{i}": float(i) for i in range(8)}, "tags": {"a", "b", "c", "d"}}
plan = AdapterPlan(budget=10, generator=torch.Generator().manual_seed(0))
json.dump({"fingerprint": fingerprint(config, plan), "set_order": str(config.target_modules)}, sys.stdout)
"""


def test_fingerprint_is_independent_of_hash_seed_and_set_order():
    """PEFT keeps a long target list as a set; its printed order differs per process, the fingerprint must not."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    proc = subprocess.run([sys.executable, "-c", _FINGERPRINT], env={**os.environ, "PYTHONHASHSEED": seed},
                          capture_output=True, text=True, timeout=120, check=True)
    other = json.loads(proc.stdout)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as here:
        exec(_FINGERPRINT, namespace)
    local = json.loads(here.getvalue())
    assert local["set_order"] != other["set_order"], "both processes iterate the set alike: the test is void"
    assert local["fingerprint"] == other["fingerprint"]
