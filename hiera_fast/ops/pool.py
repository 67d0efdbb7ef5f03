"""The pooled residual ``x.view(B, s, N // s, C).max(1).values`` (unrolled max-pool), fused=True or not.

The gradient goes to the winning candidate; among equal maxima the first (lowest index), as ``torch.max``; the first
NaN wins over every number (the forward propagates NaN).
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from . import reference, routing
from .checks import check_flag, check_pool_input


def _device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: run on the tensor's own."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read any batch/row strides but need a unit stride on the channel dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------- kernel bodies
def _pool_forward_kernel(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``[B, N, C]`` → ``[B, N // stride, C]`` by the Triton kernel (counted)."""
    routing.count("unrolled_max_pool_fwd")
    with _device_guard(x.device):
        return routing.max_pool.unrolled_max_pool_forward(unit_last_stride(x), stride)


def _pool_backward_kernel(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    routing.count("unrolled_max_pool_bwd")
    with _device_guard(x.device):
        return routing.max_pool.unrolled_max_pool_backward(grad_out, unit_last_stride(x), stride)


_pool_fwd = torch.library.custom_op("hiera_fast::unrolled_max_pool_fwd", mutates_args=())(_pool_forward_kernel)
_pool_bwd = torch.library.custom_op("hiera_fast::unrolled_max_pool_bwd", mutates_args=())(_pool_backward_kernel)


@_pool_fwd.register_fake
def _pool_fwd_fake(x, stride):
    return x.new_empty(x.shape[0], x.shape[1] // stride, x.shape[2])


@_pool_bwd.register_fake
def _pool_bwd_fake(grad_out, x, stride):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _forward(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The kernel body directly in plain eager mode (no dispatcher cost), the custom op under tracing."""
    return _pool_forward_kernel(x, stride) if routing.plain_eager(x) else _pool_fwd(x, stride)


def _backward(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    return _pool_backward_kernel(grad_out, x, stride) if routing.plain_eager(x) else _pool_bwd(grad_out, x, stride)


class _PoolFunction(torch.autograd.Function):
    """The fused max-pool's autograd, in eager mode, under ``torch.compile``, export and fake tensors alike. No
    double backward (``once_differentiable``)."""

    @staticmethod
    def forward(ctx, x, stride):
        ctx.save_for_backward(x)
        ctx.stride = stride
        return _forward(x, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return _backward(grad_out, x, ctx.stride), None


# ---------------------------------------------------------------------------------------------- the op
def unrolled_max_pool(x: torch.Tensor, stride: int, fused: bool = False) -> torch.Tensor:
    """Max-pool over the leading unroll level: ``[B, N, C]`` → ``[B, N // stride, C]`` (the pooled residual).

    Equal to ``x.view(B, stride, N // stride, C).max(1).values``; the gradient goes to the winning element.
    ``fused=True`` runs the Triton kernels where :func:`hiera_fast.ops.routing.pool_route` allows, else the reference
    with a warning."""
    check_pool_input(x, stride)
    if not check_flag("fused", fused) or stride == 1:
        return reference.unrolled_max_pool_eager(x, stride)
    route = routing.cached_pool_route(x.device, x.dtype)
    reason = route.reason if route.kind == "eager" else routing.call_limit(x)
    if reason is None and routing.under_torch_func():
        reason = "a torch.func transform (grad, vmap, jvp, ...) is active; the fused ops have no rules for them"
    if reason is not None:
        routing.warn_eager_once("unrolled_max_pool", reason)
        return reference.unrolled_max_pool_eager(x, stride)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PoolFunction.apply(x, stride)
    return _forward(x, stride)
