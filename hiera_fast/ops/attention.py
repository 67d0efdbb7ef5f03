"""Mask-unit (or global) attention with query max-pooling on the qkv Linear's output, ``fused=True`` or not.

- :class:`MaskUnitAttention`: the op of one call site (a model's block, a patched library module): its heads,
  stride, window and flags are checked once, and its route (:mod:`hiera_fast.ops.routing`) is decided once per
  device, dtype and kind of call, then reused; a call checks only its tensor.
- :func:`mask_unit_attention`: the same as a function (the ops are cached by their arguments).
- :func:`global_attention_sdpa`: the SDPA route of global attention on CUDA.

Contract (docs/DESIGN.md, "The unrolled layout"): ``qkv [B, N, 3 * C]``, channels ``(3, heads, head_dim)``, tokens
``n = t * nw + w``; out ``[B, N // q_stride, C]`` at rows ``r * nw + w``. One autograd route, a
``torch.autograd.Function`` over two custom ops (the forward and the backward kernel bodies): in plain eager mode it
calls the bodies directly, under ``torch.compile``, export, ``torch.jit.trace`` or fake tensors the custom ops, whose
fake implementations give the shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import reference, routing
from .checks import check_attention_args, check_flag, check_qkv_tensor
from .pool import _device_guard, unit_last_stride, unrolled_max_pool

_AUTOCAST_DEVICES = ("cuda", "cpu")


def _autocast_input(qkv: torch.Tensor) -> torch.Tensor:
    """Under ``torch.autocast`` the attention runs in the autocast dtype, as SDPA does there (fp32 / fp16 / bf16 inputs
    are cast; fp64 is not). Casting before the max-pool is exact: rounding is monotonic, so it commutes with max."""
    device_type = qkv.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type) and qkv.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        if qkv.dtype != dtype:
            return qkv.to(dtype)
    return qkv


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax statistics' dtype the kernels keep (``kernels.unrolled_layout.softmax_stats_dtype``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- kernel bodies
def _forward_kernel(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int,
                    with_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, N // q_stride, C], lse)`` by the Triton forward kernel (counted). ``lse`` is ``[B, heads,
    N // q_stride]`` (fp32; fp64 for fp64 qkv) for the backward with ``with_lse``, else empty."""
    routing.count("mask_unit_attention_fwd")
    qkv = unit_last_stride(qkv)
    with _device_guard(qkv.device):
        result = routing.attention_fwd.mask_unit_attention_forward(qkv, num_heads, q_stride, num_windows,
                                                                   return_lse=with_lse)
    return result if with_lse else (result, qkv.new_empty((0,), dtype=_stats_dtype(qkv.dtype)))


def _backward_kernel(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """``d_qkv [B, N, 3C]`` in qkv's unrolled layout by the Triton backward kernels (counted)."""
    routing.count("mask_unit_attention_bwd")
    if routing._batch_element_extent(grad_out) >= routing.MAX_ROW_OFFSET:  # a strided view of a huge tensor
        grad_out = grad_out.contiguous()
    with _device_guard(qkv.device):
        return routing.attention_bwd.mask_unit_attention_backward(grad_out, unit_last_stride(qkv), out, lse,
                                                                  num_heads, q_stride, num_windows)


_attention_fwd = torch.library.custom_op("hiera_fast::mask_unit_attention_fwd", mutates_args=())(_forward_kernel)
_attention_bwd = torch.library.custom_op("hiera_fast::mask_unit_attention_bwd", mutates_args=())(_backward_kernel)


@_attention_fwd.register_fake
def _attention_fwd_fake(qkv, num_heads, q_stride, num_windows, with_lse):
    B, N, three_c = qkv.shape
    lse_shape = (B, num_heads, N // q_stride) if with_lse else (0,)
    return qkv.new_empty(B, N // q_stride, three_c // 3), qkv.new_empty(lse_shape, dtype=_stats_dtype(qkv.dtype))


@_attention_bwd.register_fake
def _attention_bwd_fake(grad_out, qkv, out, lse, num_heads, q_stride, num_windows):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _forward(qkv, num_heads, q_stride, num_windows, with_lse):
    """The kernel body directly in plain eager mode (no dispatcher cost), the custom op under tracing."""
    if routing.plain_eager(qkv):
        return _forward_kernel(qkv, num_heads, q_stride, num_windows, with_lse)
    return _attention_fwd(qkv, num_heads, q_stride, num_windows, with_lse)


def _backward(grad_out, qkv, out, lse, num_heads, q_stride, num_windows):
    if routing.plain_eager(qkv):
        return _backward_kernel(grad_out, qkv, out, lse, num_heads, q_stride, num_windows)
    return _attention_bwd(grad_out, qkv, out, lse, num_heads, q_stride, num_windows)


class _AttentionFunction(torch.autograd.Function):
    """The fused attention's autograd, in eager mode, under ``torch.compile``, export and fake tensors alike: the
    forward keeps its ``lse`` for the backward kernel; no double backward (``once_differentiable``). (The ``ctx``
    form: ``setup_context`` binds the arguments with ``inspect`` on every call, ~10 us.)"""

    @staticmethod
    def forward(ctx, qkv, num_heads, q_stride, num_windows):
        out, lse = _forward(qkv, num_heads, q_stride, num_windows, True)
        ctx.save_for_backward(qkv, out, lse)
        ctx.args = (num_heads, q_stride, num_windows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        return _backward(grad_out, qkv, out, lse, *ctx.args), None, None, None


# ---------------------------------------------------------------------------------------------- global attention
def global_attention_sdpa(qkv: torch.Tensor, num_heads: int, q_stride: int) -> torch.Tensor:
    """Global attention with query max-pooling by SDPA on strided views of ``qkv [B, N, 3C]`` (no copies of K and V;
    the pooled query is the fused max-pool's contiguous output) → ``[B, N // q_stride, C]``. Autograd is PyTorch's.
    Counted in ``kernel_launches`` as ``global_attention_sdpa`` outside ``torch.compile``."""
    routing.count("global_attention_sdpa")
    qkv = unit_last_stride(qkv)  # SDPA's fused kernels need unit-stride head dims (else its slow math path)
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    if B == 0:  # an empty result still tied to qkv's autograd (SDPA's CUDA kernels reject a batch of 0 in some torch)
        return qkv[:, : N // q_stride, :C].clone()
    q, k, v = qkv.view(B, N, 3, num_heads, head_dim).unbind(2)  # each [B, N, H, hd], unit stride on hd
    if q_stride > 1:
        q = unrolled_max_pool(q.reshape(B, N, C), q_stride, fused=True).view(B, N // q_stride, num_heads, head_dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, N', hd]
    return out.transpose(1, 2).reshape(B, N // q_stride, C)


# ---------------------------------------------------------------------------------------------- the op
class MaskUnitAttention:
    """Mask-unit (or global) attention with query max-pooling of one call site: ``op(qkv)``.

    Args:
        num_heads: attention heads.
        q_stride: flattened query pooling stride (1 = no pooling).
        window_size: flattened mask-unit size *after* pooling (as the official ``MaskUnitAttention``).
        use_mask_unit_attn: windowed attention over ``N // (q_stride * window_size)`` windows, else global.
        fused: run the fused route (:meth:`route`), else the eager reference.
        global_attention: for a global call, "sdpa" (on any device) or "triton" (our kernels); None follows the
            default of :func:`hiera_fast.ops.set_global_attention`, which applies on CUDA.

    Call with ``qkv [B, N, 3 * dim]`` (channels ``(3, heads, head_dim)``, tokens unrolled) → ``[B, N // q_stride,
    dim]`` (row ``r * num_windows + w``), in qkv's dtype; under ``torch.autocast`` in the autocast dtype (as SDPA),
    fused or not. The arguments are checked here, once; a call checks its tensor. The route is decided once per
    argument set (:func:`hiera_fast.ops.routing.cached_attention_route`); :attr:`routes` records the ones this op
    took, ``{(device, dtype, head_dim, global call, default global choice): Route}``."""

    def __init__(self, num_heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool, *,
                 fused: bool = False, global_attention: str | None = None):
        self.num_heads, self.q_stride, self.window_size, self.use_mask_unit_attn = check_attention_args(
            num_heads, q_stride, window_size, use_mask_unit_attn)
        self.fused = check_flag("fused", fused)
        if global_attention is not None and global_attention not in routing.GLOBAL_ATTENTION_BACKENDS:
            raise ValueError(f"global_attention must be None or one of {routing.GLOBAL_ATTENTION_BACKENDS}, "
                             f"got {global_attention!r}")
        self.global_attention = global_attention
        self.routes: dict[tuple, routing.Route] = {}

    def route(self, device: torch.device, dtype: torch.dtype, head_dim: int, num_windows: int) -> routing.Route:
        """The route of a call on ``device`` in ``dtype`` (after autocast) with ``num_windows`` windows (1: global),
        decided on the first such call and cached."""
        default = routing.default_global_attention()
        route = routing.cached_attention_route(self.fused, device, dtype, head_dim, num_windows == 1,
                                               self.global_attention, default)
        if not torch.compiler.is_compiling():  # a record for fused_routes(), written in eager mode, never read here
            self.routes[(device, dtype, head_dim, num_windows == 1, default)] = route
        return route

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        heads, stride = self.num_heads, self.q_stride
        num_windows = check_qkv_tensor(qkv, heads, stride, self.window_size, self.use_mask_unit_attn)
        qkv = _autocast_input(qkv)
        if not self.fused:
            return reference.mask_unit_attention_eager(qkv, heads, stride, num_windows)
        route = self.route(qkv.device, qkv.dtype, qkv.shape[-1] // (3 * heads), num_windows)
        kind, reason = route.kind, route.reason
        if kind == "kernel":
            reason = routing.attention_call_limit(qkv, heads, num_windows)
            if reason is None and routing.under_torch_func():
                reason = "a torch.func transform (grad, vmap, jvp, ...) is active; the fused ops have no rules for them"
            kind = "kernel" if reason is None else "eager"
        elif kind == "sdpa" and routing.under_torch_func():
            kind = "eager"
            reason = "a torch.func transform (grad, vmap, jvp, ...) is active; the fused ops have no rules for them"
        if kind == "kernel":
            if torch.is_grad_enabled() and qkv.requires_grad:  # the backward kernel needs the lse
                return _AttentionFunction.apply(qkv, heads, stride, num_windows)
            return _forward(qkv, heads, stride, num_windows, False)[0]
        if kind == "sdpa":
            return global_attention_sdpa(qkv, heads, stride)
        routing.warn_eager_once("mask_unit_attention", reason)
        return reference.mask_unit_attention_eager(qkv, heads, stride, num_windows)

    def __repr__(self) -> str:
        kind = f"mask-unit (window {self.window_size})" if self.use_mask_unit_attn else "global"
        return (f"MaskUnitAttention(heads={self.num_heads}, q_stride={self.q_stride}, {kind}, fused={self.fused}"
                + (f", global_attention={self.global_attention!r}" if self.global_attention else "") + ")")


_OPS: dict[tuple, MaskUnitAttention] = {}  # the ops of mask_unit_attention(), by their arguments


def mask_unit_attention(qkv: torch.Tensor, num_heads: int, q_stride: int, window_size: int,
                        use_mask_unit_attn: bool, fused: bool = False,
                        global_attention: str | None = None) -> torch.Tensor:
    """:class:`MaskUnitAttention` as a function: ``qkv [B, N, 3 * dim]`` → ``[B, N // q_stride, dim]``. The op for
    these arguments is built once and kept (with its routes)."""
    key = (num_heads, q_stride, window_size, use_mask_unit_attn, fused, global_attention)
    try:
        op = _OPS.get(key)
    except TypeError:  # an unhashable argument: the op's checks say what is wrong with it
        op = None
    if op is None:
        op = MaskUnitAttention(num_heads, q_stride, window_size, use_mask_unit_attn, fused=fused,
                               global_attention=global_attention)
        _OPS[key] = op
    return op(qkv)
