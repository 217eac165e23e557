"""Two CPU processes (gloo) train one MeDyate model under DDP on different data; rank 0 saves what each saw.

Run by tests/test_ddp.py as `python tests/ddp_worker.py OUT_DIR`. Per strategy and epoch it records
the selection, the trainable values, the norm vector, the ranking and the rank-local (pre-sync)
norm sums, so the test can check that ranks agree although their local measurements differ; and
the pool after one rank trained on longer sequences than planned (`grow`).
"""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

WORLD = 2
EPOCHS = 4
STEPS = 3
STRATEGIES = ("medyate", "prob_raw")
STEP_SCOPE = "full_random, budget_scope=step"  # planned at the first batch, under a DDP wrapper built before


def data(rank: int, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    from test_ranking import INPUT

    g = torch.Generator().manual_seed(1000 * rank + 10 * epoch + step)
    return torch.randn(6, *INPUT, generator=g), torch.randint(0, 4, (6,), generator=g)


def train(rank: int, strategy: str, scope: str = "selection") -> list[dict]:
    from peft import get_peft_model
    from test_ranking import INPUT, net

    import medyate_peft  # noqa: F401
    from medyate_peft import MeDyateConfig

    if scope == "step":
        config = MeDyateConfig(budget_kb=2.0, strategy=strategy, seed=3, budget_scope="step", optimizer_slots=1)
    else:
        config = MeDyateConfig(budget_kb=1.0, input_size=INPUT, strategy=strategy, ranking_batches=2, seed=3,
                               ranking_mode="dense")
    model = get_peft_model(net(), config)
    tuner = model.base_model
    # The ranking batches train only the head, so the channel vector is unused in them.
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    payload: list[int] = []  # elements DDP's buckets all-reduce in one step
    reduced: list[int] = []  # elements the tuner itself all-reduces in one step (the flat vector's trained slots)
    all_reduce = dist.all_reduce

    def counting_allreduce(state, bucket):  # unannotated: DDP checks real annotations, these would be strings
        payload.append(bucket.buffer().numel())
        work = all_reduce(bucket.buffer().div_(WORLD), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    def counting_all_reduce(tensor: torch.Tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    broadcast = dist._broadcast_coalesced
    broadcast_medyate: list[int] = []  # bytes of the layers' delta and index buffers DDP broadcasts

    def counting_broadcast(group, tensors, *args, **kwargs):
        mine = {b.data_ptr() for name, b in tuner.named_buffers() if ".medyate_" in name and b.numel()}
        broadcast_medyate.append(sum(t.nbytes for t in tensors if t.numel() and t.data_ptr() in mine))
        return broadcast(group, tensors, *args, **kwargs)

    ddp.register_comm_hook(None, counting_allreduce)
    dist.all_reduce = counting_all_reduce
    dist._broadcast_coalesced = counting_broadcast
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    history = []
    for epoch in range(EPOCHS):
        ddp.train()
        for step in range(STEPS):
            x, y = data(rank, epoch, step)
            optimizer.zero_grad()
            payload.clear()
            reduced.clear()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        reduced_sizes = list(reduced)
        values = tuner.medyate_values["default"]
        layers = tuner.medyate_layers()
        trained = {
            "ddp_payload": sum(payload),
            "other_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad and p is not values),
            "reduced_sizes": reduced_sizes,
            "capacity": values.numel(),
            "selection_slots": sum(len(idx) * math.prod(layers[n].slice_shape) for n, idx in tuner.selection().items()),
            "broadcast_medyate_bytes": sum(broadcast_medyate),
            "delta_bytes": sum(b.nbytes for name, b in tuner.named_buffers() if ".medyate_delta." in name),
        }
        broadcast_medyate.clear()
        plan = tuner.plans["default"]
        local_sums = plan.tracker.epoch_sum.clone() if plan.tracker is not None else None
        x, y = data(rank, epoch, STEPS)
        model.resample(optimizer, full_gradient=lambda x=x, y=y: F.cross_entropy(model(x), y))
        history.append({
            "selection": {k: v.tolist() for k, v in tuner.selection().items()},
            "values": tuner.medyate_values["default"].detach().clone(),
            "norms": plan.tracker.norms.clone(),
            "full_norms": None if plan.full_norms is None else plan.full_norms.clone(),
            "local_sums": local_sums,
            "lara": dict((tuner.peft_config["default"].layer_ranking or {"lara": {}})["lara"]),
            **trained,
        })
    dist.all_reduce = all_reduce
    dist._broadcast_coalesced = broadcast
    return history


def grow(rank: int) -> dict:
    """Rank 1 trains on 4x longer sequences than planned: both ranks re-plan alike at resample()."""
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from medyate_peft import MeDyateConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(config),
                           MeDyateConfig(task_type="SEQ_CLS", budget_kb=4, input_size=[8], strategy="full_random"))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 50, (2, 8 if rank == 0 else 32), generator=torch.Generator().manual_seed(rank))
    ddp.train()
    optimizer.zero_grad()
    ddp(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    model.resample(optimizer)
    tuner = model.base_model
    return {"costs": [(c.name, c.activation_slots) for c in tuner.plans["default"].pool.costs],
            "selection": {k: v.tolist() for k, v in tuner.selection().items()}}


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {strategy: train(rank, strategy) for strategy in STRATEGIES}
    results[STEP_SCOPE] = train(rank, "full_random", scope="step")
    results["growth"] = grow(rank)
    # Each DDP reducer holds the group and lives on in reference cycles; a group freed at interpreter exit
    # instead of here can abort the process (gloo threads outliving Python).
    gc.collect()
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, Path(out_dir) / "ranks.pt")
    dist.destroy_process_group()  # not on error: mp.spawn then ends the other rank


if __name__ == "__main__":
    out = Path(sys.argv[1])
    mp.spawn(worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
