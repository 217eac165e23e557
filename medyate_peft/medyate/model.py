"""MeDyateModel: the PEFT tuner that plans, samples and trains input channels under a budget."""

from __future__ import annotations

import logging
import re
import warnings
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from .. import guards, optim_state, planner
from ..budget import (
    LayerCost,
    budget_slots,
    layer_cost,
    model_batch_size,
    per_sample,
    weight_slots_per_channel,
)
from ..candidates import (
    default_targets,
    detect_head,
    in_modules_to_save,
    is_candidate_type,
    is_fan_in_fan_out,
    output_head_name,
    unsupported_reason,
)
from ..ddp import check_ranks_agree, fingerprint
from ..epochs import EpochWatch
from ..kernels import SegmentedVector, Selection
from ..lean import apply_lean_backward, remove_lean_backward
from ..oracles import DenseGradientProbe, FullGradient, measure_full_gradient
from ..planner import AdapterPlan, SegmentLayout
from ..ranking import GradientStats, candidate_shapes, shipped_ranking, with_architecture
from ..rollback import restored_on_error
from ..sparse_probe import SparseGradientProbe
from ..step_budget import measure_frozen_path, step_costs
from ..strategies import get_strategy
from .config import MeDyateConfig
from .layer import Conv1D, Conv2d, Linear, MeDyateLayer

logger = logging.getLogger(__name__)


def _values_as_saved(tuner: MeDyateModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict() hook: the flat vectors read as zeros, since the layers' entries hold their values folded."""
    for name, values in tuner.medyate_values.items():
        state_dict[f"{prefix}medyate_values.{name}"] = torch.zeros_like(values)


def _values_as_loaded(tuner: MeDyateModel, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict hook: a state dict's flat vectors are zeros (`_values_as_saved`) of the size they had
    where saved, which under budget_scope="step" is fixed at planning; they load as zeros of this one's size."""
    for name, values in tuner.medyate_values.items():
        key = f"{prefix}medyate_values.{name}"
        incoming = state_dict.get(key)
        if isinstance(incoming, torch.Tensor) and incoming.shape != values.shape and not bool(incoming.any()):
            state_dict[key] = torch.zeros_like(values)


def _unmatched_targets(targets: list[str] | str | None, names: list[str]) -> list[str]:
    """Entries of target_modules that match no module name, by PEFT's rules (name suffix, or full regex)."""
    if targets is None:
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_adapter_name(name: object) -> None:
    """An adapter name is a module key (no '.', as torch requires) and the subfolder `save_pretrained`
    writes extra adapters to, so it may hold no path separator and cannot leave the save folder."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\\0"):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use a non-empty name without '.', '/' or '\\' (PEFT keeps it as "
            "a module key and saves extra adapters in a subfolder of that name)"
        )


def _strict_budget(config: MeDyateConfig) -> bool:
    """Whether the budget must hold as a hard bound (`budget_scope="step"`, where the config has that field)."""
    return getattr(config, "budget_scope", None) == "step"


class MeDyateModel(BaseTuner):
    """Wraps candidate Conv2d/Linear layers; trains a budgeted, re-sampled set of their input channels.

    The trainable parameter is one flat vector per adapter (`medyate_values`), sized by the budget
    (budget_scope="step": by the plan, before any optimizer step, `planner.size_vector`), not by the layers: every epoch a layer's selected channels are mapped to a segment at its start,
    so optimizers built once keep working while the selection changes, and the parameter keeps its
    shape as PEFT's conventions (and sharded wrappers) expect. Each forward splits it once, so a
    backward makes one budget-sized gradient, not one per selected layer. DistributedDataParallel is
    told to leave the vector out (`_ddp_params_and_buffers_to_ignore`): the tuner all-reduces the
    selected slots of its gradient itself, so what crosses the wire is what is trained.
    """

    prefix: str = "medyate_"
    tuner_layer_cls = MeDyateLayer
    target_module_mapping: dict[str, list[str]] = {}
    # The flat trainable vector and the sampler live here, not on the layers: a model from
    # `inject_adapter_in_model` (layers only) could not train, so PEFT refuses direct injection.
    uses_shared_state = True

    # -- injection ------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: MeDyateConfig, model_config: dict) -> MeDyateConfig:
        return peft_config

    def _prepare_model(self, peft_config: MeDyateConfig, model: nn.Module) -> None:
        """Resolve the head (modules_to_save) and, with no target_modules, every supported layer."""
        names = [name for name, _ in model.named_modules()]
        # None matching (PEFT's task types add their usual names, e.g. "classifier" and "score", to the user's)
        wanted = list(peft_config.modules_to_save or ())
        missing = wanted if not any(n.endswith(s) for s in wanted for n in names) else []
        if missing:
            top = [name for name, _ in model.named_children()]
            raise ValueError(
                f"modules_to_save {missing} match no module of the model (its top-level modules: {top[:12]}); "
                "name the classifier to train in full, or leave modules_to_save=None to detect it (loading an adapter? "
                "it was made for a different base model)"
            )
        unmatched = _unmatched_targets(peft_config.target_modules, names)
        if unmatched:
            layers = [n for n, m in model.named_modules() if is_candidate_type(m)]
            raise ValueError(
                f"target_modules {unmatched} match no module of the model (its Conv2d/Linear/Conv1D layers: {layers[:8]}"
                f"{' ...' if len(layers) > 8 else ''}); leave target_modules=None to take every supported layer"
            )
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = detect_head(model)
            if peft_config.modules_to_save is None and output_head_name(model) is None:
                logger.warning("MeDyate: no classifier head found; pass modules_to_save=[...] to train one in full")
        if peft_config.target_modules is not None:
            return
        wrapped = [n for n, m in model.named_modules() if isinstance(m, MeDyateLayer)]
        names, skipped = default_targets(model, peft_config.modules_to_save)
        for name, reason in skipped.items():
            logger.info("MeDyate: skipping %s: %s", name, reason)
        if not names and not wrapped:
            why = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:4]) or "it has no Conv2d/Linear layer"
            raise ValueError(
                f"MeDyate found no layer to train in {type(model).__name__} outside modules_to_save ({why}); "
                "name the layers in target_modules"
            )
        # An existing MeDyate layer takes the new adapter too; the base_layer inside it is not a target.
        peft_config.target_modules = wrapped + [n for n in names if not any(n.startswith(w + ".") for w in wrapped)]

    def _create_and_replace(
        self,
        peft_config: MeDyateConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, MeDyateLayer):
            target.update_layer(adapter_name, peft_config.lean_backward, peft_config.init_weights)
            return
        if not is_candidate_type(target):
            raise TypeError(
                f"target module {current_key!r} is a {type(target).__name__}; MeDyate trains input channels of "
                "nn.Conv2d, nn.Linear and transformers' Conv1D layers only. Remove it from target_modules (or leave "
                "target_modules=None to take every supported layer)."
            )
        reason = unsupported_reason(current_key, target, self.model)
        if reason:
            raise TypeError(f"target module {current_key!r} cannot be wrapped: {reason}. Remove it from target_modules.")
        if in_modules_to_save(current_key, peft_config.modules_to_save):
            raise ValueError(
                f"target module {current_key!r} is also matched by modules_to_save={peft_config.modules_to_save} "
                "(PEFT matches those by name suffix, and trains them in full): remove it from target_modules"
            )
        layer_cls = Conv2d if isinstance(target, nn.Conv2d) else Conv1D if is_fan_in_fan_out(target) else Linear
        new_module = layer_cls(
            target, adapter_name, lean_backward=peft_config.lean_backward, init_weights=peft_config.init_weights
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Swap the module in, as LoRA's tuner does (MeDyate layers are made on their base layer's device).

        BaseTuner's default also copies `child.weight` onto a new module without a base layer, which is
        what unloading hands back for a modules_to_save head: a head without a weight of its own
        (RoBERTa's and Electra's classification heads) made `merge_and_unload` and `unload` fail.
        """
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Wrap the layers, then observe shapes and plan; on any error the model is put back as it was."""
        check_adapter_name(adapter_name)
        with restored_on_error(self):
            self._inject_and_plan(model, adapter_name, **kwargs)

    def _inject_and_plan(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config: MeDyateConfig = self.peft_config[adapter_name]
        if not hasattr(self, "medyate_values"):
            self.medyate_values = nn.ParameterDict({})
            self.plans: dict[str, AdapterPlan] = {}
            self._growth_layers: dict[str, list[MeDyateLayer]] = {}  # per adapter: its pool's layers, in pool order
            self._observing = False
            self._reduce_values = False  # set once a DistributedDataParallel wrapper leaves the vector to us
            self._under_ddp = False  # whether the last forward ran inside that wrapper
            self._agreed: dict[str, SegmentLayout | None] = {}  # per adapter: the selection ranks agreed on
            # PeftModel calls the inner model directly, so lazy planning hooks into that model.
            self._plan_hook = model.register_forward_pre_hook(self._plan_before_forward, with_kwargs=True)
            optim_state.track_steps()
            self._growth_hook = model.register_forward_hook(self._watch_input_sizes)
            self._input_batch: int | None = None  # samples of the last completed model call
            self._pending_batch: int | None = None
            self.register_state_dict_post_hook(_values_as_saved)
            self.register_load_state_dict_pre_hook(_values_as_loaded)
            self._epoch_watch, self._epoch_warned = EpochWatch(), False
            self._measuring = False  # a measured step (measure.measure_step) is not a training batch
        # PEFT keeps the trainability of existing adapters when one is added, for parameters of the model;
        # the flat vectors live on the tuner, so they are kept here.
        trainable = {name: values.requires_grad for name, values in self.medyate_values.items()}
        super().inject_adapter(model, adapter_name, **kwargs)
        for name, flag in trainable.items():
            self.medyate_values[name].requires_grad = flag
        self._take_shipped_ranking(config)
        if config.lean_backward:
            apply_lean_backward(self.model, recompute=config.lean_recompute)
        budget = budget_slots(config.budget_kb, config.bytes_per_slot)
        layers = self.medyate_layers(adapter_name)
        capacity = min(budget, sum(m.in_channels * weight_slots_per_channel(m.get_base_layer()) for m in layers.values()))
        weight = next(iter(layers.values())).get_base_layer().weight
        # In the base dtype, as PEFT's layers; `_cast_adapter_dtype` upcasts fp16/bf16 unless told not to.
        values = nn.Parameter(torch.zeros(capacity, device=weight.device, dtype=weight.dtype))
        values.requires_grad = adapter_name in self.active_adapters and not config.inference_mode
        self.medyate_values[adapter_name] = values
        self._hook_values(adapter_name)
        generator = torch.Generator().manual_seed(config.seed)
        self.plans[adapter_name] = AdapterPlan(budget=budget, generator=generator)
        self.train(self.training)
        # On the meta device (low_cpu_mem_usage) nothing can run; shapes are then learned at the first batch.
        if config.input_size is not None and values.requires_grad and not values.is_meta:
            try:
                self._observe_shapes(*self.dummy_inputs(config))
            except Exception as err:
                raise ValueError(
                    f"input_size={config.input_size} does not fit the model: a forward pass of a zero batch of "
                    f"shape {[1, *config.input_size]} failed ({type(err).__name__}: {err}). Pass the shape of one "
                    "sample without the batch dim, or input_size=None to learn shapes from the first training batch"
                ) from err
            self.plan(adapter_name)

    def _take_shipped_ranking(self, config: MeDyateConfig) -> None:
        """A ranking strategy without a ranking takes the one shipped for this architecture, if there is one."""
        if config.layer_ranking is not None or get_strategy(config.strategy).layers == "all":
            return
        if config.inference_mode or not config.use_shipped_ranking:
            return
        ranking = shipped_ranking(candidate_shapes(self.model))
        if ranking is not None:
            logger.info("MeDyate: using the layer ranking shipped for this architecture (%s)", ranking.get("source"))
            config.layer_ranking = ranking

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, values in getattr(self, "medyate_values", {}).items():
            values.requires_grad = name in names and not inference_mode

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's `set_requires_grad`, reaching the adapters' flat trainable vectors too."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, values in self.medyate_values.items():
            if name in names:
                values.requires_grad = requires_grad

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """As PEFT's layers do: disabled adapters train nothing; enabling makes the active ones trainable."""
        super()._enable_adapter_layers(enabled)
        for name, values in self.medyate_values.items():
            values.requires_grad = enabled and name in self.active_adapters

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's rule for the layers' deltas and the flat vector: fp16/bf16 become fp32 unless disabled."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        values = self.medyate_values[adapter_name] if adapter_name in self.medyate_values else None
        if autocast_adapter_dtype and values is not None and values.dtype in (torch.float16, torch.bfloat16):
            values.data = values.data.float()  # in place: layers' live selections hold this parameter

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.medyate_values[adapter_name]
        del self.plans[adapter_name]
        self._growth_layers.pop(adapter_name, None)

    def train(self, mode: bool = True) -> MeDyateModel:
        """Train mode, except BatchNorm layers outside modules_to_save keep frozen running statistics."""
        super().train(mode)
        freeze = any(getattr(c, "freeze_bn_stats", False) for c in self.peft_config.values())
        if mode and freeze:
            for name, module in self.model.named_modules():
                if isinstance(module, _BatchNorm) and ".modules_to_save." not in f".{name}.":
                    module.eval()
        return self

    # -- layers and costs -----------------------------------------------------------------------
    def medyate_layers(self, adapter_name: str | None = None) -> dict[str, MeDyateLayer]:
        """The wrapped layers (of one adapter: those it targets, as adapters may target different layers)."""
        return {
            name: m for name, m in self.model.named_modules()
            if isinstance(m, MeDyateLayer) and (adapter_name is None or adapter_name in m.medyate_delta)
        }

    def layer_costs(self, adapter_name: str | None = None) -> list[LayerCost]:
        """Spec costs of every wrapped layer (of the adapter) whose input shape has been observed."""
        costs = []
        for name, module in self.medyate_layers(adapter_name).items():
            slots = self._live_activation_slots(module)
            if slots is None:
                logger.info("MeDyate: %s was not reached by the forward pass; it is not a candidate", name)
                continue
            costs.append(layer_cost(name, module.get_base_layer(), slots))
        return costs

    def _live_activation_slots(self, layer: MeDyateLayer) -> int | None:
        """Per-sample activation slots of the layer's last input, per sample of the model's batch."""
        if layer.activation_positions is None:
            return None
        positions, leading = layer.activation_positions
        return per_sample(positions, self._input_batch or leading)

    def dummy_inputs(self, config: MeDyateConfig, batch_size: int = 1) -> tuple[tuple, dict]:
        """(args, kwargs) of a zero batch of `input_size`, as the model's forward expects it.

        On the model's device and in its floating dtype (a bf16 model takes bf16 pixels).
        """
        weight = next(iter(self.medyate_layers().values())).get_base_layer().weight
        main_input = getattr(self.model, "main_input_name", None)
        shape = (batch_size, *config.input_size)
        if main_input == "input_ids":
            return (), {"input_ids": torch.zeros(shape, dtype=torch.long, device=weight.device)}
        zeros = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        if main_input is not None:
            return (), {main_input: zeros}
        return (zeros,), {}

    def _observe_shapes(self, args: tuple, kwargs: dict) -> None:
        modes = {m: m.training for m in self.model.modules()}
        try:
            self._observing = True
            self.model.eval()
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            self._observing = False
            for module, mode in modes.items():
                module.training = mode
        self._measure_step_costs(args, kwargs)

    def _measure_step_costs(self, args: tuple, kwargs: dict) -> None:
        """For adapters with budget_scope="step": measure what the frozen path keeps, per lowest trained layer."""
        strict = [a for a, c in self.peft_config.items() if getattr(c, "budget_scope", "") == "step" and a in self.plans]
        if not strict:
            return
        modes = {m: m.training for m in self.model.modules()}
        try:
            self._observing = True
            self.train()
            frozen, order = measure_frozen_path(self.model, self.medyate_layers(), args, kwargs, owner=self)
        finally:
            self._observing = False
            for module, mode in modes.items():
                module.training = mode
        head = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("medyate_values")]
        for adapter in strict:
            config = self.peft_config[adapter]
            self.plans[adapter].step = step_costs(frozen, order, head, config.optimizer_slots, config.bytes_per_slot)

    # -- planning and sampling ------------------------------------------------------------------
    def is_planned(self, adapter_name: str) -> bool:
        return self.plans[adapter_name].pool is not None

    def needs_dense_gradient(self, adapter_name: str) -> bool:
        """Whether planning needs a full gradient: a layer-ranking strategy without ranking, or an oracle."""
        config: MeDyateConfig = self.peft_config[adapter_name]
        strategy = get_strategy(config.strategy)
        return strategy.needs_full_gradient or (strategy.layers != "all" and config.layer_ranking is None)

    def plan(self, adapter_name: str | None = None, full_gradient: FullGradient | None = None) -> None:
        """Build the channel pool (pre-selected layers) and draw the first selection.

        If `needs_dense_gradient`, the dense gradient comes from `full_gradient` (a closure returning
        the loss of one batch, e.g. `lambda: F.cross_entropy(model(x), y)`, called
        `full_gradient_batches` times, each call the next batch) or, without it, from the
        next `ranking_batches` training batches: planning then waits for them (logged).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        stats = None
        if self.needs_dense_gradient(adapter_name):
            if full_gradient is None:
                logger.info("MeDyate: planning of %r waits for dense gradients of its first training batches",
                            adapter_name)
                return
            stats = self._full_gradient(full_gradient, self.peft_config[adapter_name].full_gradient_batches)
        self._build_plan(adapter_name, stats)

    def _build_plan(self, adapter_name: str, stats: GradientStats | None, source: str | None = None) -> None:
        config: MeDyateConfig = self.peft_config[adapter_name]
        plan = self.plans[adapter_name]
        costs = self.layer_costs(adapter_name)
        if not costs:
            raise RuntimeError(
                "MeDyate could not learn any layer's activation shape: pass input_size=[...] (one sample's shape) "
                "in MeDyateConfig, or run a training forward pass first"
            )
        planner.check_costs(plan, config, costs)
        ranking = None if stats is None else planner.ranking_from_stats(config, stats, costs, source)
        if ranking is not None:
            config.layer_ranking = with_architecture(ranking, candidate_shapes(self.model))
            logger.warning(
                "MeDyate: computed a layer ranking (%s); it is kept in peft_config[%r].layer_ranking (save it "
                "with medyate_peft.save_ranking to reuse it)", ranking["source"], adapter_name,
            )
        layers = self.medyate_layers()
        shapes = {c.name: list(layers[c.name].get_base_layer().weight.shape) for c in costs}
        planner.build(plan, config, costs, shapes, stats)
        self._watch_pool(adapter_name)
        self._fit_vector(adapter_name)
        self._apply_selection(adapter_name)

    def _fit_vector(self, adapter_name: str, fold: bool = True) -> None:
        """Give the flat vector the size the plan fixed (budget_scope="step": the first draw's weight slots).

        Planning runs before any optimizer step on the vector (its ranking batches leave it unused), so
        an optimizer built before keeps working; its state for another size, if a re-plan finds one, is
        dropped. Live values of a previous plan are folded into the deltas first.
        """
        values = self.medyate_values[adapter_name]
        size = planner.vector_slots(self.plans[adapter_name], values.numel())
        if size == values.numel():
            return
        if fold and bool(values.detach().any()):
            for layer in self.medyate_layers().values():
                layer.fold_live(adapter_name)
        if optim_state.forget(values):
            logger.warning("MeDyate: adapter %r was re-planned; its optimizer state for the trainable vector "
                           "belonged to the previous channels and was reset", adapter_name)
        values.data = values.data.new_zeros(size)  # in place: optimizers and layers hold this parameter

    def _draw(self, adapter_name: str) -> None:
        planner.draw(self.plans[adapter_name], self.peft_config[adapter_name])
        self._apply_selection(adapter_name)

    def _full_gradient(self, closure: FullGradient, batches: int = 1) -> GradientStats:
        """Dense gradients of every wrapped layer, summed over `batches` closure calls (no lazy planning inside)."""
        observing, self._observing = self._observing, True
        try:
            return measure_full_gradient(self.medyate_layers(), closure, batches)
        finally:
            self._observing = observing

    def _apply_selection(self, adapter_name: str) -> None:
        """Map the selected channels to consecutive segments at the start of the flat vector."""
        values = self.medyate_values[adapter_name]
        layout = planner.segment_layout(self.plans[adapter_name], values.numel(), values.device)
        vector = SegmentedVector(values, layout.sizes)
        live = {name: slot for slot, name in enumerate(layout.names)}
        offset = 0
        for name, layer in self.medyate_layers().items():
            if name not in live:
                layer.set_live(adapter_name, values, None)
                continue
            slot = live[name]
            sel = Selection(idx=layout.channels[slot].to(values.device), offset=offset, numel=layout.sizes[slot],
                            vector=vector, slot=slot)
            layer.set_live(adapter_name, values, sel)
            offset += layout.sizes[slot]

    def _hook_values(self, adapter_name: str) -> None:
        """Register `_on_values_grad` on the adapter's vector (again on a copy: deepcopy drops tensor hooks)."""
        values = self.medyate_values[adapter_name]
        if values.requires_grad and getattr(values, "_medyate_owner", None) is not self:
            values.register_hook(partial(self._on_values_grad, adapter_name))
            values._medyate_owner = self

    def _on_values_grad(self, adapter_name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """One backward's gradient of the flat vector: record channel norms on its device, then all-reduce.

        With `detect_anomalies` NaN/inf are flagged on the device and read on the host lazily
        (`guards.ChannelGradientWatch`). Under DDP the local gradient is averaged over ranks as DDP would
        (also inside `no_sync()`, where the result is the same and only the traffic differs).
        """
        plan = self.plans[adapter_name]
        layout = plan.layout
        used = layout.used if layout is not None else 0
        planner.record_gradient(plan, grad, strict=self.peft_config[adapter_name].detect_anomalies)
        if self._reduce_values and self._under_ddp and dist.is_initialized() and dist.get_world_size() > 1:
            if self._agreed.get(adapter_name) is not layout:  # ranks with other selections would mismatch sizes
                when = f"the first backward of adapter {adapter_name!r}, epoch {plan.epoch}"
                check_ranks_agree(fingerprint(self.peft_config[adapter_name], plan), when)
                self._agreed[adapter_name] = layout
            trained = grad[:used] / dist.get_world_size()  # the tail past the selection is zero on every rank
            dist.all_reduce(trained)
            return torch.cat([trained, grad[used:]])
        return None  # unchanged: autograd moves it into .grad without a copy

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by DistributedDataParallel at construction (through PeftModel's attribute forwarding).

        DDP would all-reduce the whole flat vector; it leaves the vector out and `_on_values_grad`
        all-reduces only the selected slots from then on. The layers' deltas and channel indices are
        buffers that every rank changes alike at `resample()` (ranks are checked to agree); with DDP's
        default `broadcast_buffers=True` rank 0 would send all of them (every channel ever trained)
        before every forward. Names are given as seen from a PeftModel and from this tuner.
        """
        self._reduce_values = True
        names = [f"medyate_values.{adapter}" for adapter in self.medyate_values]
        names += [name for name, _ in self.named_buffers() if ".medyate_delta." in name or ".medyate_index." in name]
        return names + [f"base_model.{name}" for name in names]

    def check_finite(self, loss: torch.Tensor | float, what: str = "loss") -> None:
        """Raise NonFiniteError if `loss` (or any tensor) holds NaN/inf; call it before `backward()`."""
        guards.check_finite(loss, what)

    def resample(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        adapter_name: str | None = None,
        full_gradient: FullGradient | None = None,
    ) -> None:
        """Epoch boundary: fold trained values into the deltas and draw the next channels.

        Pass the optimizer so that its state for the flat vector (momentum, Adam moments) is reset,
        since its slots now belong to other channels (without it, the state of any optimizer that
        stepped the vector is reset, with a warning: `optim_state`). Static strategies keep their
        selection. The dynamic oracles (det_rgn, lara_det_raw, prob_raw) need `full_gradient`: a closure
        returning the next batch's loss (under DDP, computed with the unwrapped model), called
        `full_gradient_batches` times, each a dense forward+backward.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config: MeDyateConfig = self.peft_config[adapter_name]
        plan = self.plans[adapter_name]
        strategy = get_strategy(config.strategy)
        values = self.medyate_values[adapter_name]
        optim_state.check_optimizer(optimizer, values, adapter_name)
        if not self._epoch_warned:  # a verdict the device held and no batch read yet (accelerators read every 32)
            self._warn_came_round(self._epoch_watch.check(), stacklevel=3)
        self._epoch_watch.reset()
        if plan.pool is None:
            if plan.probe is None:
                raise RuntimeError("resample() before the first training step: nothing has been selected yet")
            if plan.probe.done() or isinstance(plan.probe, DenseGradientProbe):
                self._finish_probe(adapter_name)  # the epoch was shorter than ranking_batches
            else:
                logger.info("MeDyate: the layer ranking goes on into the next epoch (%d of %d batches measured)",
                            plan.probe.measured, plan.probe.batches_needed)
            return
        if strategy.dynamic and strategy.needs_full_gradient and full_gradient is None:
            raise ValueError(
                f"strategy {config.strategy!r} re-draws from a full gradient every epoch: call "
                "resample(optimizer, full_gradient=lambda: loss_of_one_batch)"
            )
        if config.detect_anomalies:  # before any state changes: nothing is half-resampled on error
            plan.anomalies.check()
            for name, layer in self.medyate_layers().items():
                live = layer.live_values(adapter_name)
                if live is not None:
                    guards.check_trained_values(name, live, plan.epoch)
        check_ranks_agree(fingerprint(config, plan), f"resample() of adapter {adapter_name!r}, epoch {plan.epoch}")
        planner.sync_norms(plan.tracker)
        optim_state.warn_if_untrained(values, float(plan.tracker.epoch_count.sum()), adapter_name, plan.epoch)
        planner.end_epoch(plan, config)
        overshoots = planner.recost_for_growth(plan, adapter_name)
        if not strategy.dynamic and not overshoots:
            return
        if strategy.dynamic and strategy.needs_full_gradient:
            stats = self._full_gradient(full_gradient, config.full_gradient_batches)
            stats.all_reduce(list(plan.pool.costs))
            plan.full_norms = stats.pool_vector(plan.pool.costs)
        for layer in self.medyate_layers().values():
            layer.fold_live(adapter_name)
        with torch.no_grad():
            values.zero_()
        optim_state.reset(optimizer, values, adapter_name)
        self._draw(adapter_name)

    def selection(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Current selected channels per layer."""
        adapter_name = adapter_name or self.active_adapters[0]
        plan = self.plans[adapter_name]
        return {} if plan.pool is None else plan.pool.to_selection(plan.selected)

    # -- exact training checkpoint --------------------------------------------------------------
    def training_state_dict(self, adapter_name: str | None = None) -> dict[str, Any]:
        """Everything MeDyate needs to resume bit-exactly: pool, norms, RNG, selection, deltas, live values.

        Unlike `save_pretrained` (changed channels only, live values folded), nothing is folded or
        filtered here. Tensors only (plus plain Python values), so it can go into `torch.save`.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        plan = self.plans[adapter_name]
        layers = {
            name: {"index": layer.medyate_index[adapter_name].cpu().clone(),
                   "delta": layer.medyate_delta[adapter_name].detach().cpu().clone()}
            for name, layer in self.medyate_layers().items()
        }
        return {
            "adapter": adapter_name,
            "strategy": self.peft_config[adapter_name].strategy,
            "values": self.medyate_values[adapter_name].detach().cpu().clone(),
            "layers": layers,
            "probe": None if plan.probe is None else plan.probe.state_dict(),
            **planner.state_dict(plan),
        }

    def load_training_state_dict(self, state: dict[str, Any], adapter_name: str | None = None) -> None:
        """Restore a `training_state_dict` (same base model and config) so training continues identically."""
        adapter_name = adapter_name or state["adapter"]
        plan = self.plans[adapter_name]
        layers = self.medyate_layers()
        unknown = sorted(set(state["layers"]) - set(layers))
        if unknown:
            raise ValueError(f"checkpoint has MeDyate layers this model lacks: {unknown[:5]}; different base model?")
        values = self.medyate_values[adapter_name]
        strategy = self.peft_config[adapter_name].strategy
        if state.get("strategy", strategy) != strategy:
            raise ValueError(
                f"checkpoint was trained with strategy {state['strategy']!r}, this adapter uses {strategy!r}; "
                "resume with the MeDyateConfig of the interrupted run"
            )
        from ..serialization import check_entry

        for name, entry in state["layers"].items():  # all checked before anything changes
            check_entry(name, layers[name], entry["index"], entry["delta"])
        unknown = sorted({c["name"] for c in state["pool"] or ()} - set(layers))
        if unknown:
            raise ValueError(f"checkpoint's channel pool has layers this model lacks: {unknown[:5]}")
        fixed = (state.get("step") or {}).get("vector")  # budget_scope="step": the vector's size as planned
        if state["values"].shape != values.shape and state["values"].numel() != fixed:
            raise ValueError(
                f"checkpoint's trainable vector has {state['values'].numel()} slots, this adapter {values.numel()}: "
                "was it made with another budget_kb?"
            )
        pool = planner.checked_pool(state)
        for name, entry in state["layers"].items():
            layers[name].set_delta(adapter_name, entry["index"], entry["delta"])
        planner.load_state_dict(plan, state, pool)
        self._fit_vector(adapter_name, fold=False)  # the checkpoint's values replace the live ones below
        if state.get("probe") is not None:  # saved while the first batches' dense gradients were measured
            if plan.probe is None:
                costs = [LayerCost(**c) for c in state["probe"].get("costs", ())]
                plan.probe = self._open_probe(adapter_name, costs or None)
            plan.probe.load_state_dict(state["probe"])
        elif plan.probe is not None:  # this run had started measuring; the checkpoint is past that
            plan.probe.close()
            plan.probe = None
        if pool is not None:
            self._watch_pool(adapter_name)
            self._apply_selection(adapter_name)
        with torch.no_grad():
            values.copy_(state["values"])

    # -- lazy planning ------------------------------------------------------------------------
    def _plan_before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the first training forward of an unplanned, trainable adapter: learn shapes, then plan."""
        self._pending_batch = model_batch_size(args, kwargs, getattr(module, "main_input_name", None))
        # Only a forward through the DDP wrapper is all-reduced in backward: a rank-local step on the
        # unwrapped model (a measurement on rank 0) must not wait for the others.
        self._under_ddp = DistributedDataParallel._get_active_ddp_module() is not None
        if self._observing or not (module.training and torch.is_grad_enabled()):
            return
        for adapter_name in self.active_adapters:
            values = self.medyate_values[adapter_name] if adapter_name in self.medyate_values else None
            if values is None or not values.requires_grad:
                continue
            self._hook_values(adapter_name)
            if self.is_planned(adapter_name):
                continue
            if self.needs_dense_gradient(adapter_name):
                self._probe_training_batch(adapter_name, args, kwargs)
            else:
                logger.info("MeDyate: learning activation shapes from the first training batch")
                self._observe_shapes(args, kwargs)
                self.plan(adapter_name)
        self._watch_epoch(args, kwargs)

    def _watch_epoch(self, args: tuple, kwargs: dict) -> None:
        """Warn once when the training data came round again without `resample()` (rule: `epochs`)."""
        dynamic = [  # re-drawn at epoch ends; a step cadence (resample_every) may span epochs on purpose
            a for a in self.active_adapters
            if a in self.medyate_values and self.medyate_values[a].requires_grad
            and get_strategy(self.peft_config[a].strategy).dynamic and self.peft_config[a].resample_every is None
        ]
        # the watch reads its verdict on the host, hence not while compiling
        if self._epoch_warned or self._measuring or not dynamic or torch.compiler.is_compiling():
            return
        main = kwargs.get(getattr(self.model, "main_input_name", None) or "")
        if main is None:
            main = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        self._warn_came_round(self._epoch_watch.observe(main) if isinstance(main, torch.Tensor) else None)

    def _warn_came_round(self, before: int | None, stacklevel: int = 3) -> None:
        """Warn once that the data came round after `before` batches without resample() (None: it did not)."""
        if before is None:
            return
        self._epoch_warned = True
        warnings.warn(
            f"MeDyate: the training data came round again after {before} batches without "
            "resample() (most samples of this batch were already seen): call model.base_model.resample(optimizer) "
            "at the end of every epoch (MeDyateCallback does it under the Trainer), or the same channels keep "
            "training",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _watch_input_sizes(self, module: nn.Module, args: tuple, output: Any) -> None:
        """After a training forward: record the live activation sizes; warn once (or refuse) on overshoot."""
        self._input_batch = self._pending_batch
        if self._observing or not (module.training and torch.is_grad_enabled()):
            return
        for adapter_name in self.active_adapters:
            plan = self.plans.get(adapter_name)
            if plan is None or plan.growth is None or not self.medyate_values[adapter_name].requires_grad:
                continue
            layers = self._growth_layers[adapter_name]
            before = plan.growth.observe([self._live_activation_slots(layer) for layer in layers])
            if before is not None and not plan.growth.warned:
                self._check_overshoot(adapter_name, before)

    def _watch_pool(self, adapter_name: str) -> None:
        """Watch the live activation sizes of the pool's layers (in pool order) against its costs."""
        layers = self.medyate_layers()
        self._growth_layers[adapter_name] = [layers[c.name] for c in self.plans[adapter_name].pool.costs]

    def _check_overshoot(self, adapter_name: str, peaks_before: list[int]) -> None:
        """Warn once if the selection overshoots the budget at the new sizes; a strict budget refuses the batch."""
        config: MeDyateConfig = self.peft_config[adapter_name]
        plan = self.plans[adapter_name]
        over = planner.overshoot(plan)
        if over is None:
            return
        live, planned = over
        grown = plan.growth.largest_growth()
        kb = partial(planner.kb_up, bytes_per_slot=config.bytes_per_slot)
        message = (
            f"MeDyate: training inputs are larger than those adapter {adapter_name!r} was planned on (e.g. "
            f"{plan.pool.costs[grown].name} stores {plan.growth.peak[grown]} activation slots per sample "
            f"and channel, planned {plan.growth.planned[grown]}): the selection is charged {kb(live)} kB "
            f"per sample against budget_kb={config.budget_kb} (planned {kb(planned)} kB, "
            f"{live / plan.budget - 1:+.0%} over)"
        )
        if _strict_budget(config):
            plan.growth.peak = peaks_before  # the batch is refused: the next one of this size is refused too
            raise ValueError(
                f"{message}. The strict budget refuses this batch: plan on the largest inputs (input_size=[...], "
                "or a first training batch of the largest size), or pad/crop inputs to the planned size"
            )
        plan.growth.warned = True
        logger.warning("%s; the next resample() re-plans for the larger inputs", message)

    def _probe_training_batch(self, adapter_name: str, args: tuple, kwargs: dict) -> None:
        """Rank layers (or seed an oracle) from the first training batches, then plan (at the next one)."""
        config: MeDyateConfig = self.peft_config[adapter_name]
        plan = self.plans[adapter_name]
        if plan.probe is None:
            costs = None
            if self._ranks_within_budget(config):
                self._observe_shapes(args, kwargs)
                costs = self.layer_costs(adapter_name)
            plan.probe = self._open_probe(adapter_name, costs)
            if costs is None:
                logger.warning(
                    "MeDyate: strategy %r needs %s; measuring dense gradients of the first %d training batch(es) "
                    "(memory of full fine-tuning meanwhile, channels train after them)",
                    config.strategy,
                    "a full gradient" if get_strategy(config.strategy).needs_full_gradient else
                    "a layer ranking and none was given (pass layer_ranking=... from rank_layers to skip this)",
                    config.ranking_batches,
                )
            else:
                logger.warning(
                    "MeDyate: no layer ranking was given; ranking the layers within the budget over the first %d "
                    "training batches (%d slices of channels; only the head trains meanwhile)",
                    plan.probe.batches_needed, len(plan.probe),
                )
        if plan.probe.done():
            self._finish_probe(adapter_name)
        else:
            plan.probe.count_batch()

    @staticmethod
    def _ranks_within_budget(config: MeDyateConfig) -> bool:
        return config.ranking_mode == "budgeted" and not get_strategy(config.strategy).needs_full_gradient

    def _open_probe(
        self, adapter_name: str, costs: list[LayerCost] | None = None
    ) -> DenseGradientProbe | SparseGradientProbe:
        """With costs, the probe within the budget; else dense-gradient hooks on every wrapped layer.

        NaN/inf raises only if the adapter detects anomalies.
        """
        config: MeDyateConfig = self.peft_config[adapter_name]
        if costs is None:
            return DenseGradientProbe(self.medyate_layers(adapter_name), strict=config.detect_anomalies,
                                      batches_needed=config.ranking_batches)
        layers = self.medyate_layers(adapter_name)
        step = self.plans[adapter_name].step
        reserve = None if step is None else (lambda name: step.fixed + step.layer_reserve(name))
        return SparseGradientProbe({c.name: layers[c.name] for c in costs}, costs, self.plans[adapter_name].budget,
                                   adapter_name, min_batches=config.ranking_batches, strict=config.detect_anomalies,
                                   reserve=reserve)

    def _finish_probe(self, adapter_name: str) -> None:
        plan = self.plans[adapter_name]
        source = plan.probe.describe()
        stats = plan.probe.close()
        plan.probe = None
        self._build_plan(adapter_name, stats, source)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_lean_backward(model)
        self._plan_hook.remove()
        self._growth_hook.remove()
        return model

    # -- save / load ----------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(
        cls, model: nn.Module, config: MeDyateConfig, adapter_name: str, state_dict: dict, unwanted_adapter_names: list
    ) -> dict[str, torch.Tensor]:
        """Per layer: the channels whose delta is non-zero and those delta slices only.

        Read from the state dict, whose MeDyate entries are already in saved form (see `layer`), so
        wrappers that rename modules (FSDP) save the same keys.
        """
        from ..serialization import adapter_entries, check_modules_to_save

        check_modules_to_save(model, config.modules_to_save, adapter_name)
        out = {}
        for name, (index, delta) in adapter_entries(state_dict, adapter_name).items():
            if not bool(torch.isfinite(delta).all()):
                raise guards.NonFiniteError(
                    f"layer {name!r} of adapter {adapter_name!r} holds NaN/inf deltas; not saving an adapter that "
                    "cannot be loaded (the previous save, if any, is kept). Resume from the last good checkpoint."
                )
            if len(index):
                out[f"{name}.medyate_index.{adapter_name}"] = index.cpu().contiguous()
                out[f"{name}.medyate_delta.{adapter_name}"] = delta.cpu().contiguous()
        out.update(cls._get_learnable_bias_state_dict(model, state_dict, config))  # `bias` other than "none"
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MeDyateConfig, adapter_name: str, state_dict: dict
    ) -> dict[str, torch.Tensor]:
        """Validate every delta against this base model and complete the file's entries; nothing changes here.

        `load_state_dict` then installs them (the layers' load hook), also on the meta device.
        """
        from ..serialization import complete_for_load

        return complete_for_load(model, adapter_name, state_dict)

    # -- reporting ------------------------------------------------------------------------------
    def trainable_parameter_counts(self) -> tuple[int, int]:
        """(trained values, base model parameters), what `print_trainable_parameters` shows.

        Trained: of each trainable flat vector the weight slots the current selection uses (all of it
        before planning), and every other trainable parameter (the head). The total counts the base
        model as loaded: neither the flat vectors nor the modules_to_save copies.
        """
        trainable = total = 0
        for name, param in self.named_parameters():
            if name.startswith("medyate_values."):
                adapter = name.removeprefix("medyate_values.")
                if param.requires_grad:
                    trainable += self._used_slots(adapter) if self.is_planned(adapter) else param.numel()
                continue
            trainable += param.numel() if param.requires_grad else 0
            total += 0 if ".modules_to_save." in f".{name}" else param.numel()
        return trainable, total

    def _used_slots(self, adapter_name: str) -> int:
        return sum(layer.live[adapter_name][1].numel for layer in self.medyate_layers().values()
                   if adapter_name in layer.live)

    def memory_report(
        self,
        *args: Any,
        adapter_name: str | None = None,
        compare_lean: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ):
        """Analytical budget use per layer, and (given a sample batch, or with input_size) the measured bytes.

        `compare_lean` measures the step with the lean backward off and on (the "off" step holds as much
        as plain autograd; pass False to skip it). `optimizer` adds the bytes of its state (momentum,
        Adam moments), which the papers avoid with plain SGD.
        """
        from ..measure import memory_report

        adapter_name = adapter_name or self.active_adapters[0]
        return memory_report(self, adapter_name, args, kwargs, compare_lean=compare_lean, optimizer=optimizer)

