"""Hiera's unrolled max-pool ``x.view(B, s, N // s, C).max(1).values`` and its backward (docs/DESIGN.md, "The unrolled
layout").

In the unrolled layout a 2x2 (or 2x2x2) pool of the finest level is a max over the leading index: candidate ``j`` of
output row ``m`` is input row ``j * (N // s) + m`` (``pooled_query_row`` with one window of ``N // s`` tokens).

Tie rule (backward): the gradient of ``out[b, m, c]`` goes to exactly one candidate, the first NaN if there is one,
otherwise the **lowest j** holding the maximum; the other candidates get 0. On tie-free data this is the gradient
of the eager reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .unrolled_layout import cdiv, next_power_of_2, pooled_query_row


@triton.jit
def _unrolled_max_pool_fwd_kernel(
    X, Out,
    stride_x_b, stride_x_n, rows_out, channels,
    STRIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``Out[b, m, c] = max_{j < STRIDE} X[b, j * rows_out + m, c]`` (NaN propagates, as in torch).

    Grid ``(cdiv(rows_out, BLOCK_R), cdiv(channels, BLOCK_C), B)``. ``X`` read through ``(stride_x_b, stride_x_n)``
    with channel stride 1; ``Out [B, rows_out, channels]`` contiguous. All candidates' loads are issued together.
    """
    m = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask = (m < rows_out)[:, None] & (c < channels)[None, :]
    x_b = X + b * stride_x_b + c[None, :]
    best = tl.load(x_b + pooled_query_row(m, 0, 0, rows_out, 1).to(tl.int64)[:, None] * stride_x_n, mask=mask)
    for j in tl.static_range(1, STRIDE):
        x_j = tl.load(x_b + pooled_query_row(m, j, 0, rows_out, 1).to(tl.int64)[:, None] * stride_x_n, mask=mask)
        best = tl.maximum(best, x_j, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Out + (b * rows_out + m)[:, None] * channels + c[None, :], best, mask=mask)


@triton.jit
def _unrolled_max_pool_bwd_kernel(
    X, GradOut, GradX,
    stride_x_b, stride_x_n, stride_g_b, stride_g_n, stride_g_c, rows_out, channels,
    STRIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GRAD_C_CONTIGUOUS: tl.constexpr,
):
    """``GradX[b, j * rows_out + m, c] = GradOut[b, m, c]`` if ``j`` is the winner of ``max_j X[b, j*rows_out+m, c]``
    (first NaN, else lowest ``j`` among equal maxima), else 0.

    Grid as the forward. ``X`` read as in the forward; ``GradOut`` through all three strides (autograd hands
    stride-0 expanded grads; ``GRAD_C_CONTIGUOUS`` keeps the vectorised path when its channel stride is 1);
    ``GradX [B, STRIDE * rows_out, channels]`` contiguous, every element written once.
    """
    m = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    mask = (m < rows_out)[:, None] & (c < channels)[None, :]
    x_b = X + b * stride_x_b + c[None, :]
    best = tl.load(x_b + pooled_query_row(m, 0, 0, rows_out, 1).to(tl.int64)[:, None] * stride_x_n, mask=mask)
    arg = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for j in tl.static_range(1, STRIDE):
        x_j = tl.load(x_b + pooled_query_row(m, j, 0, rows_out, 1).to(tl.int64)[:, None] * stride_x_n, mask=mask)
        wins = (x_j > best) | ((x_j != x_j) & (best == best))  # strict: an equal later candidate never wins
        best = tl.where(wins, x_j, best)
        arg = tl.where(wins, j, arg)
    g_c = c[None, :] if GRAD_C_CONTIGUOUS else c[None, :].to(tl.int64) * stride_g_c
    g = tl.load(GradOut + b * stride_g_b + m.to(tl.int64)[:, None] * stride_g_n + g_c, mask=mask)
    n_in = STRIDE * rows_out
    for j in tl.static_range(STRIDE):
        rows = pooled_query_row(m, j, 0, rows_out, 1).to(tl.int64)
        tl.store(GradX + (b * n_in + rows)[:, None] * channels + c[None, :], tl.where(arg == j, g, 0.0), mask=mask)


def max_pool_config(channels: int, stride: int) -> dict:
    """Tile: up to 128 channels (vectorised along C) and up to 4096 loaded elements per program over all candidates
    (rows: a power of two, ``tl.arange``'s rule; any stride)."""
    block_c = min(128, max(16, next_power_of_2(channels)))
    rows = max(1, 4096 // (block_c * stride))
    return {"STRIDE": stride, "BLOCK_C": block_c, "BLOCK_R": 1 << (rows.bit_length() - 1), "num_warps": 4}


def max_pool_variants() -> list[dict]:
    """Every (constexpr, dtype) combination the launchers pick for the compile lane: strides 1/2/4/8 (and 3, not a
    power of two), channel tiles 16..128, contiguous and strided grads."""
    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for stride in (1, 2, 3, 4, 8) if dtype == torch.float16 else (4,):
            for channels in (96, 24) if dtype == torch.float16 else (96,):
                for contiguous in (True, False):
                    out.append({**max_pool_config(channels, stride), "GRAD_C_CONTIGUOUS": contiguous, "dtype": dtype})
    return out


def _launch_shape(x: torch.Tensor, stride: int):
    x = x if x.stride(-1) == 1 else x.contiguous()
    B, N, C = x.shape
    cfg = max_pool_config(C, stride)
    num_warps = cfg.pop("num_warps")
    grid = (cdiv(N // stride, cfg["BLOCK_R"]), cdiv(C, cfg["BLOCK_C"]), B)
    return x, cfg, num_warps, grid


def unrolled_max_pool_forward(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``[B, N, C]`` (channel stride 1 or copied; other strides arbitrary) → ``[B, N // stride, C]`` contiguous."""
    x, cfg, num_warps, grid = _launch_shape(x, stride)
    B, N, C = x.shape
    out = torch.empty(B, N // stride, C, device=x.device, dtype=x.dtype)
    if out.numel() == 0:  # nothing to launch (CUDA rejects a grid axis of 0)
        return out
    _unrolled_max_pool_fwd_kernel[grid](x, out, x.stride(0), x.stride(1), N // stride, C, num_warps=num_warps, **cfg)
    return out


def unrolled_max_pool_backward(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """grad_out ``[B, N // stride, C]`` (any strides, stride 0 included) and the forward's input ``x`` → grad_x
    ``[B, N, C]`` contiguous in x's dtype; the tie rule is in the module docstring."""
    x, cfg, num_warps, grid = _launch_shape(x, stride)
    B, N, C = x.shape
    grad_x = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if grad_x.numel() == 0:
        return grad_x
    _unrolled_max_pool_bwd_kernel[grid](
        x, grad_out, grad_x, x.stride(0), x.stride(1), *grad_out.stride(), N // stride, C,
        GRAD_C_CONTIGUOUS=grad_out.stride(2) == 1, num_warps=num_warps, **cfg,
    )
    return grad_x


__all__ = ["max_pool_config", "max_pool_variants", "unrolled_max_pool_backward", "unrolled_max_pool_forward"]
