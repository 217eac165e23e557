"""Lean backward through the frozen path: keep only what the input gradient needs, exactly.

Standard autograd keeps, for every op between the loss and the deepest trained layer, the tensors
it would need for *any* gradient: a frozen eval-mode BatchNorm keeps its input, a ReLU its output,
a CPU dropout a float noise tensor, a max-pool its input plus int64 indices. Only the gradient
with respect to the input is wanted here, and for these ops it needs much less:

* eval-mode BatchNorm with frozen affine parameters is the per-channel map y = x*s + t:
  grad_x = grad_y*s, nothing saved (timm's ``BatchNormAct2d`` likewise, then its activation);
* ReLU, ReLU6/Hardtanh, LeakyReLU and the MCU models' ``Clamp`` have a 0/1 (or 1/slope) derivative:
  a bit-packed mask, numel/8 bytes (32x less than the fp32 tensor autograd keeps);
* dropout (CPU, train mode): its keep-mask bit-packed instead of the float noise, same random draws;
* max-pool: the argmax offset inside its window, one byte per output element; average pooling:
  nothing (its backward needs only the input's shape);
* smooth activations (GELU, SiLU, hard-swish, ...) have no compact derivative; when their input was
  produced by a frozen Conv2d/Linear (optionally through an eval BatchNorm) from a *smaller*
  tensor, that smaller tensor is kept and the activation input is recomputed in backward
  (time cost: one extra forward of that conv/linear per step). Otherwise they keep their input, as
  do LayerNorm, softmax/attention and the other ops not listed: nothing smaller gives their gradient.

Everything here is exact: forward outputs are computed by the module's own code and are bitwise
unchanged; gradients equal standard autograd's (up to float summation order in max-pool).
Modules are switched by giving the *instance* a ``forward`` attribute; classes, state dicts and
hooks are untouched, and `remove_lean_backward` restores the originals. Each lean forward falls
back to the module's own forward whenever its preconditions fail (BatchNorm in train mode or with
trainable affine parameters, no gradient needed, ...).

Time cost (measured, results/lean_backward.md): +5% to +28% CPU per forward+backward on the MCU
networks, mostly from the mask passes (the derivative mask in forward, a multiply by it in backward,
where plain autograd runs one fused kernel). Caveat of the recompute: the kept smaller tensor must
not be modified in place later in the forward (autograd then raises, as it does for any saved
tensor); turn `lean_backward` off for such a model.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_RECOMPUTE_ATTR = "_medyate_recompute"  # on a tensor: (fn, weakref to src) with tensor == fn(src), bitwise


# -- bit packing ------------------------------------------------------------------------------------
# Little bit order: bit k of byte j is element 8*j + k. CPU tensors use numpy's single-pass
# packbits/unpackbits (pack + unpack of a 6.3M-element mask: 0.5 ms, against 27 ms for the word
# shifts below); other devices use the word shifts, which give the same bytes.
def _pack_words(flat: torch.Tensor) -> torch.Tensor:
    """Each run of 8 bool bytes read as one int64, its bits folded into the low byte by three shift-ors."""
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:  # whole, aligned int64 words
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    words = words | (words >> 7)
    words = words | (words >> 14)
    words = words | (words >> 28)
    return (words & 0xFF).to(torch.uint8)


def _unpack_words(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The shifts of `_pack_words`, reversed: uint8 0/1, one per element."""
    words = packed.to(torch.int64)
    words = (words | (words << 28)) & 0x0000000F0000000F
    words = (words | (words << 14)) & 0x0003000300030003
    words = (words | (words << 7)) & 0x0101010101010101
    return words.view(torch.uint8)[:numel]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Eight booleans per uint8 (torch has no packbits)."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_words(flat)


def _unpack_bytes(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The mask as uint8 0/1 of the given shape."""
    if packed.device.type == "cpu":
        flat = torch.from_numpy(np.unpackbits(packed.numpy(), count=shape.numel(), bitorder="little"))
    else:
        flat = _unpack_words(packed, shape.numel())
    return flat.view(shape)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits` for a mask of the given shape."""
    return _unpack_bytes(packed, shape).view(torch.bool)


# -- autograd functions -----------------------------------------------------------------------------
def _bn_eval(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """What the module's eval forward computes (same call, bitwise the same result)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class EvalBatchNorm(torch.autograd.Function):
    """Eval-mode BatchNorm with frozen affine parameters: y = x*s + t, grad_x = grad_y*s, nothing saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        ctx.bn = bn
        return _bn_eval(bn, x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        bn = ctx.bn
        shape = (-1,) + (1,) * (grad_y.dim() - 2)
        # ATen's order (invstd in double, then grad*invstd*weight) keeps the CPU result bitwise equal.
        invstd = (1 / torch.sqrt(bn.running_var.double() + bn.eps)).to(grad_y.dtype)
        grad_x = grad_y * invstd.view(shape)
        if bn.weight is not None:
            grad_x = grad_x * bn.weight.to(grad_y.dtype).view(shape)
        return grad_x, None


class MaskedActivation(torch.autograd.Function):
    """Piecewise-linear activation: forward by the module, backward from a bit-packed derivative mask.

    grad_x = grad_y where mask else grad_y*slope (slope 0: ReLU/Hardtanh/Clamp; LeakyReLU's slope).
    """

    @staticmethod
    def forward(ctx, x, act: Callable, mask_fn: Callable, slope: float):
        mask = mask_fn(x)  # before an in-place act overwrites x
        y = act(x)
        if y is x:
            ctx.mark_dirty(x)
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape, ctx.slope = x.shape, slope
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        if ctx.slope:
            mask = unpack_bits(packed, ctx.shape)
            return torch.where(mask, grad_y, grad_y * ctx.slope), None, None, None
        # A uint8 0/1 factor is promoted inside the multiply: no float copy of the mask.
        return grad_y * _unpack_bytes(packed, ctx.shape), None, None, None


class CpuDropout(torch.autograd.Function):
    """Train-mode dropout drawing exactly what ATen's CPU dropout draws, keeping the mask as bits.

    ATen (CPU): noise = bernoulli(1-p) / (1-p); y = x * noise; it saves the float noise.
    """

    @staticmethod
    def forward(ctx, x, p: float):
        noise = torch.empty_like(x).bernoulli_(1 - p)
        ctx.save_for_backward(pack_bits(noise.bool()))
        ctx.shape, ctx.p = x.shape, p
        return x * noise.div_(1 - p)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        noise = _unpack_bytes(packed, ctx.shape).to(grad_y.dtype).div_(1 - ctx.p)
        return grad_y * noise, None


class WindowMaxPool2d(torch.autograd.Function):
    """Max-pool keeping the argmax's offset inside its window (uint8) instead of input + int64 indices."""

    @staticmethod
    def forward(ctx, x, pool: nn.MaxPool2d):
        y, idx = F.max_pool2d(
            x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, return_indices=True
        )
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(getattr(pool, a)) for a in _POOL_ATTRS)
        width = x.shape[-1]
        h0 = (torch.arange(y.shape[-2], device=x.device) * sh - ph).view(-1, 1)
        w0 = torch.arange(y.shape[-1], device=x.device) * sw - pw
        offset = ((idx // width - h0) // dh) * kw + (idx % width - w0) // dw
        ctx.save_for_backward(offset.to(torch.uint8))
        ctx.x_shape, ctx.pool = x.shape, pool
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (offset,) = ctx.saved_tensors
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(getattr(ctx.pool, a)) for a in _POOL_ATTRS)
        height, width = ctx.x_shape[-2:]
        offset = offset.long()
        h0 = (torch.arange(grad_y.shape[-2], device=grad_y.device) * sh - ph).view(-1, 1)
        w0 = torch.arange(grad_y.shape[-1], device=grad_y.device) * sw - pw
        idx = (h0 + (offset // kw) * dh) * width + w0 + (offset % kw) * dw
        grad_x = grad_y.new_zeros(*ctx.x_shape[:-2], height * width)
        grad_x.scatter_add_(-1, idx.flatten(-2), grad_y.flatten(-2))
        return grad_x.view(ctx.x_shape), None


_POOL_ATTRS = ("kernel_size", "stride", "padding", "dilation")


class ShapeOnlyAvgPool2d(torch.autograd.Function):
    """Average pooling: its backward reads only the input's shape, so no input is kept."""

    @staticmethod
    def forward(ctx, x, pool: nn.AvgPool2d):
        ctx.x_shape, ctx.pool = x.shape, pool
        return type(pool).forward(pool, x)

    @staticmethod
    def backward(ctx, grad_y):
        pool = ctx.pool
        shape_only = grad_y.new_empty(()).expand(ctx.x_shape)
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        grad_x = torch.ops.aten.avg_pool2d_backward(
            grad_y, shape_only, _pair(pool.kernel_size), _pair(stride), _pair(pool.padding), pool.ceil_mode,
            pool.count_include_pad, pool.divisor_override,
        )
        return grad_x, None


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class RecomputedActivation(torch.autograd.Function):
    """Smooth activation of x = fn(src): keeps the smaller src and recomputes x in backward.

    The recompute runs under the forward's autocast state, so that x is what the forward computed.
    """

    @staticmethod
    def forward(ctx, x, src, fn: Callable, act: Callable):
        y = act(x)
        if y is x:
            ctx.mark_dirty(x)
        ctx.save_for_backward(src)
        device = src.device.type
        ctx.fn, ctx.act = fn, act
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (src,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            x = ctx.fn(src)
        with torch.enable_grad():
            x.requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.act(x.clone()), x, grad_y.to(x.dtype))
        return grad_x, None, None, None


# -- lean forwards (installed as instance attributes) -----------------------------------------------
def _grad_through(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _bn_is_affine(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """True when the module computes a fixed per-channel affine map whose parameters get no gradient."""
    frozen = all(p is None or not p.requires_grad for p in (bn.weight, bn.bias))
    return not bn.training and bn.running_mean is not None and bn.running_var is not None and frozen


def _tag(y: torch.Tensor, fn: Callable, src: torch.Tensor) -> torch.Tensor:
    setattr(y, _RECOMPUTE_ATTR, (fn, weakref.ref(src)))
    return y


def _lean_bn(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (_grad_through(x) and _bn_is_affine(bn)):
        return type(bn).forward(bn, x)
    bn._check_input_dim(x)
    y = EvalBatchNorm.apply(x, bn)
    tag = getattr(x, _RECOMPUTE_ATTR, None)
    if tag is not None and tag[1]() is not None:
        fn = tag[0]
        _tag(y, lambda src: _bn_eval(bn, fn(src)), tag[1]())
    return y


def _lean_bn_act(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """timm ``BatchNormAct2d``: batch norm, then ``drop``, then ``act`` (both may be lean themselves)."""
    if not (_grad_through(x) and _bn_is_affine(bn)):
        return type(bn).forward(bn, x)
    if x.ndim != 4:
        raise ValueError(f"expected 4D input (got {x.ndim}D input)")
    return bn.act(bn.drop(_lean_bn(bn, x)))


def _mask_fn(module: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """The derivative's support, as autograd's own backward kernel defines it, and the slope outside it.

    Running that kernel on a gradient of ones and casting to bool is exact at the kinks (and for NaN)
    and several times faster on CPU than comparisons combined into a bool tensor.
    """
    if isinstance(module, nn.Hardtanh):  # ReLU6 included
        lo, hi = module.min_val, module.max_val
        return lambda x: torch.ops.aten.hardtanh_backward(_ones(x), x, lo, hi).bool(), 0.0
    if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        slope = getattr(module, "negative_slope", 0.0)
        return lambda x: torch.ops.aten.threshold_backward(_ones(x), x, 0).bool(), slope
    return lambda x: (x >= module.lo).logical_and_(x <= module.hi), 0.0  # medyate_peft.backbones.mcu.Clamp


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones(()).expand_as(x)


def _lean_masked(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    act = functools.partial(type(module).forward, module)
    if not _grad_through(x):
        return act(x)
    mask_fn, slope = _mask_fn(module)
    return MaskedActivation.apply(x, act, mask_fn, slope)


def _lean_dropout(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    usable = module.training and 0 < module.p < 1 and not module.inplace and x.device.type == "cpu"
    if not (usable and _grad_through(x)):
        return type(module).forward(module, x)
    return CpuDropout.apply(x, module.p)


def _lean_max_pool(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    kh, kw = _pair(pool.kernel_size)
    if not _grad_through(x) or pool.return_indices or x.dim() != 4 or kh * kw > 256:
        return type(pool).forward(pool, x)
    return WindowMaxPool2d.apply(x, pool)


def _lean_avg_pool(pool: nn.AvgPool2d, x: torch.Tensor) -> torch.Tensor:
    if not _grad_through(x) or x.dim() != 4:
        return type(pool).forward(pool, x)
    return ShapeOnlyAvgPool2d.apply(x, pool)


def _lean_smooth(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    act = functools.partial(type(module).forward, module)
    tag = getattr(x, _RECOMPUTE_ATTR, None)
    src = tag[1]() if tag is not None else None
    if src is None or src.numel() >= x.numel() or not _grad_through(x):
        return act(x)
    return RecomputedActivation.apply(x, src, tag[0], act)


def _tagging_layer(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A MeDyate Conv2d/Linear: its output remembers how to recompute it from its (weakly held) input."""
    y = type(layer).forward(layer, x, *args, **kwargs)
    if args or kwargs or not isinstance(y, torch.Tensor) or not y.requires_grad:
        return y
    if layer.disable_adapters or layer.merged:
        return _tag(y, layer.get_base_layer(), x)
    if layer.get_base_layer().weight.requires_grad:
        return y
    return _tag(y, lambda src: layer._dense(src, layer.effective_weight()), x)


def _optional_class(module_name: str, class_name: str) -> type | None:
    """A class of a library only if that library is already imported (no import here)."""
    return getattr(sys.modules.get(module_name), class_name, None)


_SMOOTH = (
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Sigmoid, nn.Softplus,
)


def _lean_forward_for(module: nn.Module) -> Callable | None:
    """The lean forward for this module's exact type (subclasses may compute something else)."""
    from .medyate.layer import MeDyateLayer

    kind = type(module)
    if isinstance(module, MeDyateLayer):
        return _tagging_layer
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return _lean_bn
    if kind is _optional_class("timm.layers.norm_act", "BatchNormAct2d"):
        return _lean_bn_act
    if kind in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU) or kind is _optional_class(
        "medyate_peft.backbones.mcu", "Clamp"
    ):
        return _lean_masked
    if kind is nn.Dropout:
        return _lean_dropout
    if kind is nn.MaxPool2d:
        return _lean_max_pool
    if kind is nn.AvgPool2d:
        return _lean_avg_pool
    if kind in _SMOOTH or kind is _optional_class("transformers.activations", "GELUActivation"):
        return _lean_smooth
    return None


def _is_lean(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and getattr(forward.func, "__module__", None) == __name__


def apply_lean_backward(model: nn.Module) -> int:
    """Give every supported module of `model` its lean forward; returns how many were switched.

    A module whose instance already has its own ``forward`` (e.g. an accelerate hook) is left alone.
    """
    count = 0
    for module in model.modules():
        lean = _lean_forward_for(module)
        if lean is None or "forward" in module.__dict__:
            continue
        module.forward = functools.partial(lean, module)
        count += 1
    return count


def remove_lean_backward(model: nn.Module) -> None:
    """Restore the class forwards of every module `apply_lean_backward` switched."""
    for module in model.modules():
        if _is_lean(module):
            del module.forward


def is_lean(model: nn.Module) -> bool:
    return any(_is_lean(m) for m in model.modules())


@contextlib.contextmanager
def lean_backward(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily switch the whole option (frozen MeDyate layers included) on or off, e.g. to measure it."""
    from .medyate.layer import MeDyateLayer

    layers = [m for m in model.modules() if isinstance(m, MeDyateLayer)]
    flags = [layer.lean_backward for layer in layers]
    was_lean = is_lean(model)
    try:
        for layer in layers:
            layer.lean_backward = enabled
        remove_lean_backward(model)
        if enabled:
            apply_lean_backward(model)
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.lean_backward = flag
        remove_lean_backward(model)
        if was_lean:
            apply_lean_backward(model)
