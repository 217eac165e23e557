"""The step-scoped budget (`budget_scope="step"`): everything one training step holds that grows with the method.

The papers count only the selected channels' weight gradients and input activations. A real step
also holds what back-propagation through the frozen layers between the loss and the lowest trained
layer keeps (masks, recomputation inputs, the head's input), the head's gradients and the optimizer
state of what is trained. Under this scope the planner charges all of it before drawing channels:

    fixed      = head parameters * (1 + optimizer_slots)                   (per step, counted once)
    reserve(L) = bytes per sample the frozen path keeps when L is the lowest trained layer
    cost(i, c) = C^W * (1 + optimizer_slots) + C^A                          (per selected channel)

The trained weights live in one flat vector whose whole gradient (and optimizer state) a step
allocates, so the vector's size is what is paid for weights, not the selection's slots. Its size is
fixed when the plan is made (an optimizer or DDP wrapper built once must keep working) and charged
before any channel is drawn: a draw then fills `vector` weight slots at most, and
`budget - fixed - vector * (1 + optimizer_slots)` with activations and the frozen path. The planner
picks the size (`planner.size_vector`) among the weight slots of a few simulated draws of the
strategy under the charge above, the one that lets those draws train the most.

`reserve` is measured, not modelled: one forward (train mode, the RNG and buffers restored) in
which the input of the first wrapped layer requires grad, with autograd's saved tensors recorded in
execution order; reserve(L) is what was saved from L's forward on, plus the loss's share (twice the
model output's bytes: cross-entropy keeps its log-softmax and the targets). Ops after L that do not
depend on L are counted too, so the estimate errs on the safe side. Measured per-sample bytes of a step are in
`measure.memory_report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .budget import LayerCost, slots_to_kb
from .sampling import ChannelPool


@dataclass(frozen=True)
class StepCosts:
    """What the step scope charges beside the papers' per-channel slots."""

    reserve: dict[str, int]  # slots per sample on the frozen path when this layer is the lowest trained
    order: tuple[str, ...]  # wrapped layers in forward order (lowest first)
    fixed: int  # head gradients and their optimizer state, slots
    optimizer_slots: int  # optimizer tensors per trained element (0 plain SGD, 1 momentum, 2 Adam)
    vector: int | None = None  # weight slots of the flat vector, fixed at planning and charged before any draw

    def channel_slots(self, cost: LayerCost) -> int:
        return cost.weight_slots * (1 + self.optimizer_slots) + cost.activation_slots

    def layer_reserve(self, name: str) -> int:
        """A layer the measuring forward did not reach is charged as the lowest of all (the safe side)."""
        return self.reserve.get(name, max(self.reserve.values(), default=0))

    def pool_slots(self, pool: ChannelPool) -> torch.Tensor:
        per_layer = torch.tensor([self.channel_slots(c) for c in pool.costs], dtype=torch.long)
        return per_layer[pool.layer]

    def pool_reserve(self, pool: ChannelPool) -> torch.Tensor:
        per_layer = torch.tensor([self.layer_reserve(c.name) for c in pool.costs], dtype=torch.long)
        return per_layer[pool.layer]

    def smallest_budget(self, costs: list[LayerCost]) -> int:
        """Slots of the cheapest workable step: the fixed part and one channel with the frozen path below it."""
        return self.fixed + min(self.channel_slots(c) + self.layer_reserve(c.name) for c in costs)

    def check(self, costs: list[LayerCost], budget: int, budget_kb: float, bytes_per_slot: int) -> None:
        smallest = self.smallest_budget(costs)
        if smallest > budget:
            kb = math.ceil(slots_to_kb(smallest, bytes_per_slot) * 100) / 100
            raise ValueError(
                f"budget_kb={budget_kb} ({budget} slots) cannot hold one training step with budget_scope='step': "
                f"the head's gradients{' and optimizer state' if self.optimizer_slots else ''} take {self.fixed} "
                f"slots and the cheapest channel with the frozen path below it {smallest - self.fixed}; the "
                f"smallest workable budget is budget_kb >= {kb} (or use budget_scope='selection', the papers' "
                "accounting)"
            )

    def vector_charge(self) -> int:
        """Slots the flat vector's gradient and optimizer state take once its size is fixed (0 before)."""
        return (self.vector or 0) * (1 + self.optimizer_slots)

    @staticmethod
    def pool_weights(pool: ChannelPool) -> torch.Tensor:
        return torch.tensor([c.weight_slots for c in pool.costs], dtype=torch.long)[pool.layer]

    @staticmethod
    def pool_activations(pool: ChannelPool) -> torch.Tensor:
        return torch.tensor([c.activation_slots for c in pool.costs], dtype=torch.long)[pool.layer]

    def fill(self, order: torch.Tensor, pool: ChannelPool, budget: int) -> torch.Tensor:
        """Greedy fill in `order` under the step budget: each channel pays its slots, plus the frozen path
        it adds when it lowers the deepest trained layer."""
        reserve, weights = self.pool_reserve(pool).tolist(), self.pool_weights(pool).tolist()
        if self.vector is None:  # weights and their optimizer state are paid per channel
            slots, weight_room = self.pool_slots(pool).tolist(), math.inf
        else:  # paid up front as the vector: a channel pays its activations, its weights take vector slots
            slots, weight_room = self.pool_activations(pool).tolist(), self.vector
        remaining = budget - self.fixed - self.vector_charge()
        held = 0  # reserve of the current lowest selected layer
        smallest, lightest = min(slots, default=budget + 1), min(weights, default=0)
        taken = []
        for pos in order.tolist():
            extra = max(reserve[pos] - held, 0)
            if slots[pos] + extra <= remaining and weights[pos] <= weight_room:
                taken.append(pos)
                remaining -= slots[pos] + extra
                weight_room -= weights[pos]
                held += extra
                if remaining < smallest or weight_room < lightest:
                    break
        return torch.tensor(taken, dtype=torch.long)

    def used(self, pool: ChannelPool, taken: torch.Tensor) -> int:
        """Slots the step scope charges for a selection (what `fill` kept within the budget)."""
        reserve = int(self.pool_reserve(pool)[taken].max()) if len(taken) else 0
        if self.vector is None:
            return self.fixed + int(self.pool_slots(pool)[taken].sum()) + reserve
        return self.fixed + self.vector_charge() + int(self.pool_activations(pool)[taken].sum()) + reserve


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _logits(output: Any) -> torch.Tensor:
    """The model's output scores: a tensor, `.logits` / ["logits"] of a model output, or the first of a tuple."""
    if isinstance(output, Mapping):
        output = output.get("logits", next(iter(output.values()), None))
    output = getattr(output, "logits", output)
    if isinstance(output, (tuple, list)):
        output = output[0] if output else None
    return output if isinstance(output, torch.Tensor) else torch.zeros(0)


def measure_frozen_path(model: nn.Module, layers: Mapping[str, nn.Module], args: tuple, kwargs: dict,
                        owner: nn.Module) -> tuple[dict[str, float], tuple[str, ...]]:
    """Bytes per sample autograd saves from each wrapped layer's forward on, if it is the lowest trained one.

    Nothing changes: the RNG, buffers (BatchNorm statistics) and train/eval modes are restored.
    """
    excluded = {t.untyped_storage().data_ptr() for t in [*owner.parameters(), *owner.buffers()]}
    seen: set[int] = set()
    saved: list[int] = []  # bytes of each newly saved storage, in forward order
    starts: dict[str, int] = {}
    first = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen.add(ptr)
            saved.append(tensor.untyped_storage().nbytes())
        return tensor

    def enter(name: str, module: nn.Module, args: tuple) -> tuple | None:
        starts.setdefault(name, len(saved))
        if first or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        first.append(name)
        return (args[0].detach().requires_grad_(True), *args[1:])

    hooks = [m.register_forward_pre_hook(lambda m, a, n=name: enter(n, m, a)) for name, m in layers.items()]
    buffers = [(b, b.clone()) for b in owner.buffers()]
    devices = [t.device for t in owner.parameters() if t.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = model(*args, **kwargs)
            loss_bytes = 2 * _logits(output).nbytes  # cross-entropy keeps its log-softmax and the targets
            del output
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
    batch = _batch_size(args, kwargs)
    total = sum(saved) + loss_bytes
    order = tuple(sorted(starts, key=starts.get))
    return {name: (total - sum(saved[: starts[name]])) / batch for name in order}, order


def step_costs(frozen_bytes: Mapping[str, float], order: tuple[str, ...], head: list[nn.Parameter],
               optimizer_slots: int, bytes_per_slot: int) -> StepCosts:
    """Slots from measured bytes (rounded up) and the head's trainable parameters."""
    reserve = {name: math.ceil(b / bytes_per_slot) for name, b in frozen_bytes.items()}
    head_bytes = sum(p.numel() * p.element_size() for p in head)
    fixed = math.ceil(head_bytes * (1 + optimizer_slots) / bytes_per_slot)
    return StepCosts(reserve=reserve, order=order, fixed=fixed, optimizer_slots=optimizer_slots)
