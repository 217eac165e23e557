"""Measured memory of one training step, beside the papers' analytical budget.

Bytes of every tensor autograd saves for the backward pass are counted with
`torch.autograd.graph.saved_tensors_hooks` and attributed to the module whose forward saved them;
storages of parameters and buffers are excluded (they are not extra memory). Weight-gradient bytes
are the sizes of the `.grad` tensors that the step produced.

With `compare_lean` the step is measured twice, with the lean backward (`lean.py`) off and on, so
the report shows what the option saves on the frozen path (and that the selected bytes do not move).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .budget import model_batch_size, slots_to_kb
from .lean import lean_backward
from .pools import PoolSummary, summarize_pool

if TYPE_CHECKING:
    from .medyate.model import MeDyateModel


@dataclass
class LayerRow:
    name: str
    channels: int
    in_channels: int
    weight_slots: int
    activation_slots: int
    measured_saved_bytes_per_sample: float | None = None

    @property
    def slots(self) -> int:
        return self.weight_slots + self.activation_slots


@dataclass
class MemoryReport:
    """Analytical (papers' accounting) and measured memory of one training step of one adapter."""

    adapter: str
    strategy: str
    budget_slots: int
    bytes_per_slot: int
    layers: list[LayerRow]
    pool: PoolSummary | None = None  # the layers the channels are drawn from (what a dynamic draw can reach)
    batch_size: int | None = None
    measured_selected_saved_bytes: int | None = None  # x[:, S] of the selected layers, whole batch
    measured_frozen_path_saved_bytes: int | None = None  # everything else autograd kept, whole batch
    measured_weight_grad_bytes_used: int | None = None  # slots of the flat vector that selected channels use
    measured_weight_grad_bytes_allocated: int | None = None  # the flat vector's .grad (budget-sized; step: planned)
    measured_head_grad_bytes: int | None = None  # modules_to_save (classifier), trained in full
    optimizer_state_bytes: int | None = None  # momentum / Adam moments of the trainable tensors (SGD: 0)
    saved_bytes_by_module: dict[str, int] = field(default_factory=dict)
    lean_backward: bool | None = None  # the config's option, under which the fields above were measured
    # {"off"/"on": {"selected_saved_bytes": ..., "frozen_path_saved_bytes": ...}}, whole batch
    lean_comparison: dict[str, dict[str, int]] | None = None
    budget_scope: str = "selection"
    step_slots: int | None = None  # budget_scope="step": what the planner charged (fixed + frozen path + channels)

    @property
    def measured_step_bytes_per_sample(self) -> float | None:
        """Everything the step held that grows with the method, per sample, as budget_scope="step" counts it:
        all saved activations / batch + the allocated weight-gradient vector + head gradients + optimizer state."""
        if self.batch_size is None:
            return None
        saved = self.measured_selected_saved_bytes + self.measured_frozen_path_saved_bytes
        return (saved / self.batch_size + self.measured_weight_grad_bytes_allocated + self.measured_head_grad_bytes
                + (self.optimizer_state_bytes or 0))

    @property
    def used_slots(self) -> int:
        return sum(row.slots for row in self.layers)

    @property
    def used_activation_share(self) -> float:
        """Share of the used slots that is stored activation (the rest trains weights)."""
        return sum(row.activation_slots for row in self.layers) / self.used_slots if self.layers else 0.0

    @property
    def used_kb(self) -> float:
        return slots_to_kb(self.used_slots, self.bytes_per_slot)

    @property
    def budget_kb(self) -> float:
        return slots_to_kb(self.budget_slots, self.bytes_per_slot)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(used_slots=self.used_slots, used_kb=self.used_kb, budget_kb=self.budget_kb,
                   measured_step_bytes_per_sample=self.measured_step_bytes_per_sample,
                   used_activation_share=self.used_activation_share)
        return out

    def __str__(self) -> str:
        kb = self.bytes_per_slot / 1024
        lines = [
            f"MeDyate memory report: adapter {self.adapter!r}, strategy {self.strategy!r}",
            f"{'layer':<40} {'channels':>11} {'W slots':>9} {'A slots':>9} {'kB':>8} {'measured A kB/sample':>21}",
        ]
        for row in self.layers:
            measured = row.measured_saved_bytes_per_sample
            measured_txt = "-" if measured is None else f"{measured / 1024:.2f}"
            lines.append(
                f"{row.name[-40:]:<40} {row.channels:>5}/{row.in_channels:<5} {row.weight_slots:>9} "
                f"{row.activation_slots:>9} {row.slots * kb:>8.2f} {measured_txt:>21}"
            )
        lines.append(
            f"analytical: {self.used_slots} of {self.budget_slots} slots = {self.used_kb:.1f} of "
            f"{self.budget_kb:.1f} kB per sample, {self.used_activation_share:.1%} of it stored activation"
        )
        if self.pool is not None:
            lines.append(self.pool.describe())
        if self.batch_size is not None:
            per = 1024 * self.batch_size
            lines += [
                f"measured (one training step, batch {self.batch_size}):",
                f"  saved activations of selected channels: {self.measured_selected_saved_bytes / per:.1f} kB/sample",
                f"  weight gradients of selected channels: {self.measured_weight_grad_bytes_used / 1024:.1f} kB used "
                f"of the {self.measured_weight_grad_bytes_allocated / 1024:.1f} kB gradient vector a step allocates",
                f"  beside the papers' budget: frozen-path activations {self.measured_frozen_path_saved_bytes / per:.1f} "
                f"kB/sample, head gradients {self.measured_head_grad_bytes / 1024:.1f} kB",
            ]
            if self.optimizer_state_bytes is not None:
                lines.append(f"  optimizer state (momentum, moments): {self.optimizer_state_bytes / 1024:.1f} kB")
            step = self.measured_step_bytes_per_sample
            charged = "" if self.step_slots is None else f", planned {self.step_slots * kb:.1f} kB"
            lines += [
                f"  budget scopes (budget_scope={self.budget_scope!r}):",
                f"    selection (papers): {self.used_kb:.1f} of {self.budget_kb:.1f} kB",
                f"    step (everything above, per sample): {step / 1024:.1f} kB measured{charged}, "
                f"{step / (self.budget_slots * self.bytes_per_slot):.2f}x the budget",
            ]
            if self.lean_comparison is not None:
                lines.append("  saved activations kB/sample    selected channels    frozen path")
                for state, label in (("off", "without lean backward"), ("on", "with lean backward")):
                    row = self.lean_comparison[state]
                    lines.append(
                        f"    {label:<27} {row['selected_saved_bytes'] / per:>18.1f} "
                        f"{row['frozen_path_saved_bytes'] / per:>14.1f}"
                    )
        else:
            lines.append("measured: pass a sample batch (or set input_size) to measure a training step")
        return "\n".join(lines)


@contextlib.contextmanager
def record_saved_tensors(
    model: nn.Module, owner: nn.Module | None = None, on_save: Callable[[str, torch.Tensor], None] | None = None
) -> Iterator[dict[str, int]]:
    """Bytes of the distinct storages autograd saves, keyed by the innermost module of `model` that saved them.

    Parameters and buffers of `owner` (default: `model`) are excluded: saving them costs nothing.
    `on_save(module_name, tensor)` is called once per counted storage (for a per-tensor breakdown).
    """
    owner = model if owner is None else owner
    excluded = {t.untyped_storage().data_ptr() for t in [*owner.parameters(), *owner.buffers()]}
    seen: set[int] = set()
    by_module: dict[str, int] = {}
    stack = ["<outside modules>"]
    handles = []

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(leave))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen.add(ptr)
            by_module[stack[-1]] = by_module.get(stack[-1], 0) + storage.nbytes()
            if on_save is not None:
                on_save(stack[-1], tensor)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield by_module
    finally:
        for handle in handles:
            handle.remove()


def _scalar_loss(output: Any) -> torch.Tensor:
    """A scalar to back-propagate: the model's loss if it returned one, else the sum of its logits."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.float().sum()


def _batch_size(args: tuple, kwargs: dict) -> int:
    batch = model_batch_size(args, kwargs)
    if batch is None:
        raise ValueError("memory_report needs a batch of tensors to measure a training step")
    return batch


def measure_training_step(
    loss_fn: Callable[[], torch.Tensor], model: nn.Module, owner: nn.Module | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """One forward+backward of `loss_fn`: (saved bytes by module of `model`, .grad bytes by parameter of `owner`).

    Works for any model (full fine-tuning, LoRA, MeDyate). Gradients, buffers (BatchNorm statistics)
    and the RNG are restored afterwards, so measuring never changes training.
    """
    owner = model if owner is None else owner
    trainable = [(name, p) for name, p in owner.named_parameters() if p.requires_grad]
    old_grads = [p.grad for _, p in trainable]
    buffers = [(b, b.clone()) for b in owner.buffers()]
    rng = torch.get_rng_state()
    try:
        for _, p in trainable:
            p.grad = None
        with record_saved_tensors(model, owner=owner) as by_module:
            loss = loss_fn()
        loss.backward()
        return dict(by_module), {name: p.grad.nbytes for name, p in trainable if p.grad is not None}
    finally:
        for (_, p), grad in zip(trainable, old_grads, strict=True):
            p.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(rng)


def measure_step(tuner: MeDyateModel, adapter: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """One measured training step of the adapter, in train mode; its channel norms are restored too, and the
    epoch watch does not take its batch for a training batch."""
    plan = tuner.plans[adapter]
    tracker_state = plan.tracker.state_dict()
    was_training, measuring = tuner.training, tuner._measuring
    try:
        tuner.train()
        tuner._measuring = True
        by_module, grads = measure_training_step(
            lambda: _scalar_loss(tuner(*args, **kwargs)), tuner.model, owner=tuner
        )
    finally:
        plan.tracker.load_state_dict(tracker_state)
        tuner.train(was_training)
        tuner._measuring = measuring
    return {
        "by_module": by_module,
        "values_grad_bytes": grads.get(f"medyate_values.{adapter}", 0),
        "head_grad_bytes": sum(v for name, v in grads.items() if ".modules_to_save." in name),
    }


def _split_saved(by_module: dict[str, int], selected: set[str]) -> dict[str, int]:
    """Saved bytes of the selected layers and of everything else (the frozen path)."""
    inside = sum(v for k, v in by_module.items() if k in selected)
    return {"selected_saved_bytes": inside, "frozen_path_saved_bytes": sum(by_module.values()) - inside}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    """Bytes of the optimizer's per-parameter tensors (momentum buffers, Adam moments) for `params`."""
    return sum(
        value.nbytes
        for p in params
        for value in optimizer.state.get(p, {}).values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )


def memory_report(
    tuner: MeDyateModel,
    adapter: str,
    args: tuple,
    kwargs: dict,
    compare_lean: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> MemoryReport:
    """The report; with `compare_lean`, one measured step with the lean backward off and one with it on.

    With `optimizer`, the bytes its state holds for the trainable tensors are counted too.
    """
    config = tuner.peft_config[adapter]
    plan = tuner.plans[adapter]
    if plan.pool is None:
        raise RuntimeError(
            "no channels are selected yet: give MeDyateConfig an input_size, or run one training step first"
        )
    if not args and not kwargs and config.input_size is not None:
        args, kwargs = tuner.dummy_inputs(config)
    layers = tuner.medyate_layers()
    costs = {c.name: c for c in plan.pool.costs}
    rows = []
    for name, idx in tuner.selection(adapter).items():
        cost = costs[name]
        rows.append(LayerRow(name, len(idx), cost.in_channels, len(idx) * cost.weight_slots,
                             len(idx) * cost.activation_slots))
    report = MemoryReport(adapter, config.strategy, plan.budget, config.bytes_per_slot, rows,
                          pool=summarize_pool(plan.pool.costs, tuner.layer_costs()),
                          budget_scope=getattr(config, "budget_scope", "selection"))
    if plan.step is not None:
        report.step_slots = plan.step.used(plan.pool, plan.selected)
    if optimizer is not None:
        trainable = [p for p in tuner.parameters() if p.requires_grad]
        report.optimizer_state_bytes = optimizer_state_bytes(optimizer, trainable)
    if not args and not kwargs:
        return report
    selected = {row.name for row in rows}
    report.lean_backward = config.lean_backward
    if compare_lean:
        runs = {}
        for enabled in (False, True):
            with lean_backward(tuner.model, enabled):
                runs[enabled] = measure_step(tuner, adapter, args, kwargs)
        measured = runs[config.lean_backward]
        report.lean_comparison = {
            "on" if enabled else "off": _split_saved(run["by_module"], selected)
            for enabled, run in runs.items()
        }
    else:
        measured = measure_step(tuner, adapter, args, kwargs)
    batch = _batch_size(args, kwargs)
    by_module = measured["by_module"]
    for row in rows:
        row.measured_saved_bytes_per_sample = by_module.get(row.name, 0) / batch
    element = tuner.medyate_values[adapter].element_size()
    report.batch_size = batch
    report.saved_bytes_by_module = by_module
    split = _split_saved(by_module, selected)
    report.measured_selected_saved_bytes = split["selected_saved_bytes"]
    report.measured_frozen_path_saved_bytes = split["frozen_path_saved_bytes"]
    report.measured_weight_grad_bytes_allocated = measured["values_grad_bytes"]
    report.measured_weight_grad_bytes_used = element * sum(
        len(idx) * layers[name].slice_shape[0] * layers[name].slice_shape[1]
        for name, idx in tuner.selection(adapter).items()
    )
    report.measured_head_grad_bytes = measured["head_grad_bytes"]
    return report
