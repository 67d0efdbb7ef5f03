"""Backward of fused mask-unit attention with query max-pooling, read and written in Hiera's unrolled layout.

Contract (docs/DESIGN.md, "The kernel contract (Hiera)"; :func:`hiera_fast.ops.reference.mask_unit_attention_official`):
``qkv [B, N, 3C]``, channels ``(3, heads, head_dim)``, rows ``n = t * nw + w`` (``T = N // nw`` tokens per window,
``T_out = T // q_stride``). Pooled query ``r`` of window ``w`` is the max over ``j < q_stride`` of q row ``(j * T_out +
r) * nw + w``; output, ``grad_out`` and ``lse`` rows are ``r * nw + w``. With ``scale = head_dim ** -0.5`` the kernels
recompute

    P = exp(scale * Qp K^T - lse)      D = rowsum(dO * O)      dV = P^T dO      dP = dO V^T
    dS = P * (dP - D)                  dQp = scale * dS K      dK = scale * dS^T Qp

and route ``dQp`` through the max-pool per element (row ``r``, channel ``d``) to the candidate ``j`` that holds the
max; on ties the LOWEST ``j`` wins, and the first NaN candidate beats every number (what ``torch.max(dim).values``
backward does on CPU, checked in the tests; CUDA's ``torch.max`` does not document which index it picks); every
other candidate gets 0. ``d_qkv`` is written whole, in ``qkv``'s unrolled layout, so the qkv Linear's backward
consumes it as is.

Two variants, chosen by :func:`attention_backward_config` from the tile a window needs:

- ``window``: a window's keys fit one tile. One program per (head, pack of windows, batch) does everything in one
  pass; packing several small windows (4/16, 16/16 tokens) gives ``tl.dot`` tiles of >= 16 rows, with a
  block-diagonal mask so windows do not see each other. A program owns its rows: no atomics, deterministic.
- ``split`` (global attention, large windows): FlashAttention-2's split. ``_dq`` kernel per block of pooled queries
  loops over keys and also writes ``D = rowsum(dO * O)``; then the ``_dkdv`` kernel per key block loops over
  queries (recomputing the pooled queries). No atomics, deterministic.

Math in fp32 (float64 for float64 inputs, so ``gradcheck`` can run: checked under the interpreter; it compiles
for sm_80/sm_90, spill-free up to head dim 128). ``tl.dot`` takes the inputs' dtype: fp16/bf16 operands with P and
dS rounded to it (as FlashAttention does), fp32/fp64 operands in full ("ieee") precision. Head dims 1..256 are
padded to a power of two (>= 16) with masked loads. Batch offsets are 64-bit; offsets inside one batch element
are 32-bit (checked).

Memory traffic (window variant): qkv read once (plus a re-read of the q candidates when routing dQ, an L2 hit in
practice), dO, O and lse read once, d_qkv written once; no intermediate tensor. The split reads qkv and dO twice
(once per kernel) and the q candidates once per key block (L2), plus the ``D`` buffer ``[B, heads, N // s]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .unrolled_layout import (cached_config, cdiv, next_power_of_2, packed_window_token, pooled_query_row,
                              softmax_stats_dtype, token_row)

__all__ = ["mask_unit_attention_backward", "attention_backward_config", "attention_backward_plan", "KERNELS"]


# ---------------------------------------------------------------------------------------------- jitted helpers
@triton.jit
def _load_rows(X, stride_n, stride_c, rows, valid, cols, mask_c):
    """Tile ``X[rows, cols]`` of a ``[N, C]`` view with strides ``(stride_n, stride_c)``; zeros where masked."""
    return tl.load(X + rows[:, None] * stride_n + cols[None, :] * stride_c, mask=valid[:, None] & mask_c[None, :],
                   other=0.0)


@triton.jit
def _store_rows(X, stride_n, rows, valid, cols, mask_c, x):
    """Store ``x`` (cast to X's dtype) to ``X[rows, cols]`` of a ``[N, C]`` view with strides ``(stride_n, 1)``."""
    tl.store(X + rows[:, None] * stride_n + cols[None, :], x.to(X.dtype.element_ty),
             mask=valid[:, None] & mask_c[None, :])


@triton.jit
def _pooled_query(Q, stride_n, r, w, valid, d, mask_d, tokens_out, num_windows, q_stride):
    """Max over the ``q_stride`` candidates of pooled queries ``r`` of windows ``w`` → ``(q [M, D], arg [M, D])``.

    ``arg`` is the winning candidate per element: the first NaN if there is one (the forward's max propagates NaN),
    else the lowest ``j`` among equal maxima (strict ``>``). Padding is 0."""
    q = _load_rows(Q, stride_n, 1, pooled_query_row(r, 0, w, tokens_out, num_windows), valid, d, mask_d)
    arg = tl.zeros(q.shape, dtype=tl.int32)
    for j in range(1, q_stride):
        cand = _load_rows(Q, stride_n, 1, pooled_query_row(r, j, w, tokens_out, num_windows), valid, d, mask_d)
        better = (cand > q) | ((cand != cand) & (q == q))
        q = tl.where(better, cand, q)
        arg = tl.where(better, j, arg)
    return q, arg


@triton.jit
def _store_pooled_query_grad(DQ, stride_dq_n, Q, stride_q_n, dq, r, w, valid, d, mask_d, tokens_out, num_windows,
                             q_stride):
    """Write ``dq`` to the winning candidate of every element and 0 to the others: all ``q_stride`` rows.

    The winners are recomputed here (the candidates are re-read, from L2 in practice) rather than carried as an
    int tile through the whole kernel, which costs registers where they are scarcest."""
    _, arg = _pooled_query(Q, stride_q_n, r, w, valid, d, mask_d, tokens_out, num_windows, q_stride)
    dq = dq.to(DQ.dtype.element_ty)
    for j in range(0, q_stride):
        rows = pooled_query_row(r, j, w, tokens_out, num_windows)
        _store_rows(DQ, stride_dq_n, rows, valid, d, mask_d, tl.where(arg == j, dq, 0.0))


# ---------------------------------------------------------------------------------------------- window variant
@triton.jit
def _mask_unit_attn_bwd_window_kernel(
    DO, QKV, OUT, LSE, DQKV,
    stride_do_b, stride_do_n, stride_do_c,
    stride_qkv_b, stride_qkv_n,
    stride_o_b, stride_o_n, stride_o_c,
    stride_lse_b, stride_lse_h, stride_lse_n,
    stride_dqkv_b, stride_dqkv_n,
    num_windows, tokens_per_window, tokens_out, q_stride, windows_per_program, channels,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Whole backward of ``windows_per_program`` windows of one head, in one pass.

    Grid ``(heads, cdiv(nw, windows_per_program), B)``. Tile rows are packed windows: query row ``i`` is pooled
    query ``i % T_out`` of window ``w0 + i // T_out``, key row ``i`` is token ``i % T`` of window ``w0 + i // T``
    (``BLOCK_M >= windows_per_program * T_out``, ``BLOCK_N >= windows_per_program * T``); scores off the block
    diagonal are masked. Reads its windows' q (all candidates), k, v channels ``h * hd + d`` of each part of qkv
    once, and dO, O, lse of their output rows once; writes the same d_qkv elements, each once."""
    h = tl.program_id(0)
    w0 = tl.program_id(1) * windows_per_program
    b = tl.program_id(2).to(tl.int64)
    sm_scale = tl.full([], 1.0 / HEAD_DIM**0.5, ACC)  # compile-time constant, exact in fp64
    qkv = QKV + b * stride_qkv_b + h * HEAD_DIM
    dqkv = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    wm, r = packed_window_token(offs_m, tokens_out)
    wm += w0
    valid_m = (offs_m < windows_per_program * tokens_out) & (wm < num_windows)
    offs_n = tl.arange(0, BLOCK_N)
    wn, t = packed_window_token(offs_n, tokens_per_window)
    wn += w0
    valid_n = (offs_n < windows_per_program * tokens_per_window) & (wn < num_windows)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    kv_rows = token_row(t, wn, num_windows)
    out_rows = token_row(r, wm, num_windows)

    q, _ = _pooled_query(qkv, stride_qkv_n, r, wm, valid_m, d, mask_d, tokens_out, num_windows, q_stride)
    k = _load_rows(qkv + channels, stride_qkv_n, 1, kv_rows, valid_n, d, mask_d)
    v = _load_rows(qkv + 2 * channels, stride_qkv_n, 1, kv_rows, valid_n, d, mask_d)
    do = _load_rows(DO + b * stride_do_b, stride_do_n, stride_do_c, out_rows, valid_m, h * HEAD_DIM + d, mask_d)
    o = _load_rows(OUT + b * stride_o_b, stride_o_n, stride_o_c, out_rows, valid_m, h * HEAD_DIM + d, mask_d)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)  # D = rowsum(dO * O)
    do = do.to(q.dtype)
    lse = tl.load(LSE + b * stride_lse_b + h * stride_lse_h + out_rows * stride_lse_n, mask=valid_m, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC)  # [BLOCK_M, BLOCK_N]
    same = (wm[:, None] == wn[None, :]) & valid_m[:, None] & valid_n[None, :]
    p = tl.where(same, tl.exp(s * sm_scale - lse.to(ACC)[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=DOT_PRECISION)
    _store_rows(dqkv + 2 * channels, stride_dqkv_n, kv_rows, valid_n, d, mask_d, dv)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION) * sm_scale
    _store_rows(dqkv + channels, stride_dqkv_n, kv_rows, valid_n, d, mask_d, dk)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * sm_scale
    _store_pooled_query_grad(dqkv, stride_dqkv_n, qkv, stride_qkv_n, dq, r, wm, valid_m, d, mask_d, tokens_out,
                             num_windows, q_stride)


# ---------------------------------------------------------------------------------------------- split variant
@triton.jit
def _mask_unit_attn_bwd_dq_kernel(
    DO, QKV, OUT, LSE, DELTA, DQKV,
    stride_do_b, stride_do_n, stride_do_c,
    stride_qkv_b, stride_qkv_n,
    stride_o_b, stride_o_n, stride_o_c,
    stride_lse_b, stride_lse_h, stride_lse_n,
    stride_dqkv_b, stride_dqkv_n,
    num_heads, num_windows, tokens_per_window, tokens_out, q_stride, channels,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of ``BLOCK_M`` pooled queries of one (batch, window, head), looping over the window's keys.

    Grid ``(cdiv(T_out, BLOCK_M), heads * nw, B)``; program axis 1 is ``w * heads + h``. Also writes
    ``D = rowsum(dO * O)`` to ``DELTA [B, heads, N // q_stride]`` (contiguous, ACC dtype) for the dK/dV kernel.
    Writes the q part of d_qkv: all ``q_stride`` candidate rows of its queries (zeros where a candidate lost)."""
    h = tl.program_id(1) % num_heads
    w = tl.program_id(1) // num_heads
    b = tl.program_id(2).to(tl.int64)
    sm_scale = tl.full([], 1.0 / HEAD_DIM**0.5, ACC)  # compile-time constant, exact in fp64
    qkv = QKV + b * stride_qkv_b + h * HEAD_DIM
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = r < tokens_out
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    out_rows = token_row(r, w, num_windows)

    q, _ = _pooled_query(qkv, stride_qkv_n, r, w, valid_m, d, mask_d, tokens_out, num_windows, q_stride)
    do = _load_rows(DO + b * stride_do_b, stride_do_n, stride_do_c, out_rows, valid_m, h * HEAD_DIM + d, mask_d)
    o = _load_rows(OUT + b * stride_o_b, stride_o_n, stride_o_c, out_rows, valid_m, h * HEAD_DIM + d, mask_d)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    tl.store(DELTA + (b * num_heads + h) * (tokens_out * num_windows) + out_rows, delta, mask=valid_m)
    do = do.to(q.dtype)
    lse = tl.load(LSE + b * stride_lse_b + h * stride_lse_h + out_rows * stride_lse_n, mask=valid_m, other=0.0)
    lse = lse.to(ACC)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, tokens_per_window, BLOCK_N):
        t = start_n + tl.arange(0, BLOCK_N)
        valid_n = t < tokens_per_window
        k = _load_rows(qkv + channels, stride_qkv_n, 1, token_row(t, w, num_windows), valid_n, d, mask_d)
        v = _load_rows(qkv + 2 * channels, stride_qkv_n, 1, token_row(t, w, num_windows), valid_n, d, mask_d)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC)  # [BLOCK_M, BLOCK_N]
        p = tl.where(valid_m[:, None] & valid_n[None, :], tl.exp(s * sm_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION).to(ACC)

    _store_pooled_query_grad(DQKV + b * stride_dqkv_b + h * HEAD_DIM, stride_dqkv_n, qkv, stride_qkv_n,
                             dq * sm_scale, r, w, valid_m, d, mask_d, tokens_out, num_windows, q_stride)


@triton.jit
def _mask_unit_attn_bwd_dkdv_kernel(
    DO, QKV, LSE, DELTA, DQKV,
    stride_do_b, stride_do_n, stride_do_c,
    stride_qkv_b, stride_qkv_n,
    stride_lse_b, stride_lse_h, stride_lse_n,
    stride_dqkv_b, stride_dqkv_n,
    num_heads, num_windows, tokens_per_window, tokens_out, q_stride, channels,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV of ``BLOCK_N`` keys of one (batch, window, head), looping over the window's pooled queries.

    Grid ``(cdiv(T, BLOCK_N), heads * nw, B)``; program axis 1 is ``w * heads + h``. Works on the transposed
    scores ``S^T [BLOCK_N, BLOCK_M]`` so both accumulators are ``[BLOCK_N, BLOCK_D]``; recomputes the pooled
    queries (max over the candidates) per query block and reads the ``D`` the dQ kernel wrote. Writes the k and v
    parts of d_qkv for its key rows."""
    h = tl.program_id(1) % num_heads
    w = tl.program_id(1) // num_heads
    b = tl.program_id(2).to(tl.int64)
    sm_scale = tl.full([], 1.0 / HEAD_DIM**0.5, ACC)  # compile-time constant, exact in fp64
    qkv = QKV + b * stride_qkv_b + h * HEAD_DIM
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = t < tokens_per_window
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    kv_rows = token_row(t, w, num_windows)
    k = _load_rows(qkv + channels, stride_qkv_n, 1, kv_rows, valid_n, d, mask_d)
    v = _load_rows(qkv + 2 * channels, stride_qkv_n, 1, kv_rows, valid_n, d, mask_d)
    delta_head = DELTA + (b * num_heads + h) * (tokens_out * num_windows)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, tokens_out, BLOCK_M):
        r = start_m + tl.arange(0, BLOCK_M)
        valid_m = r < tokens_out
        out_rows = token_row(r, w, num_windows)
        q, _ = _pooled_query(qkv, stride_qkv_n, r, w, valid_m, d, mask_d, tokens_out, num_windows, q_stride)
        do = _load_rows(DO + b * stride_do_b, stride_do_n, stride_do_c, out_rows, valid_m, h * HEAD_DIM + d, mask_d)
        do = do.to(q.dtype)
        lse = tl.load(LSE + b * stride_lse_b + h * stride_lse_h + out_rows * stride_lse_n, mask=valid_m, other=0.0)
        delta = tl.load(delta_head + out_rows, mask=valid_m, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION).to(ACC)  # [BLOCK_N, BLOCK_M]
        pt = tl.where(valid_n[:, None] & valid_m[None, :], tl.exp(st * sm_scale - lse.to(ACC)[None, :]), 0.0)
        dv += tl.dot(pt.to(q.dtype), do, input_precision=DOT_PRECISION).to(ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(ACC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=DOT_PRECISION).to(ACC)

    dqkv = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    _store_rows(dqkv + channels, stride_dqkv_n, kv_rows, valid_n, d, mask_d, dk * sm_scale)
    _store_rows(dqkv + 2 * channels, stride_dqkv_n, kv_rows, valid_n, d, mask_d, dv)


KERNELS = {
    "window": _mask_unit_attn_bwd_window_kernel,
    "dq": _mask_unit_attn_bwd_dq_kernel,
    "dkdv": _mask_unit_attn_bwd_dkdv_kernel,
}


# ---------------------------------------------------------------------------------------------- configs + launcher
def attention_backward_config(head_dim: int, tokens_per_window: int, q_stride: int, num_windows: int,
                              dtype: torch.dtype) -> dict:
    """The variant and launch parameters for one geometry: a pure function of shape classes (no autotuning).

    Returns ``{"variant": "window" | "split", "windows_per_program": int, "launches": {kernel: {constexprs...,
    "num_warps", "num_stages"[, "maxnreg"]}}}``, kernels named as in :data:`KERNELS`, in launch order. The window
    variant while the packed keys fit one tile: 64 keys for fp16/bf16 up to head dim 128, 32 beyond; 16 for
    fp32/fp64 (64 for head dims <= 16: spill-free there, and far fewer programs under the interpreter). Windows are
    packed until the query tile has 16 rows (``tl.dot``'s minimum) and while the keys fit the tile (fp16/bf16: 4/16
    windows 4 per program, 16x64 scores; 16/16 windows 4 per program, 64x64). Otherwise the split. Tiles, warps and
    register budgets are the ones the compile lane shows spill-free on sm_80/sm_90 (fp64 spills beyond head dim 128).
    fp32 and fp64 dots run in IEEE precision (fp32 on FMA units: fp32-exact, slow; fp64 on DMMA)."""
    T, T_out = tokens_per_window, tokens_per_window // q_stride
    block_d = max(16, next_power_of_2(head_dim))
    wide = dtype in (torch.float32, torch.float64)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                  DOT_PRECISION="ieee")
    max_keys = (64 if block_d <= 16 else 16) if wide else (32 if block_d > 128 else 64)
    pack = max(cdiv(16, T_out), max_keys // T, 1)
    block_m, block_n = max(16, next_power_of_2(pack * T_out)), max(16, next_power_of_2(pack * T))
    if block_n <= max_keys:
        warps = 8 if block_m * block_d >= 64 * 64 or block_n * block_d >= 64 * 128 or wide else 4
        extra = dict(maxnreg=192) if dtype == torch.float32 else {}  # FMA dots: see the split below
        return {"variant": "window", "windows_per_program": pack, "launches": {"window": dict(
            common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=1, **extra)}}
    extra = {}
    if wide:
        dq = dkdv = (16, 16)
        warps = 8
        if dtype == torch.float32:  # FMA dots: ptxas caps itself near 64 registers and spills unless given a budget
            extra = {"maxnreg": 128 if block_d <= 128 else 192}
    elif block_d > 128:
        dq, dkdv, warps = (32, 16), (32, 16), 8
    else:
        dq, dkdv, warps = (64, 32) if block_d <= 64 else (64, 64), (32, 64), 4 if block_d <= 64 else 8
    return {"variant": "split", "windows_per_program": 1, "launches": {
        "dq": dict(common, BLOCK_M=dq[0], BLOCK_N=dq[1], num_warps=warps, num_stages=2, **extra),
        "dkdv": dict(common, BLOCK_M=dkdv[0], BLOCK_N=dkdv[1], num_warps=warps, num_stages=2, **extra)}}


def attention_backward_plan(grad_out, qkv, out, lse, d_qkv, num_heads: int, q_stride: int, num_windows: int):
    """``[(kernel name, grid, args, launch kwargs)]`` that :func:`mask_unit_attention_backward` launches, in order.

    Split from the launcher so the compile-lane test builds the exact argument list (and so the JIT's
    specialisations) from meta tensors. Allocates the small ``D`` buffer of the split variant."""
    B, N, three_c = qkv.shape
    C, T = three_c // 3, N // num_windows
    head_dim, T_out = C // num_heads, T // q_stride
    cfg = cached_config(attention_backward_config, head_dim, T, q_stride, num_windows, qkv.dtype)  # read-only
    strides = (*grad_out.stride(), *qkv.stride()[:2])
    o_lse, dq_strides = (*out.stride(), *lse.stride()), d_qkv.stride()[:2]
    geometry = (num_windows, T, T_out, q_stride)
    launch = cfg["launches"]
    if cfg["variant"] == "window":
        pack = cfg["windows_per_program"]
        args = (grad_out, qkv, out, lse, d_qkv, *strides, *o_lse, *dq_strides, *geometry, pack, C)
        return [("window", (num_heads, cdiv(num_windows, pack), B), args, launch["window"])]
    delta = torch.empty(lse.shape, dtype=softmax_stats_dtype(qkv.dtype), device=qkv.device)
    dq_args = (grad_out, qkv, out, lse, delta, d_qkv, *strides, *o_lse, *dq_strides, num_heads, *geometry, C)
    dkdv_args = (grad_out, qkv, lse, delta, d_qkv, *strides, *lse.stride(), *dq_strides, num_heads, *geometry, C)
    return [("dq", (cdiv(T_out, launch["dq"]["BLOCK_M"]), num_heads * num_windows, B), dq_args, launch["dq"]),
            ("dkdv", (cdiv(T, launch["dkdv"]["BLOCK_N"]), num_heads * num_windows, B), dkdv_args,
             launch["dkdv"])]


def mask_unit_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 num_heads: int, q_stride: int, num_windows: int,
                                 d_qkv: torch.Tensor | None = None) -> torch.Tensor:
    """``d_qkv [B, N, 3C]`` (contiguous, qkv's dtype, unrolled layout) of fused mask-unit attention.

    ``grad_out``/``out [B, N // s, C]``: any strides (a stride-0 expand included). ``qkv [B, N, 3C]``: unit channel
    stride, other strides arbitrary; fp16, bf16, fp32 or fp64. ``lse [B, heads, N // s]``: natural log, of the
    scaled pooled-query scores, fp32 (fp64 for fp64 qkv). ``d_qkv``: optional output (contiguous, qkv's shape and
    dtype); every element is written. Max-pool ties: the lowest candidate ``j`` gets the gradient. Deterministic
    (no atomics)."""
    B, N, three_c = qkv.shape
    T, H = N // num_windows, num_heads
    assert qkv.stride(-1) == 1 and T * num_windows == N and T % q_stride == 0 and three_c % (3 * H) == 0
    assert three_c // (3 * H) <= 256, "head_dim > 256 is not supported"
    assert grad_out.shape == out.shape == (B, N // q_stride, three_c // 3) and lse.shape == (B, H, N // q_stride)
    for t in (qkv, grad_out, out, lse):  # batch offsets are 64-bit, offsets inside a batch element 32-bit
        assert sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) < 2**31 and N * three_c < 2**31
    assert B < 65536 and H * num_windows < 65536, "grid limits"
    d_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if d_qkv is None else d_qkv
    assert d_qkv.shape == qkv.shape and d_qkv.dtype == qkv.dtype and d_qkv.is_contiguous()
    if qkv.numel() == 0:
        return d_qkv
    for name, grid, args, launch in attention_backward_plan(grad_out, qkv, out, lse, d_qkv, H, q_stride, num_windows):
        KERNELS[name][grid](*args, **launch)
    return d_qkv
