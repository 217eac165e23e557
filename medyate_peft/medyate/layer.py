"""Conv2d, Linear and Conv1D layers that carry MeDyate channel deltas.

Per adapter a layer stores the channels it has ever trained (`medyate_index`) and the delta slices
of those channels (`medyate_delta`). Both are buffers, not parameters: autograd never trains them.
The channels trained in the current epoch take their values from a segment of the tuner's flat
trainable vector (a `Selection`); `resample()` folds them into the stored deltas. The base weight is
never touched until `merge`.

`state_dict()` shows each adapter as `save_pretrained` writes it: live values folded in, only the
channels whose delta is non-zero (the tuner reports its flat vector as zeros, as after a resample).
`load_state_dict` accepts that form for any number of channels, so a state dict round-trips through
saving and loading as PEFT expects.

Without grad (inference) a layer computes with its effective weight (base + deltas), the arithmetic
`merge` bakes in, so unmerged, reloaded and merged models give bit-identical outputs. That weight is
kept between calls, since rebuilding it is a weight-sized copy: when only the trained values changed
(an optimizer step), just the live channels' slices are rewritten, from the same operands as a full
rebuild. The price is one weight-sized tensor per layer that holds deltas.

A training forward (grad enabled) of a Linear/Conv1D keeps no such copy while its stored channels are
at most `compact_fraction` of its inputs: it adds a compact term for them, base(x) + x[..., S] @ dW[:, S]^T,
whose extra matmul is that fraction of the layer's. Its outputs equal the inference ones up to rounding.
Conv2d keeps the effective weight (the vision nets' weights are small and the speed counts there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..budget import activation_positions
from ..kernels import (
    ChannelSparseConv2d,
    ChannelSparseLinear,
    ConvSpec,
    Selection,
    add_to_channels,
    channel_coords,
    compact_term,
    gather_channels,
    set_channels,
    set_channels_at,
)


class MeDyateLayer(BaseTunerLayer):
    # No per-layer trainable parameter: the trained values live in the tuner's flat vector.
    adapter_layer_names = ()
    other_param_names = ("medyate_delta", "medyate_index")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.medyate_delta = BufferDict({}, persistent=True)
        self.medyate_index = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self.live: dict[str, tuple[nn.Parameter, Selection]] = {}
        self._premerge: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # base slices a merge overwrote
        self.lean_backward = True
        # (positions of one input channel in the last input, its leading dim): the tuner divides by the
        # model input's batch, since the leading dim need not be the batch (window attention).
        self.activation_positions: tuple[int, int] | None = None
        # (deltas key, live versions, weight, live layout for `_refresh_live_channels`)
        self._weight_cache: tuple[tuple, tuple, torch.Tensor, tuple | None] | None = None
        self.kwargs = kwargs
        self.register_state_dict_post_hook(_state_as_saved)
        self.register_load_state_dict_pre_hook(_install_saved_state)

    # -- layout -------------------------------------------------------------------------------
    fan_in_fan_out = False  # True where the base weight is stored (in, out): transformers' Conv1D

    def _base_weight(self) -> torch.Tensor:
        """The base weight in (C', C/g, ...) layout: a transposed view for a fan_in_fan_out layer."""
        weight = self.get_base_layer().weight
        return weight.t() if self.fan_in_fan_out else weight

    @property
    def groups(self) -> int:
        return getattr(self.get_base_layer(), "groups", 1)

    @property
    def in_channels(self) -> int:
        return self._base_weight().shape[1] * self.groups

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self._base_weight().shape[0]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """Shape (C'/g, kh*kw) of one input channel's weight slice."""
        weight = self._base_weight()
        return weight.shape[0] // self.groups, weight[0, 0].numel()

    def update_layer(self, adapter_name: str, lean_backward: bool = True, init_weights: bool = True) -> None:
        """Create this adapter's delta: empty (the identity), or random channels for `init_weights=False`."""
        weight = self.get_base_layer().weight
        empty = torch.zeros(0, *self.slice_shape, dtype=weight.dtype, device=weight.device)
        self.medyate_delta[adapter_name] = empty
        self.medyate_index[adapter_name] = torch.zeros(0, dtype=torch.long, device=weight.device)
        self.lean_backward = lean_backward
        if not init_weights:
            self._random_delta(adapter_name)
        self.set_adapter(self.active_adapters)

    def _random_delta(self, adapter_name: str) -> None:
        """About half the channels (at least one) with deltas at the base weights' scale (PEFT's test init)."""
        weight = self._base_weight().detach()
        if weight.is_meta:
            return  # low_cpu_mem_usage: the values come from the file
        count = max(1, self.in_channels // 2)
        index = torch.randperm(self.in_channels, device=weight.device)[:count]
        scale = weight.float().std() if weight.numel() > 1 else weight.float().abs().mean()
        delta = torch.randn(count, *self.slice_shape, device=weight.device) * (scale if scale > 0 else 1.0)
        self.set_delta(adapter_name, index, delta)

    def set_delta(self, adapter_name: str, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Replace the stored channels and deltas of an adapter (sorted by channel), keeping the delta dtype."""
        order = torch.argsort(index)
        weight = self.get_base_layer().weight
        dtype = self.medyate_delta[adapter_name].dtype if adapter_name in self.medyate_delta else weight.dtype
        self.medyate_index[adapter_name] = index[order].to(device=weight.device, dtype=torch.long)
        values = delta[order].reshape(len(index), *self.slice_shape)
        self.medyate_delta[adapter_name] = values.to(device=weight.device, dtype=dtype).contiguous()
        self._weight_cache = None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.live.pop(adapter_name, None)
        self._premerge.pop(adapter_name, None)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter's buffers to the base layer's device; their dtype stays the adapter's own."""
        device = device or self.get_base_layer().weight.device
        for store in (self.medyate_delta, self.medyate_index):
            if adapter_name in store:
                store[adapter_name] = store[adapter_name].to(device)

    # -- live selection -----------------------------------------------------------------------
    def set_live(self, adapter_name: str, values: nn.Parameter, selection: Selection | None) -> None:
        """Point the adapter's trainable channels at a segment of the flat vector (None: none).

        The stored channels become those with a non-zero delta and the selected ones (new ones at zero):
        channels selected once but never changed are dropped, so they cost the compact term nothing.
        """
        self._weight_cache = None
        index, delta = self.medyate_index[adapter_name], self.medyate_delta[adapter_name]
        chosen = selection.idx.to(index.device) if selection is not None else index[:0]
        if not delta.is_meta:
            keep = (delta.flatten(1) != 0).any(dim=1) | torch.isin(index, chosen)
            new = chosen[~torch.isin(chosen, index)]
            if len(new) or not bool(keep.all()):
                zeros = delta.new_zeros(len(new), *self.slice_shape)
                self.set_delta(adapter_name, torch.cat([index[keep], new]), torch.cat([delta[keep], zeros]))
        if selection is None:
            self.live.pop(adapter_name, None)
        else:
            self.live[adapter_name] = (values, selection)

    def live_values(self, adapter_name: str) -> torch.Tensor | None:
        if adapter_name not in self.live:
            return None
        values, sel = self.live[adapter_name]
        return values.detach()[sel.offset : sel.offset + sel.numel].view(len(sel.idx), *self.slice_shape)

    def fold_live(self, adapter_name: str) -> None:
        """Add the live trained values into the stored deltas (the flat vector is reset by the tuner)."""
        live = self.live_values(adapter_name)
        if live is None:
            return
        _, sel = self.live[adapter_name]
        pos = torch.searchsorted(self.medyate_index[adapter_name], sel.idx.to(self.medyate_index[adapter_name].device))
        self.medyate_delta[adapter_name][pos] += live.to(self.medyate_delta[adapter_name].dtype)
        self._weight_cache = None

    def folded_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(channels, delta slices) including the live values, without mutating anything."""
        index = self.medyate_index[adapter_name]
        delta = self.medyate_delta[adapter_name].detach().clone()
        live = self.live_values(adapter_name)
        if live is not None:
            pos = torch.searchsorted(index, self.live[adapter_name][1].idx.to(index.device))
            delta[pos] += live.to(delta.dtype)
        return index, delta

    def saved_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What an adapter file holds: the folded delta of the channels whose delta is non-zero (or NaN)."""
        index, delta = self.folded_delta(adapter_name)
        if not len(index) or delta.is_meta:
            return index, delta
        changed = (delta.flatten(1) != 0).any(dim=1)
        return index[changed], delta[changed]

    def install_saved(self, adapter_name: str, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Replace the adapter's stored deltas by saved ones; the live channels keep their (zeroed) slots."""
        self.set_delta(adapter_name, index.long(), delta)
        if adapter_name in self.live:
            self.set_live(adapter_name, *self.live[adapter_name])

    # -- effective weight ---------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's dense weight delta, in the base weight's own layout and dtype."""
        dense = torch.zeros_like(self._base_weight(), memory_format=torch.contiguous_format)
        index, delta = self.folded_delta(adapter_name)
        if len(index):
            add_to_channels(dense, self.groups, index, delta)
        return dense.t() if self.fan_in_fan_out else dense

    def _contributing_adapters(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.medyate_delta]

    def effective_weight(self) -> torch.Tensor:
        """W_base + every active adapter's folded deltas, without autograd history.

        Live values are folded into the stored delta before the single addition to the base weight,
        so a reloaded adapter (which stores the folded delta) gives bit-identical outputs.
        """
        base = self._base_weight().detach()
        adapters = tuple(a for a in self._contributing_adapters() if len(self.medyate_index[a]))
        if not adapters:
            return base
        if torch.compiler.is_compiling():  # in a graph: built functionally, the compiler fuses it
            return self._build_weight(base, adapters)
        # the live vectors' storage too: the layout keeps views of them (a `.data` swap must not leave them stale)
        key = (base.data_ptr(), base._version, base.dtype, adapters,
               tuple((self.medyate_delta[a].data_ptr(), self.medyate_delta[a]._version) for a in adapters),
               tuple(self.live[a][0].data_ptr() for a in adapters if a in self.live))
        versions = tuple(self.live[a][0]._version if a in self.live else -1 for a in adapters)
        cache = self._weight_cache
        if cache is None or cache[0] != key:
            weight, layout = self._build_weight(base, adapters), self._live_layout(adapters)
        elif cache[1] != versions:
            weight, layout = cache[2], cache[3]
            self._refresh_live_channels(weight, base, layout)
        else:
            return cache[2]
        self._weight_cache = (key, versions, weight, layout)
        return weight

    def _build_weight(self, base: torch.Tensor, adapters: tuple[str, ...]) -> torch.Tensor:
        weight = base.clone(memory_format=torch.contiguous_format)
        for adapter in adapters:
            index, delta = self.folded_delta(adapter)
            add_to_channels(weight, self.groups, index, delta)
        return weight

    def _live_layout(self, adapters: tuple[str, ...]) -> tuple | None:
        """Where the live channels sit, worked out once per rebuilt weight (`nonzero`/`unique` wait for the
        device), so that refreshing the weight after each optimizer step never waits: (live channels, per
        adapter: its name, the positions of its stored channels among them, of its live ones among those,
        and with one adapter, the coordinates, base slices and stored deltas of those channels)."""
        live = [self.live[a][1].idx for a in adapters if a in self.live]
        if not live:
            return None
        channels = torch.unique(torch.cat(live)) if len(live) > 1 else live[0]
        parts = []
        for adapter in adapters:
            index = self.medyate_index[adapter]
            pos = torch.nonzero(torch.isin(index, channels.to(index.device))).squeeze(1)
            live_pos = None
            if adapter in self.live:
                live_pos = torch.searchsorted(index[pos], self.live[adapter][1].idx.to(index.device))
            parts.append((adapter, pos, live_pos))
        single = None
        if len(adapters) == 1 and adapters[0] in self.live:  # channels, stored and live ones: the same list
            weight = self._base_weight().detach()
            # the live values as a view of the flat vector: it follows the optimizer's in-place steps
            single = (channel_coords(weight, channels), self._base_slices(weight, channels),
                      self.medyate_delta[adapters[0]].detach()[parts[0][1]], self.live_values(adapters[0]))
        return channels, parts, single

    def _base_slices(self, base: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:  # index the base directly: a transposed (fan_in_fan_out) view is not copied whole
            return base.index_select(1, channels).reshape(base.shape[0], len(channels), -1).transpose(0, 1).contiguous()
        return gather_channels(base, self.groups, channels)

    def _refresh_live_channels(self, weight: torch.Tensor, base: torch.Tensor, layout: tuple) -> None:
        """Rewrite only the live channels of `weight`, by the same additions as `_build_weight`
        (base + (stored delta + live values), rounded once to the weight's dtype)."""
        channels, parts, single = layout
        if single is not None:  # one adapter: a few ops on compact slices kept since the rebuild
            coords, base_slices, stored, live = single
            folded = stored + live.to(stored.dtype)
            wide = torch.promote_types(weight.dtype, folded.dtype)
            summed = base_slices.to(wide) + folded.view(base_slices.shape).to(wide)
            set_channels_at(weight, self.groups, coords, summed)
            return
        set_channels(weight, self.groups, channels, self._base_slices(base, channels))
        for adapter, pos, live_pos in parts:
            delta = self.medyate_delta[adapter].detach()[pos]
            if live_pos is not None:
                delta[live_pos] += self.live_values(adapter).to(delta.dtype)
            add_to_channels(weight, self.groups, self.medyate_index[adapter][pos], delta)

    def _trainable(self) -> list[tuple[nn.Parameter, Selection]]:
        return [self.live[a] for a in self._contributing_adapters() if a in self.live and self.live[a][0].requires_grad]

    # -- merge ----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base weight with the forward's arithmetic, so merged outputs are the same.

        The base slices a merge overwrites are kept (as small as the delta): `unmerge` restores them
        bit-exactly, in any dtype.
        """
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.medyate_delta:
                continue
            index, delta = self.folded_delta(adapter)
            weight = self._base_weight().detach()
            merged = weight.clone(memory_format=torch.contiguous_format)
            if len(index):
                add_to_channels(merged, self.groups, index, delta)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {adapter} seems to be broken")
            self._premerge[adapter] = (index, gather_channels(weight, self.groups, index))
            self._set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            index, original = self._premerge.pop(self.merged_adapters.pop())
            if len(index):
                weight = self._base_weight().detach().clone(memory_format=torch.contiguous_format)
                set_channels(weight, self.groups, index, original)
                self._set_base_weight(weight)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Store a weight given in (C', C/g, ...) layout into the base layer, in its own layout."""
        self.get_base_layer().weight.data = weight.t().contiguous() if self.fan_in_fan_out else weight

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        positions = activation_positions(self.get_base_layer(), x)
        if positions != self.activation_positions:  # nn.Module's __setattr__ costs more than the comparison
            self.activation_positions = positions
        trainable = self._trainable() if torch.is_grad_enabled() else []
        if len(trainable) > 1:
            # Every active adapter counts in the output, as with LoRA; training several at once is refused.
            return _RefuseBackward.apply(self._dense(x, self.effective_weight()), *(values for values, _ in trainable))
        trainable = trainable[0] if trainable else None
        base_weight = self._base_weight()
        if base_weight.requires_grad:
            # The user unfroze the base weight: plain autograd keeps its gradient.
            return self._dense(x, base_weight + (self.effective_weight() - base_weight.detach()))
        if not torch.is_grad_enabled():
            return self._dense(x, self.effective_weight())
        if trainable is None and not (self.lean_backward and x.requires_grad):
            return self._training_output(x)
        return self._sparse(x, trainable[1] if trainable is not None else None)

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _training_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output a training forward computes, by plain autograd (and the lean backward's rerun)."""
        return self._dense(x, self.effective_weight())

    def _sparse(self, x: torch.Tensor, sel: Selection | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "medyate." + super().__repr__()


class _RefuseBackward(torch.autograd.Function):
    """Identity whose backward raises: the forward of several trainable active adapters, which one
    channel-sparse backward cannot train together."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(
            "several active MeDyate adapters are being trained at once; activate one adapter for training with "
            "`model.set_adapter(name)` (several active adapters are for inference)"
        )


def _state_as_saved(layer: MeDyateLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict() hook: every adapter as its file holds it (live values folded, changed channels only)."""
    for adapter in layer.medyate_delta:
        index, delta = layer.saved_delta(adapter)
        state_dict[f"{prefix}medyate_index.{adapter}"] = index
        state_dict[f"{prefix}medyate_delta.{adapter}"] = delta


def _install_saved_state(
    layer: MeDyateLayer, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
    missing_keys: list, unexpected_keys: list, error_msgs: list,
) -> None:
    """load_state_dict hook: install saved deltas of any number of channels, so the buffers' shapes fit."""
    from ..serialization import check_entry

    for adapter in list(layer.medyate_delta):
        keys = f"{prefix}medyate_index.{adapter}", f"{prefix}medyate_delta.{adapter}"
        if not all(key in state_dict for key in keys):
            continue
        index, delta = (state_dict[key] for key in keys)
        try:
            check_entry(prefix.removesuffix("."), layer, index, delta)
        except ValueError as err:
            error_msgs.append(str(err))
            continue
        layer.install_saved(adapter, index, delta)
        state_dict[keys[0]], state_dict[keys[1]] = layer.medyate_index[adapter], layer.medyate_delta[adapter]


def _tf_same_pads(shape: torch.Size, conv: nn.Conv2d) -> list[int]:
    """TensorFlow 'SAME' padding for this input size (extra pixel on the right/bottom), in F.pad order."""
    pads = []
    for dim in (1, 0):  # F.pad order: last dim first
        size, k, s, d = shape[2 + dim], conv.kernel_size[dim], conv.stride[dim], conv.dilation[dim]
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _fixed_pads(shape: torch.Size, pads: list[int]) -> list[int]:
    return pads


class _WrappedLayer(nn.Module, MeDyateLayer):
    """nn.Module plumbing shared by the concrete layers (nn.Module first, as in PEFT's tuners)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, lean_backward: bool = True, init_weights: bool = True,
        **kwargs: Any,
    ):
        super().__init__()
        MeDyateLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, lean_backward, init_weights)

    forward = MeDyateLayer.forward  # nn.Module's placeholder forward would shadow the mixin's
    __repr__ = MeDyateLayer.__repr__


class Conv2d(_WrappedLayer):
    """MeDyate on nn.Conv2d: normal, pointwise, depthwise and grouped; any stride/padding/dilation/mode."""

    def _padding(self) -> tuple[Callable[[torch.Size], list[int]] | None, str, tuple[int, int]]:
        """(explicit pads for an input shape, their mode, conv padding): modes the conv kernels lack are explicit."""
        conv = self.get_base_layer()
        if type(conv).__name__ == "Conv2dSame":  # timm's TF-style dynamic 'same' padding
            return partial(_tf_same_pads, conv=conv), "constant", (0, 0)
        if conv.padding_mode != "zeros":
            pads = list(conv._reversed_padding_repeated_twice)
            return partial(_fixed_pads, pads=pads), conv.padding_mode, (0, 0)
        if conv.padding == "valid":
            return None, "constant", (0, 0)
        if conv.padding == "same":
            pads = []
            for dim in (1, 0):  # F.pad order: last dim first
                total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
                pads += [total // 2, total - total // 2]
            return partial(_fixed_pads, pads=pads), "constant", (0, 0)
        return None, "constant", tuple(conv.padding)

    def _spec(self) -> ConvSpec:
        """The conv's geometry, worked out once per base layer (every forward needs it)."""
        conv = self.get_base_layer()
        cached = self.__dict__.get("_spec_of")
        if cached is None or cached[0] is not conv:
            cached = self._spec_of = (conv, self._build_spec(conv))
        return cached[1]

    def _build_spec(self, conv: nn.Conv2d) -> ConvSpec:
        pads, mode, padding = self._padding()
        return ConvSpec(
            in_channels=conv.in_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=padding,
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            pads=pads,
            pad_mode=mode,
        )

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        spec = self._spec()
        x = x if spec.pads is None else F.pad(x, spec.pads(x.shape), mode=spec.pad_mode)
        return F.conv2d(x, weight, self.get_base_layer().bias, spec.stride, spec.padding, spec.dilation, spec.groups)

    def _sparse(self, x: torch.Tensor, sel: Selection | None) -> torch.Tensor:
        bias = self.get_base_layer().bias
        segment, idx = (sel.segment(), sel.idx) if sel is not None else (None, None)
        return ChannelSparseConv2d.apply(x, self.effective_weight(), bias, segment, self._spec(), idx)


class Linear(_WrappedLayer):
    """MeDyate on nn.Linear; inputs (N, C) or (N, ..., C) with tokens on the middle dims."""

    # Largest share of the inputs with stored deltas for which a training forward adds a compact term
    # instead of keeping the effective weight: beyond it the term's matmul and slices cost more than the copy.
    compact_fraction = 0.25

    def _dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.get_base_layer().bias)

    def _compact_delta(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(channels, their deltas (|channels|, C') with live values folded in) of the active adapters, for
        the compact term; None where the effective weight serves (no channels, or too many)."""
        adapters = [a for a in self._contributing_adapters() if len(self.medyate_index[a])]
        count = sum(len(self.medyate_index[a]) for a in adapters)
        if not count or count > self.compact_fraction * self.in_features:
            return None
        self._weight_cache = None  # the compact term replaces the kept weight
        parts = [self.folded_delta(a) for a in adapters]
        index, delta = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts, strict=True))
        return index, delta.view(count, -1)

    def _training_output(self, x: torch.Tensor) -> torch.Tensor:
        compact = self._compact_delta()
        if compact is None:
            return self._dense(x, self.effective_weight())
        return self._dense(x, self._base_weight().detach()) + compact_term(x, *compact)

    def _sparse(self, x: torch.Tensor, sel: Selection | None) -> torch.Tensor:
        segment, idx = (sel.segment(), sel.idx) if sel is not None else (None, None)
        compact = self._compact_delta()
        weight = self.effective_weight() if compact is None else self._base_weight().detach()
        return ChannelSparseLinear.apply(x, weight, self.get_base_layer().bias, segment, idx, compact)


class Conv1D(Linear):
    """MeDyate on transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""

    fan_in_fan_out = True
