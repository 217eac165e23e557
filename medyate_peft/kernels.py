"""Autograd functions of the input-channel-sparse backward (spec section 1).

For a selected set S of input channels the forward saves only x[:, S]; the backward computes the
compact weight gradient dW[:, S] from x[:, S] and grad_y, and the input gradient from the weights,
which are parameters and need no saved activation. With S empty the same functions are the lean
path of a frozen layer: nothing is saved at all.

Under autocast (mixed precision) the forward's conv/linear runs in the autocast dtype; backward runs
outside autocast, so it computes in grad_y's dtype, as autocast's own backward of those ops would.

Weight layout of one channel slice: a conv weight (C', C/g, kh, kw) is viewed as
(g, C'/g, C/g, kh*kw); input channel c lives in group c // (C/g) at column c % (C/g), so its slice
has shape (C'/g, kh*kw). A Linear weight (C', C) is the case g = 1, kh*kw = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    return weight.view(groups, out_channels // groups, in_per_group, -1)


def gather_channels(weight: torch.Tensor, groups: int, idx: torch.Tensor) -> torch.Tensor:
    """Compact slices (len(idx), C'/g, kh*kw) of the given input channels."""
    in_per_group = weight.shape[1]
    return _grouped(weight.contiguous(), groups)[idx // in_per_group, :, idx % in_per_group]


def add_to_channels(weight: torch.Tensor, groups: int, idx: torch.Tensor, values: torch.Tensor) -> None:
    """In place: weight[:, c] += values[j] for c = idx[j] (idx unique; weight contiguous).

    Summed in the wider dtype, then rounded once to the weight's (fp32 deltas on a bf16 base).
    """
    in_per_group = weight.shape[1]
    grouped = _grouped(weight, groups)
    rows, cols = idx // in_per_group, idx % in_per_group
    wide = torch.promote_types(weight.dtype, values.dtype)
    summed = grouped[rows, :, cols].to(wide) + values.view(len(idx), grouped.shape[1], -1).to(wide)
    grouped[rows, :, cols] = summed.to(weight.dtype)


def set_channels(weight: torch.Tensor, groups: int, idx: torch.Tensor, values: torch.Tensor) -> None:
    """In place: weight[:, c] = values[j] for c = idx[j] (idx unique; weight contiguous)."""
    set_channels_at(weight, groups, channel_coords(weight, idx), values)


def channel_coords(weight: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, column) of each input channel in the grouped weight view, for `set_channels_at`."""
    in_per_group = weight.shape[1]
    return idx // in_per_group, idx % in_per_group


def set_channels_at(weight: torch.Tensor, groups: int, coords: tuple[torch.Tensor, torch.Tensor],
                    values: torch.Tensor) -> None:
    """`set_channels` at precomputed `channel_coords`."""
    rows, cols = coords
    grouped = _grouped(weight, groups)
    values = values.view(len(rows), grouped.shape[1], -1).to(weight.dtype)
    # index_copy_ where the channels lie along one dim: one kernel, cheaper than advanced-index assignment
    if groups == 1:  # columns of (C', C, kh*kw)
        grouped[0].index_copy_(1, cols, values.transpose(0, 1))
    elif grouped.shape[2] == 1:  # one channel per group (depthwise): whole groups
        grouped.view(groups, -1).index_copy_(0, rows, values.view(len(rows), -1))
    else:
        grouped[rows, :, cols] = values


class SegmentedVector:
    """The flat trainable vector split into per-layer segments, once for every layer.

    Each layer takes its segment from one shared `torch.split` of the vector's used prefix, so backward
    joins the compact gradients once and writes them into one zero vector, instead of every layer
    scattering into a vector of its own. The
    split is kept until the vector changes in place (an optimizer step: autograd refuses views of
    a modified base) or grad mode changes the answer, so micro-batches of one step share it. Under
    `torch.compile` every call splits afresh (a graph input must not carry another graph's history).
    """

    def __init__(self, values: torch.Tensor, sizes: list[int]) -> None:
        self.values, self.sizes = values, sizes
        self._parts: tuple[torch.Tensor, ...] | None = None
        self._key: tuple[int, bool] | None = None

    def part(self, slot: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._split()[slot]
        key = (self.values._version, self.values.requires_grad and torch.is_grad_enabled())
        if self._parts is None or key != self._key:
            self._parts, self._key = self._split(), key
        return self._parts[slot]

    def _split(self) -> tuple[torch.Tensor, ...]:
        return torch.split(self.values.narrow(0, 0, sum(self.sizes)), self.sizes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None, "_key": None}  # non-leaf views cannot be copied; they are redone


@dataclass
class Selection:
    """Live selected channels of one layer and where their values sit in the flat trainable vector."""

    idx: torch.Tensor  # sorted input-channel indices, int64
    offset: int  # start of this layer's segment in the flat parameter
    numel: int  # len(idx) * C^W
    vector: SegmentedVector
    slot: int  # this layer's position among the vector's segments

    def segment(self) -> torch.Tensor:
        return self.vector.part(self.slot)


@dataclass(frozen=True)
class ConvSpec:
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    # Explicit per-channel padding (reflect/replicate/circular, 'same', TF 'SAME'): F.pad's list for an input shape.
    pads: Callable[[torch.Size], list[int]] | None = None
    pad_mode: str = "constant"


def _pad_backward(grad: torch.Tensor, x_shape: torch.Size, pads: list[int], mode: str) -> torch.Tensor:
    """Gradient through F.pad(x, pads, mode) of a 4-d input, in closed form (no nested autograd call)."""
    if mode == "constant":
        left, _, top, _ = pads
        return grad.narrow(-1, left, x_shape[-1]).narrow(-2, top, x_shape[-2])
    probe = grad.new_zeros(()).expand(x_shape)  # the backward ops read only its shape
    if mode == "reflect":
        return torch.ops.aten.reflection_pad2d_backward(grad, probe, pads)
    if mode == "replicate":
        return torch.ops.aten.replication_pad2d_backward(grad, probe, pads)
    for dim, (before, after) in ((-1, pads[0:2]), (-2, pads[2:4])):  # circular: fold the wrapped edges back
        size = x_shape[dim]
        inner = grad.narrow(dim, before, size).clone()
        if before:
            inner.narrow(dim, size - before, before).add_(grad.narrow(dim, 0, before))
        if after:
            inner.narrow(dim, 0, after).add_(grad.narrow(dim, before + size, after))
        grad = inner
    return grad


class ChannelSparseConv2d(torch.autograd.Function):
    """y = conv2d(x, weight); `segment` holds the trainable values of the input channels `idx`.

    `weight` is the effective weight (base + deltas, no autograd history); it is kept for the input
    gradient by reference, not copied: if it changes before backward (an optimizer step between
    forward and backward), backward uses the new values, as re-reading the parameters would. The segment's values are already in it: the segment is an
    input only so that autograd routes its compact gradient to the flat vector.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, segment, spec: ConvSpec, idx: torch.Tensor | None):
        # Padding acts per channel, so the unpadded slice is saved and padded again in backward.
        x_sel = x.index_select(1, idx) if ctx.needs_input_grad[3] else None
        ctx.x_shape = x.shape
        ctx.pads = spec.pads(x.shape) if spec.pads is not None else None
        if ctx.pads is not None:
            x = F.pad(x, ctx.pads, mode=spec.pad_mode)
        y = F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        ctx.save_for_backward(x_sel)
        # Persistent tensors (the parameter or the layer's kept effective weight, the selection's
        # channels) are held by reference: they cost no memory, unlike the saved activation slice.
        ctx.weight, ctx.idx = weight if ctx.needs_input_grad[0] else None, idx
        ctx.padded_shape, ctx.spec = x.shape, spec
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (x_sel,) = ctx.saved_tensors
        weight, idx, spec = ctx.weight, ctx.idx, ctx.spec
        grad_x = grad_segment = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = weight.to(grad_y.dtype)
            grad_x = conv2d_input(ctx.padded_shape, weight, grad_y, spec.stride, spec.padding, spec.dilation, spec.groups)
            if ctx.pads is not None:
                grad_x = _pad_backward(grad_x, ctx.x_shape, ctx.pads, spec.pad_mode)
        if x_sel is not None:
            x_sel = (x_sel if ctx.pads is None else F.pad(x_sel, ctx.pads, mode=spec.pad_mode)).to(grad_y.dtype)
            grad_segment = conv_channel_grad(x_sel, grad_y, spec, idx).reshape(-1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(dim=(0, 2, 3))
        return grad_x, None, grad_bias, grad_segment, None, None


def conv_channel_grad(
    x_sel: torch.Tensor, grad_y: torch.Tensor, spec: ConvSpec, idx: torch.Tensor
) -> torch.Tensor:
    """dW[:, S] in compact layout (|S|, C'/g, kh, kw), from x[:, S] and grad_y only."""
    n_sel = x_sel.shape[1]
    if spec.groups == 1:
        shape = (grad_y.shape[1], n_sel, *spec.kernel_size)
        kernel = conv2d_weight(x_sel, shape, grad_y, spec.stride, spec.padding, spec.dilation)
        return kernel.transpose(0, 1)
    # Grouped/depthwise: each selected channel becomes its own group against its group's outputs.
    batch, out_channels, h_out, w_out = grad_y.shape
    out_per_group = out_channels // spec.groups
    groups_of_sel = idx // (spec.in_channels // spec.groups)
    grad_sel = grad_y.view(batch, spec.groups, out_per_group, h_out, w_out)[:, groups_of_sel]
    grad_sel = grad_sel.reshape(batch, n_sel * out_per_group, h_out, w_out)
    shape = (n_sel * out_per_group, 1, *spec.kernel_size)
    kernel = conv2d_weight(
        x_sel, shape, grad_sel, spec.stride, spec.padding, spec.dilation, groups=n_sel
    )
    return kernel.view(n_sel, out_per_group, *spec.kernel_size)


def compact_term(x: torch.Tensor, channels: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x[..., channels] @ delta: what the weight deltas `delta` (|channels|, C') of those input features add."""
    return x.index_select(-1, channels) @ delta.to(x.dtype)


class ChannelSparseLinear(torch.autograd.Function):
    """y = x weight^T + b (+ the compact term of `compact` = (channels, deltas)); `segment` holds the trainable
    values of the input features `idx`, whose deltas are in `weight` or in `compact`."""

    @staticmethod
    def forward(ctx, x, weight, bias, segment, idx: torch.Tensor | None,
                compact: tuple[torch.Tensor, torch.Tensor] | None = None):
        y = F.linear(x, weight, bias)
        if compact is not None:
            y = y + compact_term(x, *compact)
        x_sel = x.index_select(-1, idx) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_sel)
        # By reference, as in ChannelSparseConv2d (the compact deltas: a fresh tensor of |channels| x C').
        ctx.weight, ctx.compact = (weight, compact) if ctx.needs_input_grad[0] else (None, None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (x_sel,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_segment = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight.to(grad_y.dtype)
            if ctx.compact is not None:
                channels, delta = ctx.compact
                grad_x.index_add_(-1, channels, grad_y @ delta.to(grad_y.dtype).t())
        if x_sel is not None:
            flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
            compact = x_sel.reshape(-1, x_sel.shape[-1]).to(grad_y.dtype).t() @ flat_grad  # (|S|, C')
            grad_segment = compact.reshape(-1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, grad_segment, None, None
