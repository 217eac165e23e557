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

WeightFn = Callable[[], torch.Tensor]


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
    in_per_group = weight.shape[1]
    grouped = _grouped(weight, groups)
    grouped[idx // in_per_group, :, idx % in_per_group] = values.view(len(idx), grouped.shape[1], -1).to(weight.dtype)


@dataclass
class Selection:
    """Live selected channels of one layer and where their values sit in the flat trainable vector."""

    idx: torch.Tensor  # sorted input-channel indices, int64
    offset: int  # start of this layer's segment in the flat parameter
    numel: int  # len(idx) * C^W
    record: Callable[[torch.Tensor], None]  # receives per-channel gradient norms of each backward


@dataclass(frozen=True)
class ConvSpec:
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: Callable[[torch.Tensor], torch.Tensor] | None = None  # explicit per-channel padding (reflect, 'same')


def _input_grad_through_pad(pad: Callable, x_shape: torch.Size, grad_padded: torch.Tensor) -> torch.Tensor:
    """Back-propagate through an explicit padding; its gradient does not depend on the input values."""
    with torch.enable_grad():
        probe = grad_padded.new_zeros(x_shape, requires_grad=True)
        (grad_x,) = torch.autograd.grad(pad(probe), probe, grad_padded)
    return grad_x


def _scatter_segment(values: torch.Tensor, sel: Selection, compact: torch.Tensor) -> torch.Tensor:
    """Gradient of the flat parameter: the compact gradient in this layer's segment, zeros elsewhere."""
    sel.record(compact.detach().flatten(1).norm(dim=1))
    grad = torch.zeros_like(values)
    grad[sel.offset : sel.offset + sel.numel] = compact.reshape(-1)
    return grad


class ChannelSparseConv2d(torch.autograd.Function):
    """y = conv2d(x, W_eff) where only the channels of `sel` are trainable through `values`."""

    @staticmethod
    def forward(ctx, x, values, bias, weight_fn: WeightFn, spec: ConvSpec, sel: Selection | None):
        # Padding acts per channel, so the unpadded slice is saved and padded again in backward.
        x_sel = x.index_select(1, sel.idx) if sel is not None and ctx.needs_input_grad[1] else None
        ctx.x_shape = x.shape
        if spec.pad is not None:
            x = spec.pad(x)
        y = F.conv2d(x, weight_fn(), bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        ctx.save_for_backward(x_sel, values)
        ctx.padded_shape, ctx.weight_fn, ctx.spec, ctx.sel = x.shape, weight_fn, spec, sel
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sel, values = ctx.saved_tensors
        spec, sel = ctx.spec, ctx.sel
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight_fn().to(grad_y.dtype)
            grad_x = conv2d_input(ctx.padded_shape, weight, grad_y, spec.stride, spec.padding, spec.dilation, spec.groups)
            if spec.pad is not None:
                grad_x = _input_grad_through_pad(spec.pad, ctx.x_shape, grad_x)
        if x_sel is not None:
            x_sel = (x_sel if spec.pad is None else spec.pad(x_sel)).to(grad_y.dtype)
            grad_values = _scatter_segment(values, sel, _conv_channel_grad(x_sel, grad_y, spec, sel.idx))
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(dim=(0, 2, 3))
        return grad_x, grad_values, grad_bias, None, None, None


def _conv_channel_grad(
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


class ChannelSparseLinear(torch.autograd.Function):
    """y = x W_eff^T + b where only the input features of `sel` are trainable through `values`."""

    @staticmethod
    def forward(ctx, x, values, bias, weight_fn: WeightFn, sel: Selection | None):
        y = F.linear(x, weight_fn(), bias)
        x_sel = x.index_select(-1, sel.idx) if sel is not None and ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_sel, values)
        ctx.weight_fn, ctx.sel = weight_fn, sel
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sel, values = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ ctx.weight_fn().to(grad_y.dtype)
        if x_sel is not None:
            flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
            compact = x_sel.reshape(-1, x_sel.shape[-1]).to(grad_y.dtype).t() @ flat_grad  # (|S|, C')
            grad_values = _scatter_segment(values, ctx.sel, compact)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_values, grad_bias, None, None
