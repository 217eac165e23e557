"""Layer importance (LaRa, RGN) and the pre-selection of the K layers that form the channel pool.

Spec section 3. With n(i, c) = ||dL/dW_i[:, c]||:
LaRa_i = ||dL/dW_i|| / sum_c cost(i, c) and RGN_i = sum_c n(i, c) / cost(i, c), both summed over the
steps of a short preliminary fine-tuning with full (dense) gradients. A ranking depends on the
architecture, not on the dataset (Spearman > 0.8 across datasets), so it is saved as JSON and reused.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write_json
from .budget import LayerCost, activation_slots_of_input, layer_cost, model_batch_size
from .candidates import default_targets, detect_head, is_candidate_type, linear_layout
from .progress import progress as show_progress

RANKING_FORMAT = "medyate-layer-ranking"
RANKING_VERSION = 1

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def select_by_alpha(costs: list[LayerCost], lara: dict[str, float], budget: int, alpha_opt: float) -> list[str]:
    """MeDyate: layers by LaRa descending; the smallest K with B / M_K <= alpha_opt (all if none)."""
    by_name = {c.name: c for c in costs}
    ranked = sorted((n for n in by_name if n in lara), key=lambda n: lara[n], reverse=True)
    chosen, total = [], 0
    for name in ranked:
        chosen.append(name)
        total += by_name[name].layer_slots
        if budget / total <= alpha_opt:
            break
    return chosen


def select_by_rgn(costs: list[LayerCost], rgn: dict[str, float], coverage: float) -> list[str]:
    """TraDy: layers by RGN descending; the smallest top-K holding `coverage` of the cumulative RGN."""
    names = [c.name for c in costs if c.name in rgn]
    ranked = sorted(names, key=lambda n: rgn[n], reverse=True)
    total = sum(rgn[n] for n in ranked)
    chosen, acc = [], 0.0
    for name in ranked:
        chosen.append(name)
        acc += rgn[name]
        if acc >= coverage * total:
            break
    return chosen


# -- gradient statistics ------------------------------------------------------------------------
def channel_norms(grad: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """n(i, c) for every input channel c of a dense weight gradient (Conv2d (C', C/g, kh, kw) or Linear (C', C))."""
    if grad.dim() == 2:
        return grad.detach().norm(dim=0)
    out_channels, in_per_group = grad.shape[0], grad.shape[1]
    grouped = grad.detach().reshape(groups, out_channels // groups, in_per_group, -1)
    return grouped.square().sum(dim=(1, 3)).sqrt().reshape(-1)


class GradientStats:
    """Per-layer sums over steps of the channel norms n(i, c) and of the layer norm ||dL/dW_i||."""

    def __init__(self) -> None:
        self.channel: dict[str, torch.Tensor] = {}
        self.layer: dict[str, float] = {}
        self.steps = 0

    def add(self, name: str, grad: torch.Tensor, groups: int = 1) -> None:
        norms = channel_norms(grad, groups).cpu().to(torch.float64)  # to the host first: MPS has no float64
        self.channel[name] = self.channel[name] + norms if name in self.channel else norms
        self.layer[name] = self.layer.get(name, 0.0) + float(norms.square().sum().sqrt())

    def merge(self, other: GradientStats) -> None:
        """Add another measurement's sums (another batch) into these."""
        for name, norms in other.channel.items():
            self.channel[name] = self.channel[name] + norms if name in self.channel else norms.clone()
        for name, value in other.layer.items():
            self.layer[name] = self.layer.get(name, 0.0) + value
        self.steps += other.steps

    def state_dict(self) -> dict[str, Any]:
        return {"channel": {k: v.clone() for k, v in self.channel.items()}, "layer": dict(self.layer),
                "steps": self.steps}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GradientStats:
        stats = cls()
        stats.channel = {k: v.clone() for k, v in state["channel"].items()}
        stats.layer, stats.steps = dict(state["layer"]), state["steps"]
        return stats

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(n).all()) for n in self.channel.values()) and all(
            math.isfinite(v) for v in self.layer.values()
        )

    def all_reduce(self, costs: list[LayerCost]) -> None:
        """Under torch.distributed, sum over ranks (layers in `costs` order, missing ones as zeros)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        parts = [self.channel.get(c.name, torch.zeros(c.in_channels, dtype=torch.float64)) for c in costs]
        layer = torch.tensor([self.layer.get(c.name, 0.0) for c in costs], dtype=torch.float64)
        flat = torch.cat([*parts, layer, torch.tensor([float(self.steps)], dtype=torch.float64)])
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = flat.to(backend_device)
        dist.all_reduce(reduced)
        reduced = reduced.cpu()
        start = 0
        for cost in costs:
            self.channel[cost.name] = reduced[start : start + cost.in_channels].clone()
            start += cost.in_channels
        for cost, value in zip(costs, reduced[start : start + len(costs)].tolist(), strict=True):
            self.layer[cost.name] = value
        self.steps = int(reduced[-1])

    def pool_vector(self, costs: Iterable[LayerCost]) -> torch.Tensor:
        """n(i, c) of every channel, in ChannelPool order (zeros for layers the gradient did not reach)."""
        return torch.cat(
            [self.channel.get(c.name, torch.zeros(c.in_channels, dtype=torch.float64)) for c in costs]
        )

    def ranking(self, costs: list[LayerCost], source: str) -> dict[str, Any]:
        """The cumulated LaRa and RGN of the layers in `costs` (0 where no gradient came), JSON-ready."""
        if not any(c.name in self.channel for c in costs):
            raise RuntimeError("no gradient reached any candidate layer: is the loss connected to the model?")
        return {
            "format": RANKING_FORMAT,
            "version": RANKING_VERSION,
            "source": source,
            "steps": self.steps,
            "lara": {c.name: self.layer.get(c.name, 0.0) / c.layer_slots for c in costs},
            "rgn": {c.name: float(self.pool_vector([c]).sum()) / c.channel_slots for c in costs},
            "layer_slots": {c.name: c.layer_slots for c in costs},
        }


# -- preliminary fine-tuning ----------------------------------------------------------------------
def _candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers MeDyate would wrap with target_modules=None: supported Conv2d/Linear outside the head."""
    names, _ = default_targets(model, detect_head(model))
    modules = dict(model.named_modules())
    return {name: modules[name] for name in names}


def candidate_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Weight shape of every rankable layer: the architecture a ranking belongs to (head excluded).

    A tuner layer (anything with `get_base_layer`) counts as its base layer, so a model gives the same
    shapes before and after `get_peft_model`.
    """
    heads = detect_head(model)
    plain = set(default_targets(model, heads)[0])
    shapes: dict[str, list[int]] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in (*(heads or ()), *wrapped)):
            continue
        if hasattr(module, "get_base_layer") and is_candidate_type(module.get_base_layer()):
            wrapped.append(name)
            shapes[name] = list(module.get_base_layer().weight.shape)
        elif name in plain:
            shapes[name] = list(module.weight.shape)
    return shapes


def architecture_fingerprint(shapes: Mapping[str, Iterable[int]]) -> str:
    """A short hash of layer names and weight shapes: equal for the same architecture, whatever its head."""
    text = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def output_loss(output: Any) -> torch.Tensor | None:
    """The `loss` of a model output: a transformers ModelOutput, a dict, or any object with `.loss`."""
    return output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A dict batch goes to `model(**batch)` and its `.loss` (transformers); a pair (x, y) to cross-entropy."""
    if isinstance(batch, Mapping):
        loss = output_loss(model(**batch))
        if loss is None:
            raise ValueError("the model returned no .loss for a dict batch (no 'labels'?): pass loss_fn=...")
        return loss
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels)
    raise TypeError(f"cannot compute a loss for a batch of type {type(batch).__name__}: pass loss_fn(model, batch)")


def rank_layers(
    model: nn.Module,
    dataloader: Iterable[Any],
    steps: int = 100,
    loss_fn: LossFn | None = None,
    lr: float = 0.01,
    progress: bool = True,
    budget_kb: float | None = None,
    bytes_per_slot: int = 4,
) -> dict[str, Any]:
    """Rank the layers of `model` by LaRa and RGN over a short fine-tuning of a copy of it.

    `model` is a plain model (before `get_peft_model`) or a PeftModel (its merged copy is ranked);
    it is never modified. Dense (default): every parameter of the copy is trained with SGD(lr, no
    momentum) for `steps` batches (the loader is cycled), as the papers' preliminary run; lr=0
    measures gradients at the pretrained weights only. Memory: a dense backward and a model copy, so
    run it where full fine-tuning fits (a server, a few minutes).

    With `budget_kb`, within that budget instead (`sparse_probe.py`): each batch measures one
    budget-sized slice of channels through the channel-sparse backward, for at least `steps` batches
    rounded up to whole rotations through every channel; only the classifier is trained (SGD, lr).
    `loss_fn(model, batch)` defaults to `default_loss`. Returns a JSON-ready dict for `save_ranking`
    and `MeDyateConfig(layer_ranking=...)`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from peft import PeftModel

    work = copy.deepcopy(model)
    if isinstance(work, PeftModel):
        work = work.merge_and_unload()
    if budget_kb is not None:
        return rank_in_tuner(work, dataloader, steps, loss_fn or default_loss, lr, progress, budget_kb,
                             bytes_per_slot)
    work.train()
    layers = _candidate_layers(work)
    if not layers:
        raise ValueError("the model has no nn.Conv2d/nn.Linear/Conv1D layer outside its classifier to rank")
    params = [p for p in work.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr) if lr > 0 else None
    activation: dict[str, int] = {}
    samples: list[int | None] = [None]  # of the model call; a layer's leading dim need not be it

    def observe_batch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        samples[0] = model_batch_size(args, kwargs, getattr(module, "main_input_name", None))

    def observe(name: str, module: nn.Module, args: tuple) -> None:
        activation[name] = activation_slots_of_input(module, args[0], samples[0])

    hooks = [module.register_forward_pre_hook(partial(observe, name)) for name, module in layers.items()]
    hooks.append(work.register_forward_pre_hook(observe_batch, with_kwargs=True))
    device = next(iter(params)).device
    stats = GradientStats()
    loss_fn = loss_fn or default_loss
    try:
        for batch in show_progress(itertools.islice(itertools.cycle(dataloader), steps), "ranking layers",
                                   total=steps, disable=not progress):
            loss = loss_fn(work, _to_device(batch, device))
            work.zero_grad(set_to_none=True)
            loss.backward()
            for name, module in layers.items():
                if module.weight.grad is not None:
                    stats.add(name, linear_layout(module, module.weight.grad), getattr(module, "groups", 1))
            stats.steps += 1
            if optimizer is not None:
                optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    costs = [layer_cost(name, module, activation[name]) for name, module in layers.items() if name in activation]
    ranking = stats.ranking(costs, source=f"rank_layers({type(model).__name__}, steps={steps}, lr={lr})")
    return with_architecture(ranking, candidate_shapes(work))


def rank_in_tuner(work: nn.Module, dataloader: Iterable[Any], steps: int, loss_fn: LossFn, lr: float,
                  progress: bool, budget_kb: float, bytes_per_slot: int = 4, mode: str = "budgeted") -> dict[str, Any]:
    """The tuner's own ranking path (its first training batches, `mode` as MeDyateConfig.ranking_mode) run to
    completion on `work`, which it wraps (pass a copy)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_model  # the tuner, as registered with PEFT

    config = PEFT_TYPE_TO_CONFIG_MAPPING["MEDYATE"](budget_kb=budget_kb, bytes_per_slot=bytes_per_slot,
                                                    strategy="medyate", ranking_batches=steps,
                                                    use_shipped_ranking=False, ranking_mode=mode)
    peft_model = get_peft_model(work, config)
    peft_model.train()
    tuner = peft_model.base_model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr) if lr > 0 and params else None
    device = next(work.parameters()).device
    for batch in show_progress(itertools.cycle(dataloader), f"ranking layers ({mode})", disable=not progress):
        loss = loss_fn(peft_model, _to_device(batch, device))
        if tuner.is_planned("default"):  # this forward closed the probe: every channel was measured
            break
        peft_model.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    ranking = dict(config.layer_ranking)
    ranking["source"] = f"rank_layers(budget_kb={budget_kb}, steps={steps}, lr={lr}): {ranking['source']}"
    return ranking


def with_architecture(ranking: dict[str, Any], shapes: Mapping[str, list[int]]) -> dict[str, Any]:
    """The ranking with the weight shapes of its layers and their fingerprint, so it is used on that architecture only."""
    ranked = {name: list(shapes[name]) for name in ranking["lara"] if name in shapes}
    return {**ranking, "shapes": ranked, "fingerprint": architecture_fingerprint(ranked)}


# -- files -----------------------------------------------------------------------------------------
def save_ranking(ranking: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a validated ranking as JSON atomically: a kill mid-write leaves the previous file."""
    ranking = load_ranking(ranking)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ranking, path, indent=1, sort_keys=True)
    return path


def _check_scores(ranking: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    scores = ranking.get(key)
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"layer ranking {where} has no {key!r} table of layer scores; make one with rank_layers()")
    out = {}
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"layer ranking {where}: {key}[{name!r}] = {value!r} is not a finite score >= 0")
        out[str(name)] = float(value)
    return out


def load_ranking(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A ranking from a JSON path or a dict, validated: 'lara' and 'rgn' tables over the same layers."""
    where = "(dict)"
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            source = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"layer ranking file not found: {where}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"layer ranking {where} is not valid JSON: {err}") from None
    if not isinstance(source, Mapping):
        raise TypeError(f"layer ranking must be a path or a dict, got {type(source).__name__}")
    if source.get("format", RANKING_FORMAT) != RANKING_FORMAT:
        raise ValueError(f"{where} is not a MeDyate layer ranking (format={source.get('format')!r})")
    if int(source.get("version", RANKING_VERSION)) > RANKING_VERSION:
        raise ValueError(f"layer ranking {where} has version {source['version']}, newer than this medyate-peft reads")
    lara, rgn = _check_scores(source, "lara", where), _check_scores(source, "rgn", where)
    if set(lara) != set(rgn):
        raise ValueError(f"layer ranking {where}: 'lara' and 'rgn' rank different layers")
    shapes = source.get("shapes")
    if shapes is not None and (
        not isinstance(shapes, Mapping)
        or not all(isinstance(v, (list, tuple)) and all(isinstance(d, int) for d in v) for v in shapes.values())
    ):
        raise ValueError(f"layer ranking {where}: 'shapes' must map layer names to weight shapes (lists of ints)")
    return {**source, "format": RANKING_FORMAT, "version": RANKING_VERSION, "lara": lara, "rgn": rgn}


def check_architecture(ranking: Mapping[str, Any], shapes: Mapping[str, Iterable[int]]) -> None:
    """Refuse a ranking made on layers of other shapes (e.g. mobilenetv2_100's for mobilenetv2_050)."""
    known = ranking.get("shapes") or {}
    wrong = [(n, list(s), list(known[n])) for n, s in shapes.items() if n in known and list(s) != list(known[n])]
    if wrong:
        name, here, there = wrong[0]
        raise ValueError(
            f"the layer ranking ({ranking.get('source', 'no source')}) was made for another architecture: "
            f"{len(wrong)} of {len(shapes)} layers have other weight shapes, e.g. {name!r} is {here} here and "
            f"{there} in the ranking. Recompute it for this model with rank_layers(model, ...) or `medyate rank`, "
            "or leave layer_ranking=None to measure one within the budget"
        )
    check_covers(ranking, shapes)


def check_covers(ranking: Mapping[str, Any], names: Iterable[str]) -> None:
    """Every candidate layer must be ranked: otherwise the ranking is of another architecture."""
    missing = [n for n in names if n not in ranking["lara"]]
    if missing:
        raise ValueError(
            f"the layer ranking has no score for {len(missing)} candidate layer(s), e.g. {missing[:3]}: it was "
            "made for another architecture (or other target_modules); recompute it with rank_layers(model, ...)"
        )


def scores_for_costs(ranking: Mapping[str, Any], costs: Iterable[LayerCost]) -> tuple[dict[str, float], dict[str, float]]:
    """(LaRa, RGN) of `costs`' layers, re-normalised from the costs the ranking was measured at to these.

    Both scores divide a gradient norm by a memory cost; a ranking made at another input resolution
    (or sequence length) has other activation costs, and its `layer_slots` give them back exactly.
    """
    lara, rgn = dict(ranking["lara"]), dict(ranking["rgn"])
    measured = ranking.get("layer_slots") or {}
    for cost in costs:
        old = measured.get(cost.name)
        if cost.name in lara and old:
            lara[cost.name] *= old / cost.layer_slots
            rgn[cost.name] *= old / cost.layer_slots  # per-channel cost is layer cost / in_channels for both
    return lara, rgn


SHIPPED = "rankings"  # package data: rankings of the backbones medyate-peft ships loaders for


@functools.cache
def _shipped() -> tuple[dict[str, Any], ...]:
    folder = resources.files(__package__) / SHIPPED
    return tuple(load_ranking(json.loads(f.read_text())) for f in sorted(folder.iterdir(), key=str)
                 if f.name.endswith(".json"))


def shipped_ranking(shapes: Mapping[str, Iterable[int]]) -> dict[str, Any] | None:
    """The ranking that ships with the package for exactly this architecture (layer names and shapes), if any."""
    fingerprint = architecture_fingerprint(shapes)
    for ranking in _shipped():
        if ranking.get("fingerprint") == fingerprint:
            return copy.deepcopy(ranking)
    return None
