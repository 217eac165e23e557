"""Lean backward through the frozen path: keep only what the input gradient needs, exactly.

Standard autograd keeps, for every op between the loss and the deepest trained layer, the tensors
it would need for *any* gradient: a frozen eval-mode BatchNorm keeps its input, a ReLU its output,
a CPU dropout a float noise tensor, a max-pool its input plus int64 indices. Only the gradient
with respect to the input is wanted here, and for these ops it needs much less:

* eval-mode BatchNorm with frozen affine parameters is the per-channel map y = x*s + t:
  grad_x = grad_y*s, nothing saved (timm's ``BatchNormAct2d`` likewise, then its activation);
* ReLU, ReLU6/Hardtanh, LeakyReLU and the MCU models' ``Clamp`` have a 0/1 (or 1/slope) derivative:
  a bit-packed mask, numel/8 bytes (32x less than the fp32 tensor autograd keeps);
* dropout (train mode): its keep-mask bit-packed instead of the float noise (CPU) or the bool mask
  (other devices), same random draws;
* max-pool: the argmax offset inside its window, one byte per output element; average pooling:
  nothing (its backward needs only the input's shape);
* attention (transformers' eager and SDPA cores): only query, key and value; the probabilities
  (eager: softmax output, dropout noise and dropped probabilities, each batch x heads x seq^2) or
  SDPA's output and log-sum-exp are recomputed from them in backward, under the forward's random
  state (time cost: one extra attention core, no weight matmul). With `recompute=True`, an attention module
  right above a LayerNorm/RMSNorm keeps nothing: the whole module (q/k/v projections included) is rerun in
  backward from the norm's input, which the norm keeps anyway (`torch.utils.checkpoint`; time cost: its
  projections and core again; with the MLP recompute below, +23-37 % FLOPs and +14-37 % time over the
  default lean step on MiniLM, BERT-base and a Llama decoder, results/lean_transformers.md);
* smooth activations (GELU, SiLU, hard-swish, transformers' own activation modules, ...) keep their
  input. Only with `recompute=True`, when that input was produced by a frozen Conv2d/Linear
  (optionally through an eval BatchNorm) from a *smaller* tensor, that smaller tensor is kept and the
  activation input is recomputed in backward (time cost: one extra forward of that conv/linear, the MLP's
  first layer(s) on a transformer: off by default);
* gated MLPs (Llama's ``down(act(gate(x)) * up(x))`` and its copies): gate and up only, not also
  act(gate); act(gate) is recomputed elementwise in backward;
* LayerNorm and RMSNorm keep what autograd keeps (their input and per-row statistics: nothing smaller
  gives their gradient exactly; their output instead would be as large and only approximately invertible);
  linear ops, residual adds and reshapes keep nothing.

Without `recompute`, what a transformer block keeps is close to the least any exact backward that reruns no
weight matmul can keep: q, k, v (the softmax needs q and k, its gradient v), both norms' inputs and the MLP
activation's input (GELU) or gate and up (gated MLP), 0.53x / 0.71x of autograd's bytes on BERT-base / a
Llama decoder at sequence 128 (results/lean_transformers.md). Below a quarter needs the projections rerun.

Everything here is exact: forward outputs are computed by the module's own code and are bitwise
unchanged; gradients equal standard autograd's (up to float summation order in max-pool).
Modules are switched by giving the *instance* a ``forward`` attribute; classes, state dicts and
hooks are untouched, and `remove_lean_backward` restores the originals. Each lean forward falls
back to the module's own forward whenever its preconditions fail (BatchNorm in train mode or with
trainable affine parameters, no gradient needed, ...).

Time cost (measured, results/lean_backward.md): mostly the mask passes (the derivative mask in
forward, a multiply by it in backward, where plain autograd runs one fused kernel). Bit packing
uses torch ops only (any device, traceable by `torch.compile`, no host synchronisation). Caveat of
the recompute: the kept smaller tensor must not be modified in place later in the forward (autograd
then raises, as it does for any saved tensor); turn it off for such a model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# On a tensor: (fn, weakref to src, layer) with tensor == fn(src), bitwise; layer: fn reruns a Conv2d/Linear.
_RECOMPUTE_ATTR = "_medyate_recompute"


# -- bit packing ------------------------------------------------------------------------------------
# Little bit order (numpy's ``bitorder="little"``): bit k of byte j is element 8*j + k.
_GATHER = 0x0102040810204080  # byte k's low bit -> bit 56+k of the product (no carries, see `pack_bits`)
# [256, 8]: a byte's bits as values of a dtype, 1 for a set bit and `off` (0, or a slope) for a clear one
_SPREAD: dict[tuple[torch.device, torch.dtype, float], torch.Tensor] = {}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Eight booleans per uint8, with torch ops only (torch has no packbits).

    Each run of 8 bool bytes is read as one int64 word; multiplying by `_GATHER` moves the low bit
    of byte k to bit 56+k and every other partial product to a distinct bit outside 56..63, so the
    top byte of the (wrapping) product is the packed byte. On a little-endian machine that byte is
    read in place (every 8th byte, one copy), instead of a shift and a conversion (two more passes).
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    # Whole, aligned int64 words (compiled: always a fresh copy, which the compiler fuses away).
    if pad or torch.compiler.is_compiling() or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    product = flat.view(torch.uint8).view(torch.int64) * _GATHER
    if sys.byteorder == "little":
        return product.view(torch.uint8)[7::8].contiguous()
    return (product >> 56).to(torch.uint8)


def _spread_table(device: torch.device, dtype: torch.dtype, off: float = 0.0) -> torch.Tensor:
    table = _SPREAD.get((device, dtype, off))
    if table is None:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        # `off` rounded to the dtype as ATen rounds a scalar (LeakyReLU's slope in its backward kernel)
        table = bits.to(dtype) if not off else torch.where(bits.bool(), 1.0, torch.tensor(off, dtype=dtype)).to(dtype)
        _SPREAD[(device, dtype, off)] = table
    return table


def unpack_factor(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype, off: float = 0.0) -> torch.Tensor:
    """The mask as values of `dtype`, 1 where set and `off` where clear (one table lookup per packed byte):
    a factor for the gradient, without a uint8 pass and a conversion of it inside the multiply."""
    # index_select copies whole rows: several times faster on CPU than advanced indexing
    flat = torch.index_select(_spread_table(packed.device, dtype, off), 0, packed.int()).view(-1)
    return flat[: shape.numel()].view(shape)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits` for a mask of the given shape."""
    return unpack_factor(packed, shape, torch.uint8).view(torch.bool)


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
        # ATen's order (on the CPU invstd in double, then grad*invstd*weight) keeps the CPU result bitwise
        # equal; other devices compute it in float32 (ATen's CUDA kernel does, and MPS has no double).
        wide = torch.float64 if grad_y.device.type == "cpu" else torch.float32
        invstd = (1 / torch.sqrt(bn.running_var.to(wide) + bn.eps)).to(grad_y.dtype)
        grad_x = grad_y * invstd.view(shape)
        if bn.weight is not None:
            grad_x.mul_(bn.weight.to(grad_y.dtype).view(shape))  # in place: no second activation-sized tensor
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
        # 1 or the slope per element, times the gradient: the products autograd's kernel forms (torch.where
        # on an unpacked bool mask is an order of magnitude slower on the CPU). The factor is a fresh
        # tensor: multiplied in place, one allocation fewer.
        return unpack_factor(packed, ctx.shape, grad_y.dtype, ctx.slope).mul_(grad_y), None, None, None


class CpuDropout(torch.autograd.Function):
    """Train-mode dropout drawing exactly what ATen's unfused dropout (CPU, MPS) draws, keeping the mask as bits.

    ATen (unfused): noise = bernoulli(1-p) / (1-p); y = x * noise; it saves the float noise.
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
        noise = unpack_factor(packed, ctx.shape, grad_y.dtype).div_(1 - ctx.p)
        return grad_y * noise, None


_FUSED_DROPOUT_DEVICES = ("cuda", "xpu", "lazy")  # where ATen's dropout runs native_dropout (CPU, MPS: bernoulli)


class NativeDropout(torch.autograd.Function):
    """Train-mode dropout where ATen fuses it (CUDA...): the same kernel, its bool mask kept as bits."""

    @staticmethod
    def forward(ctx, x, p: float):
        y, mask = torch.native_dropout(x, p, True)
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape, ctx.p = x.shape, p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        return torch.ops.aten.native_dropout_backward(grad_y, mask, 1 / (1 - ctx.p)), None


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


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    """The forward's autocast state, for a recompute in backward (where autocast is off)."""
    return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _autocast(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


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
        ctx.fn, ctx.act, ctx.autocast = fn, act, _autocast_state(src.device)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (src,) = ctx.saved_tensors
        with torch.no_grad(), _autocast(ctx.autocast):
            x = ctx.fn(src)
        with torch.enable_grad():
            x.requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.act(x.clone()), x, grad_y.to(x.dtype))
        return grad_x, None, None, None


class RecomputedAttention(torch.autograd.Function):
    """An attention core (eager or SDPA) that keeps only query, key and value and reruns itself in backward.

    The rerun uses the forward's random state (attention dropout draws again what it drew) and records
    the core's own ops, so the gradients are plain autograd's. The attention weights the core returns
    (eager) come back without gradient.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, core: Callable, out: list):
        ctx.core, ctx.rng = core, _rng_state(query.device) if core.keywords.get("dropout") else None
        ctx.autocast = _autocast_state(query.device)
        output, weights = core(query, key, value, mask)
        out.append(weights)
        ctx.save_for_backward(query, key, value, mask)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved[:3], ctx.needs_input_grad[:3], strict=True)]
        with _replayed_rng(ctx.rng), torch.enable_grad(), _autocast(ctx.autocast):
            output, _ = ctx.core(*inputs, saved[3])
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad_output))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)


class GatedProduct(torch.autograd.Function):
    """act(gate) * up keeping gate and up (autograd also keeps act(gate)); act(gate) is recomputed in backward.

    With `rebuild` = (gate_fn, up_fn), `src` (the projections' smaller common input) is kept instead and
    gate, up are recomputed from it (the `recompute` option: two extra projections per backward).
    """

    @staticmethod
    def forward(ctx, gate, up, src, act: Callable, rebuild: tuple[Callable, Callable] | None):
        ctx.act, ctx.rebuild, ctx.autocast = act, rebuild, _autocast_state(gate.device)
        ctx.save_for_backward(*((src,) if rebuild is not None else (gate, up)))
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        if ctx.rebuild is not None:
            (src,) = ctx.saved_tensors
            with torch.no_grad(), _autocast(ctx.autocast):
                gate, up = (fn(src) for fn in ctx.rebuild)
        else:
            gate, up = ctx.saved_tensors
        with torch.enable_grad(), _autocast(ctx.autocast):
            gate = gate.detach().requires_grad_(True)
            activated = ctx.act(gate)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(activated, gate, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None, None, None


def _rng_state(device: torch.device) -> tuple[torch.device, torch.Tensor]:
    if device.type == "cpu":
        return device, torch.get_rng_state()
    return device, torch.get_device_module(device).get_rng_state(device)


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.device, torch.Tensor] | None) -> Iterator[None]:
    """Inside: the random state of the forward (None: untouched); after: the state from before."""
    if state is None:
        yield
        return
    device, value = state
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices, device_type="cuda" if device.type == "cpu" else device.type):
        if device.type == "cpu":
            torch.set_rng_state(value)
        else:
            torch.get_device_module(device).set_rng_state(value, device)
        yield


def _grad_through(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _bn_is_affine(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """True when the module computes a fixed per-channel affine map whose parameters get no gradient."""
    frozen = all(p is None or not p.requires_grad for p in (bn.weight, bn.bias))
    return not bn.training and bn.running_mean is not None and bn.running_var is not None and frozen


def _tag(y: torch.Tensor, fn: Callable, src: torch.Tensor, layer: bool) -> torch.Tensor:
    setattr(y, _RECOMPUTE_ATTR, (fn, weakref.ref(src), layer))
    return y


def _tag_through(y: torch.Tensor, fn: Callable, x: torch.Tensor, layer: bool) -> torch.Tensor:
    """Tag y = fn(x); when x is itself tagged as g(src), y is recomputed from src (fn after g), unless that
    would rerun two Conv2d/Linear layers (one is the most a recompute reruns)."""
    tag = getattr(x, _RECOMPUTE_ATTR, None)
    src = tag[1]() if tag is not None else None
    if src is None or (layer and tag[2]):
        return _tag(y, fn, x, layer)
    inner = tag[0]
    return _tag(y, lambda s: fn(inner(s)), src, layer or tag[2])


def _lean_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm/RMSNorm (recompute option): the output is tagged as recomputable from the input the norm's
    own backward keeps, so a smooth activation or gated MLP above the next frozen linear keeps nothing new,
    and an attention module right above it can be rerun from that input (`_checkpointed_attention`)."""
    y = type(norm).forward(norm, x)
    if _grad_through(x) and isinstance(y, torch.Tensor) and not torch.compiler.is_compiling():
        _tag_through(y, functools.partial(type(norm).forward, norm), x, layer=False)
        if _norm_keeps_input(x):
            setattr(y, _NORM_INPUT_ATTR, (norm, weakref.ref(x), x._version, y._version))
    return y


# On a norm's output: (norm, weakref to its input, the input's and the output's versions), an input the
# norm's own backward keeps.
_NORM_INPUT_ATTR = "_medyate_norm_input"


def _norm_keeps_input(x: torch.Tensor) -> bool:
    """Whether LayerNorm/RMSNorm keep `x` itself for backward: in fp32 without autocast they do (in lower
    precision, transformers' RMSNorm keeps an fp32 copy instead and autocast may cast it)."""
    return x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def _lean_bn(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (_grad_through(x) and _bn_is_affine(bn)):
        return type(bn).forward(bn, x)
    bn._check_input_dim(x)
    y = EvalBatchNorm.apply(x, bn)
    if getattr(x, _RECOMPUTE_ATTR, None) is not None:
        _tag_through(y, functools.partial(_bn_eval, bn), x, layer=False)
    return y


def _lean_bn_act(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """timm ``BatchNormAct2d``: batch norm, then ``drop``, then ``act`` (both may be lean themselves)."""
    if not (_grad_through(x) and _bn_is_affine(bn)):
        return type(bn).forward(bn, x)
    if x.ndim != 4:
        raise ValueError(f"expected 4D input (got {x.ndim}D input)")
    return bn.act(bn.drop(_lean_bn(bn, x)))


def _mask_fn(module: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """The derivative's support, as autograd's own backward kernel defines it (at the kinks and for NaN),
    and the slope outside it.

    Hardtanh, ReLU (``not x <= 0``) and LeakyReLU (``x > 0``): each one's backward kernel run on a gradient
    of ones, cast to bool (2-3x faster on the CPU than the comparisons, whose bool kernels are slow there).
    """
    if isinstance(module, nn.Hardtanh):  # ReLU6 included
        lo, hi = module.min_val, module.max_val
        return lambda x: torch.ops.aten.hardtanh_backward(_ones(x), x, lo, hi).bool(), 0.0
    if isinstance(module, nn.LeakyReLU):
        return lambda x: torch.ops.aten.leaky_relu_backward(_ones(x), x, 0.0, False).bool(), module.negative_slope
    if isinstance(module, nn.ReLU):
        return lambda x: torch.ops.aten.threshold_backward(_ones(x), x, 0.0).bool(), 0.0
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
    if not (module.training and 0 < module.p < 1 and not module.inplace and _grad_through(x)):
        return type(module).forward(module, x)
    fused = x.device.type in _FUSED_DROPOUT_DEVICES or x.device.type == torch._C._get_privateuse1_backend_name()
    return (NativeDropout if fused else CpuDropout).apply(x, module.p)


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
    if src is None or src.numel() >= x.numel() or not _grad_through(x) or torch.compiler.is_compiling():
        return act(x)
    return RecomputedActivation.apply(x, src, tag[0], act)


_LEAN_ATTENTION = "medyate_lean"  # the key our core is registered under in transformers' AttentionInterface


class _LeanAttentionConfig:
    """An attention module's view of its config: everything reads through, except that the attention core
    the module looks up is the lean one (the model's own config, masks and saved files are untouched)."""

    _attn_implementation = _LEAN_ATTENTION

    def __init__(self, config: Any, eager: Callable) -> None:
        self.__dict__.update(wrapped=config, eager=eager)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["wrapped"], name)


def _lean_attention_core(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
    """Registered core: runs the model's configured core, keeping only query, key and value for backward."""
    config = module.config
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core = ALL_ATTENTION_FUNCTIONS.get_interface(config.wrapped._attn_implementation, config.eager)
    tensors = (query, key, value)
    mask_grad = isinstance(attention_mask, torch.Tensor) and attention_mask.requires_grad
    rerun = not torch.compiler.is_compiling() and _IN_CHECKPOINT.get()  # (a traced graph has no checkpoint of ours)
    if not torch.is_grad_enabled() or mask_grad or not any(t.requires_grad for t in tensors) or rerun:
        return core(module, query, key, value, attention_mask, **kwargs)
    if torch.compiler.is_compiling():
        # The compiler traces checkpoint's recompute (not torch.autograd.grad inside a Function's backward).
        return checkpoint(core, module, query, key, value, attention_mask, use_reentrant=False, **kwargs)
    weights: list = []
    bound = functools.partial(_call_core, core, module, **kwargs)
    output = RecomputedAttention.apply(query, key, value, attention_mask, bound, weights)
    return output, weights[0]


def _call_core(core: Callable, module: nn.Module, query, key, value, mask, **kwargs: Any):
    return core(module, query, key, value, mask, **kwargs)


# Set while an attention module runs inside `_checkpointed_attention`: the checkpoint already keeps nothing of
# its inside, so the core runs as it is (no second rerun of it in backward).
_IN_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("medyate_attention_checkpoint", default=False)


def _checkpointed_attention(attn: nn.Module, *args: Any, **kwargs: Any):
    """Recompute option: a whole attention module (q/k/v projections, rotary, core, output projection) rerun in
    backward from the input of the norm below it, which that norm's backward keeps anyway, so nothing of the
    module is kept (time cost: its frozen projections and core run twice). Falls back to the module's forward
    (query, key, value kept by the lean core) when its input is not such a norm's output or a cache is filled."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    source = getattr(hidden, _NORM_INPUT_ATTR, None)
    src = source[1]() if source is not None and hidden._version == source[3] else None  # not changed in place
    src = src if src is not None and src._version == source[2] else None
    cached = any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "past_key_value"))
    if src is not None and cached and attn.training and _grad_through(hidden):
        warnings.warn(
            "lean_recompute: the model fills a key/value cache while training (use_cache=True), which a rerun "
            "would fill twice, so attention keeps its query, key and value; pass use_cache=False to the forward "
            "(or set model.config.use_cache = False) to rerun attention from the norm's input instead",
            stacklevel=2,
        )
    if src is None or cached or not _grad_through(hidden) or torch.compiler.is_compiling():
        return type(attn).forward(attn, *args, **kwargs)
    rest = args[1:] if "hidden_states" not in kwargs else args
    kwargs.pop("hidden_states", None)
    return checkpoint(_rerun_attention, attn, source[:3], src, *rest, use_reentrant=False, **kwargs)


def _rerun_attention(attn: nn.Module, source: tuple, src: torch.Tensor, *args: Any, **kwargs: Any):
    norm, _, version = source
    if src._version != version:  # as autograd refuses a saved tensor changed in place
        raise RuntimeError(
            f"lean_recompute: the input of {type(norm).__name__} was modified in place after the norm ran, so "
            "the attention above it cannot be rerun from it; set lean_recompute=False for this model"
        )
    token = _IN_CHECKPOINT.set(True)
    try:
        return type(attn).forward(attn, type(norm).forward(norm, src), *args, **kwargs)
    finally:
        _IN_CHECKPOINT.reset(token)


def _attention_eager(module: nn.Module) -> Callable | None:
    """The eager core of a transformers attention module that looks its core up by config, else None."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)  # under transformers' decorators
    uses_interface = code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
    if not uses_interface or not hasattr(module, "config") or isinstance(module.config, _LeanAttentionConfig):
        return None
    # Flash/flex/paged cores take differently laid out inputs, and models branch on their names: left alone.
    if getattr(module.config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return None
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _register_lean_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    if _LEAN_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_LEAN_ATTENTION, _lean_attention_core)


def _lean_gated_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``, the product through `GatedProduct`."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    # Compiled, the partitioner itself recomputes act(gate) rather than save it.
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return mlp.down_proj(mlp.act_fn(gate) * up)
    tags = [getattr(t, _RECOMPUTE_ATTR, None) for t in (gate, up)]
    rebuild = None
    src = tags[0][1]() if tags[0] is not None else None
    if src is not None and tags[1] is not None and tags[1][1]() is src and src.numel() < gate.numel() + up.numel():
        rebuild = (tags[0][0], tags[1][0])  # both tagged (recompute option) from one smaller tensor
    act = functools.partial(type(mlp.act_fn).forward, mlp.act_fn)
    return mlp.down_proj(GatedProduct.apply(gate, up, src if rebuild else None, act, rebuild))


def _copies_forward(module: nn.Module, module_name: str, class_name: str) -> bool:
    """Whether the module's forward is, op for op, that class's forward (transformers' models copy them)."""
    reference = _optional_class(module_name, class_name)
    code = getattr(type(module).forward, "__code__", None)
    if reference is None or code is None:
        return False
    ref = reference.forward.__code__
    return (code.co_code, code.co_names, code.co_varnames, code.co_consts) == (
        ref.co_code, ref.co_names, ref.co_varnames, ref.co_consts
    )


_LLAMA = "transformers.models.llama.modeling_llama"


def _tagging_layer(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A MeDyate Conv2d/Linear: its output remembers how to recompute it from its (weakly held) input."""
    y = type(layer).forward(layer, x, *args, **kwargs)
    if args or kwargs or not isinstance(y, torch.Tensor) or not y.requires_grad:
        return y
    if layer.disable_adapters or layer.merged:
        return _tag_through(y, layer.get_base_layer(), x, layer=True)
    if layer.get_base_layer().weight.requires_grad:
        return y
    return _tag_through(y, layer._training_output, x, layer=True)


def _optional_class(module_name: str, class_name: str) -> type | None:
    """A class of a library only if that library is already imported (no import here)."""
    return getattr(sys.modules.get(module_name), class_name, None)


_SMOOTH = (
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Sigmoid, nn.Softplus,
)


def _transformers_smooth() -> tuple[type, ...]:
    """transformers' parameter-free elementwise activation modules that are imported (no import here)."""
    names = (
        "GELUActivation", "GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation",
        "QuickGELUActivation", "ClippedGELUActivation", "AccurateGELUActivation", "SiLUActivation",
        "MishActivation", "LaplaceActivation", "ReLUSquaredActivation", "SqrtSoftplusActivation",
    )
    found = (_optional_class("transformers.activations", name) for name in names)
    return tuple(kind for kind in found if kind is not None)


def _lean_forward_for(module: nn.Module, recompute: bool) -> Callable | None:
    """The lean forward for this module's exact type (subclasses may compute something else).

    Without `recompute`, frozen layers need no forward of their own (their MeDyate forward already
    saves nothing) and smooth activations keep their input as autograd does: nothing to switch.
    """
    from .medyate.layer import MeDyateLayer

    kind = type(module)
    if isinstance(module, MeDyateLayer):
        return _tagging_layer if recompute else None
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
    if _copies_forward(module, _LLAMA, "LlamaMLP"):
        return _lean_gated_mlp
    if recompute and (kind in (nn.LayerNorm, nn.RMSNorm) or _copies_forward(module, _LLAMA, "LlamaRMSNorm")):
        return _lean_norm
    if kind is nn.MaxPool2d:
        return _lean_max_pool
    if kind is nn.AvgPool2d:
        return _lean_avg_pool
    if recompute and (kind in _SMOOTH or kind in _transformers_smooth()):
        return _lean_smooth
    return None


def _has_lean_forward(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and getattr(forward.func, "__module__", None) == __name__


def _is_lean(module: nn.Module) -> bool:
    return _has_lean_forward(module) or isinstance(module.__dict__.get("config"), _LeanAttentionConfig)


def apply_lean_backward(model: nn.Module, recompute: bool = False) -> int:
    """Give every supported module of `model` its lean forward; returns how many were switched.

    A module whose instance already has its own ``forward`` (e.g. an accelerate hook) is left alone.
    Attention modules of transformers get a view of their config that selects the lean core.
    `recompute` also recomputes smooth activations from a smaller frozen Conv2d/Linear input.
    """
    count = 0
    for module in model.modules():
        eager = _attention_eager(module)
        if eager is not None:
            _register_lean_attention()
            module.config = _LeanAttentionConfig(module.config, eager)
            if recompute and "forward" not in module.__dict__:
                module.forward = functools.partial(_checkpointed_attention, module)
            count += 1
            continue
        lean = _lean_forward_for(module, recompute)
        if lean is None or "forward" in module.__dict__:
            continue
        module.forward = functools.partial(lean, module)
        count += 1
    return count


def remove_lean_backward(model: nn.Module) -> None:
    """Restore the class forwards (and attention configs) of every module `apply_lean_backward` switched."""
    for module in model.modules():
        if _has_lean_forward(module):
            del module.forward
        config = module.__dict__.get("config")
        if isinstance(config, _LeanAttentionConfig):
            module.config = config.wrapped


def _recomputes(model: nn.Module) -> bool:
    """Whether the lean backward installed on `model` recomputes smooth activations."""
    return any(_has_lean_forward(m) and m.forward.func is _tagging_layer for m in model.modules())


def is_lean(model: nn.Module) -> bool:
    return any(_is_lean(m) for m in model.modules())


@contextlib.contextmanager
def lean_backward(model: nn.Module, enabled: bool, recompute: bool | None = None) -> Iterator[None]:
    """Temporarily switch the whole option (frozen MeDyate layers included) on or off, e.g. to measure it.

    `recompute` None keeps the installed recompute choice.
    """
    from .medyate.layer import MeDyateLayer

    layers = [m for m in model.modules() if isinstance(m, MeDyateLayer)]
    flags = [layer.lean_backward for layer in layers]
    was_lean, was_recompute = is_lean(model), _recomputes(model)
    try:
        for layer in layers:
            layer.lean_backward = enabled
        remove_lean_backward(model)
        if enabled:
            apply_lean_backward(model, was_recompute if recompute is None else recompute)
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.lean_backward = flag
        remove_lean_backward(model)
        if was_lean:
            apply_lean_backward(model, was_recompute)
