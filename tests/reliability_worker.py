"""Processes for test_reliability: training runs that get killed, and DDP ranks that disagree.

    python tests/reliability_worker.py kill DIR --kill-in {checkpoint,adapter,swap} --kill-epoch E

trains a tiny MeDyate model for `EPOCHS` epochs; after each it saves the adapter (`DIR/adapter`, PEFT's save_pretrained)
and a training checkpoint (`DIR/last.pt`, written atomically). At epoch E it SIGKILLs itself in
the middle of one of these writes: half-way through the checkpoint bytes, half-way through the
adapter's safetensors file, or with the adapter folder complete but not yet swapped in.
The same `train` function resumes from `last.pt`, in the test process.

    python tests/reliability_worker.py ddp-rank RANK STORE OUT

is one of two gloo ranks that resample twice: with identical configs, then with seed = rank; the
outcome of each resample ("ok" or the error) goes to OUT/rank<RANK>.json.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import medyate_peft
from medyate_peft import MeDyateConfig
from medyate_peft.atomic import atomic_write

EPOCHS, STEPS, BATCH = 3, 3, 4
INPUT = [3, 8, 8]
RANKING = {"lara": {"0": 3.0, "2": 2.0, "6": 1.0}, "rgn": {"0": 3.0, "2": 2.0, "6": 1.0}}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4),
    )


def make_model() -> nn.Module:
    """MeDyate's weighted draw, so that resuming also needs the channel norms and the RNG state."""
    config = MeDyateConfig(
        budget_kb=0.6, input_size=INPUT, strategy="medyate", seed=3, layer_ranking=RANKING, alpha_opt=0.01,
        modules_to_save=["8"],
    )
    return get_peft_model(tiny_net(), config)


def epoch_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + epoch)
    return [
        (torch.randn(BATCH, *INPUT, generator=generator), torch.randint(0, 4, (BATCH,), generator=generator))
        for _ in range(STEPS)
    ]


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "medyate_" not in n}


def final_state(model: nn.Module) -> dict[str, Any]:
    """What must be identical between an uninterrupted and a resumed run."""
    return {"trained": _trained(model), "medyate": model.base_model.training_state_dict()}


def _kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_checkpoint(path: Path, state: dict[str, Any], kill: bool) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with atomic_write(path, "wb") as handle:
        if kill:
            handle.write(data[: len(data) // 2])
            handle.flush()
            _kill_self()
        handle.write(data)


def _sabotage_adapter_save(point: str) -> None:
    """Make the next adapter save die half-way through its weights file, or just before the swap."""
    if point == "adapter":
        import peft.peft_model

        def half_write(tensors: dict, filename: str, metadata: Any = None) -> None:
            data = safetensors.torch.save(tensors, metadata)
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
            _kill_self()

        peft.peft_model.safe_save_file = half_write
    else:
        medyate_peft.atomic._exchange = lambda new, path: _kill_self()


def train(out: Path, resume: bool = False, kill_in: str | None = None, kill_epoch: int = 0,
          on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    torch.set_num_threads(1)
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    start = 0
    if resume:
        state = torch.load(out / "last.pt", weights_only=True)
        model.load_state_dict(state["trained"], strict=False)
        model.base_model.load_training_state_dict(state["medyate"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
    for epoch in range(start, EPOCHS):
        model.train()
        for x, y in epoch_batches(epoch):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.base_model.resample(optimizer)
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        dying = epoch + 1 == kill_epoch
        if dying and kill_in in ("adapter", "swap"):
            _sabotage_adapter_save(kill_in)
        model.save_pretrained(out / "adapter")
        state = {"epoch": epoch + 1, "trained": _trained(model), "medyate": model.base_model.training_state_dict(),
                 "optimizer": optimizer.state_dict()}
        _write_checkpoint(out / "last.pt", state, kill=dying and kill_in == "checkpoint")
        print(f"saved epoch {epoch + 1}", flush=True)
    return model


def ddp_rank(rank: int, store: Path, out: Path, world: int = 2) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    outcome = []
    try:
        for seed in (0, rank):  # first identical ranks, then one seed per rank
            config = MeDyateConfig(budget_kb=1.0, input_size=INPUT, strategy="full_random", seed=seed,
                                   modules_to_save=["8"])
            model = get_peft_model(tiny_net(), config)
            try:
                DistributedDataParallel(model)(torch.randn(2, *INPUT)).sum().backward()
                model.base_model.resample()
                outcome.append("ok")
            except RuntimeError as err:
                outcome.append(str(err))
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(outcome))
        gc.collect()  # the DDP wrappers hold the group; freed at interpreter exit instead, gloo can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    kill = commands.add_parser("kill")
    kill.add_argument("out", type=Path)
    kill.add_argument("--kill-in", choices=("checkpoint", "adapter", "swap"), required=True)
    kill.add_argument("--kill-epoch", type=int, required=True)
    ddp = commands.add_parser("ddp-rank")
    ddp.add_argument("rank", type=int)
    ddp.add_argument("store", type=Path)
    ddp.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "kill":
        train(args.out, kill_in=args.kill_in, kill_epoch=args.kill_epoch)
    else:
        ddp_rank(args.rank, args.store, args.out)
