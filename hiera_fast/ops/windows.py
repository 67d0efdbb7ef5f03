"""SAM 2's windowed attention with query max-pooling on the BHWC map, ``fused=True`` or not.

- :class:`WindowAttention`: the op of one windowed block (its heads, window and stride checked once; its route
  decided once per device, dtype and head dim, then reused); a call checks its tensors.
- :func:`window_attention`: the same as a function (the ops are cached by their arguments).

Contract (docs/DESIGN.md, "The kernel contract (SAM 2's hieradet)"): ``qkv [B, H, W, 3C]`` is the qkv Linear on the
*unpadded* normed map, channels ``(3, heads, head_dim)``; ``bias [3C]`` that Linear's bias (None: no bias). The
official block pads the map to multiples of the window before the Linear, so a padded token's q, k, v are the bias:
live keys, no mask. Out ``[B, H // q, W // q, C]``: what the official block adds to its residual (windows put back,
cropped). The gradient reaches ``qkv`` and, for the padded tokens, ``bias``. One autograd route, as
:mod:`.attention`: a ``torch.autograd.Function`` over two custom ops (the kernel bodies), called directly in plain
eager mode and through ``torch.library`` under ``torch.compile``, export and fake tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import reference, routing
from .attention import _autocast_input, _stats_dtype
from .checks import check_flag, check_window_args, check_window_qkv
from .pool import _device_guard, unit_last_stride


# ---------------------------------------------------------------------------------------------- kernel bodies
def _forward_kernel(qkv: torch.Tensor, bias: Optional[torch.Tensor], num_heads: int, window_size: int,
                    q_stride: int, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H // q, W // q, C], lse)`` by the Triton forward kernel (counted); ``lse [B, heads, H // q,
    W // q]`` (fp32; fp64 for fp64) with ``with_lse``, else empty."""
    routing.count("window_attention_fwd")
    qkv = unit_last_stride(qkv)
    with _device_guard(qkv.device):
        result = routing.window_attention.window_attention_forward(qkv, bias, num_heads, window_size, q_stride,
                                                                   return_lse=with_lse)
    return result if with_lse else (result, qkv.new_empty((0,), dtype=_stats_dtype(qkv.dtype)))


def _backward_kernel(grad_out: torch.Tensor, qkv: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                     lse: torch.Tensor, num_heads: int, window_size: int,
                     q_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_qkv [B, H, W, 3C], d_bias [3C])`` by the Triton backward kernels (counted); ``d_bias`` (fp32; fp64 for
    fp64) sums the padded tokens' q, k, v gradients."""
    routing.count("window_attention_bwd")
    if routing._batch_element_extent(grad_out) >= routing.MAX_ROW_OFFSET:  # a strided view of a huge tensor
        grad_out = grad_out.contiguous()
    with _device_guard(qkv.device):
        return routing.window_attention.window_attention_backward(grad_out, unit_last_stride(qkv), bias, out, lse,
                                                                  num_heads, window_size, q_stride)


_window_fwd = torch.library.custom_op("hiera_fast::window_attention_fwd", mutates_args=())(_forward_kernel)
_window_bwd = torch.library.custom_op("hiera_fast::window_attention_bwd", mutates_args=())(_backward_kernel)


@_window_fwd.register_fake
def _window_fwd_fake(qkv, bias, num_heads, window_size, q_stride, with_lse):
    B, H, W, three_c = qkv.shape
    shape = (B, H // q_stride, W // q_stride)
    lse_shape = (B, num_heads, *shape[1:]) if with_lse else (0,)
    return qkv.new_empty(*shape, three_c // 3), qkv.new_empty(lse_shape, dtype=_stats_dtype(qkv.dtype))


@_window_bwd.register_fake
def _window_bwd_fake(grad_out, qkv, bias, out, lse, num_heads, window_size, q_stride):
    d_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    return d_qkv, qkv.new_empty((qkv.shape[-1],), dtype=_stats_dtype(qkv.dtype))


def _forward(qkv, bias, num_heads, window_size, q_stride, with_lse):
    """The kernel body directly in plain eager mode (no dispatcher cost), the custom op under tracing."""
    if routing.plain_eager(qkv) and (bias is None or type(bias) is torch.Tensor):
        return _forward_kernel(qkv, bias, num_heads, window_size, q_stride, with_lse)
    return _window_fwd(qkv, bias, num_heads, window_size, q_stride, with_lse)


def _backward(grad_out, qkv, bias, out, lse, num_heads, window_size, q_stride):
    if routing.plain_eager(qkv) and routing.plain_eager(grad_out):
        return _backward_kernel(grad_out, qkv, bias, out, lse, num_heads, window_size, q_stride)
    return _window_bwd(grad_out, qkv, bias, out, lse, num_heads, window_size, q_stride)


class _WindowFunction(torch.autograd.Function):
    """The fused window attention's autograd: the forward keeps its ``lse`` for the backward kernels; the bias gets
    the padded tokens' gradient in its own dtype. No double backward (``once_differentiable``)."""

    @staticmethod
    def forward(ctx, qkv, bias, num_heads, window_size, q_stride):
        out, lse = _forward(qkv, bias, num_heads, window_size, q_stride, True)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.args = (num_heads, window_size, q_stride)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, bias, out, lse = ctx.saved_tensors
        d_qkv, d_bias = _backward(grad_out, qkv, bias, out, lse, *ctx.args)
        d_bias = d_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[1] else None
        return (d_qkv if ctx.needs_input_grad[0] else None), d_bias, None, None, None


# ---------------------------------------------------------------------------------------------- the op
class WindowAttention:
    """SAM 2's windowed attention with query max-pooling of one block: ``op(qkv, bias)``.

    Args:
        num_heads: attention heads.
        window_size: the block's window ``ws`` (before pooling); the map is padded to multiples of it.
        q_stride: 1, or the queries' ``q_stride x q_stride`` max-pool inside each window (SAM 2's pooling blocks: 2).
        fused: run the fused route (:meth:`route`: our Triton kernels where the device, dtype, head dim and stride
            allow, else the eager reference with one warning), else the eager reference
            (:func:`hiera_fast.ops.reference.window_attention_bhwc_reference`).

    Call with ``qkv [B, H, W, 3C]`` (the qkv Linear on the unpadded map) and ``bias [3C]`` (that Linear's bias, or
    None) → ``[B, H // q_stride, W // q_stride, C]`` in qkv's dtype (under ``torch.autocast``, the autocast dtype).
    ``ValueError`` where the official block cannot run the map (a side whose pooled window count differs).
    :attr:`routes` records the routes taken, ``{(device, dtype, head_dim): Route}``."""

    def __init__(self, num_heads: int, window_size: int, q_stride: int = 1, *, fused: bool = False):
        self.num_heads, self.window_size, self.q_stride = check_window_args(num_heads, window_size, q_stride)
        self.fused = check_flag("fused", fused)
        self.routes: dict[tuple, routing.Route] = {}

    def route(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> routing.Route:
        """The route of a call on ``device`` in ``dtype`` (after autocast), decided on the first such call and
        cached."""
        route = routing.cached_window_route(self.fused, device, dtype, head_dim, self.q_stride)
        if not torch.compiler.is_compiling():
            self.routes[(device, dtype, head_dim)] = route
        return route

    def __call__(self, qkv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        heads, ws, q = self.num_heads, self.window_size, self.q_stride
        check_window_qkv(qkv, bias, heads, ws, q)
        qkv = _autocast_input(qkv)
        if not self.fused:
            return reference.window_attention_bhwc_reference(qkv, bias, heads, ws, q)
        route = self.route(qkv.device, qkv.dtype, qkv.shape[-1] // (3 * heads))
        reason = route.reason if route.kind == "eager" else routing.window_call_limit(qkv, heads, ws)
        if reason is None and routing.under_torch_func():
            reason = "a torch.func transform (grad, vmap, jvp, ...) is active; the fused ops have no rules for them"
        if reason is not None:
            routing.warn_eager_once("window_attention", reason)
            return reference.window_attention_bhwc_reference(qkv, bias, heads, ws, q)
        needs_grad = qkv.requires_grad or (bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            return _WindowFunction.apply(qkv, bias, heads, ws, q)
        return _forward(qkv, bias, heads, ws, q, False)[0]

    def __repr__(self) -> str:
        return (f"WindowAttention(heads={self.num_heads}, window={self.window_size}, q_stride={self.q_stride}, "
                f"fused={self.fused})")


_OPS: dict[tuple, WindowAttention] = {}  # the ops of window_attention(), by their arguments


def window_attention(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, window_size: int,
                     q_stride: int = 1, fused: bool = False) -> torch.Tensor:
    """:class:`WindowAttention` as a function: ``qkv [B, H, W, 3C]``, ``bias [3C]`` or None → ``[B, H // q, W // q,
    C]``. The op for these arguments is built once and kept (with its routes)."""
    key = (num_heads, window_size, q_stride, fused)
    try:
        op = _OPS.get(key)
    except TypeError:  # an unhashable argument: the op's checks say what is wrong with it
        op = None
    if op is None:
        op = _OPS[key] = WindowAttention(num_heads, window_size, q_stride, fused=fused)
    return op(qkv, bias)
