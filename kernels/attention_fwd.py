"""Forward of Hiera's mask-unit attention with the query max-pool fused in, read straight from the qkv GEMM output.

Contract (docs/DESIGN.md, "The kernel contract (Hiera)"; ``hiera_fast.ops.reference.mask_unit_attention_official``):
``qkv`` is ``[B, N, 3 * C]`` with channels ``(3, heads, head_dim)`` and tokens in the unrolled order ``n = t * nw + w``;
window ``w`` holds ``T = N // nw`` tokens, ``T_out = T // s`` pooled queries. For each (batch, head, window):

    q[r]   = max_{j < s} qkv[(j * T_out + r) * nw + w, h * hd : (h + 1) * hd]          (query max-pool)
    out[r] = softmax_t(q[r] . k[t] / sqrt(hd)) @ v[t],  k[t], v[t] from row t * nw + w  (attention in the window)

stored at ``out[b, r * nw + w, h * hd + d]``. ``num_windows == 1`` is global attention.

One kernel serves every geometry. A program owns one (batch, head) and a *pack* of ``windows_per_program``
consecutive windows; its packed query index ``i`` means (window ``i // T_out`` of the pack, pooled query
``i % T_out``) and its packed key index ``j`` means (window ``j // T``, token ``j % T``). A query row only
sees keys of its own window (block-diagonal mask, ``PACKED``). Queries are tiled by ``BLOCK_M`` (grid axis),
keys by ``BLOCK_N`` in a flash-style online-softmax loop that visits only the key range of the windows the
query tile touches. Small windows (4/16, 16/16 at 224²) are packed so ``tl.dot`` gets >= 16 rows; a tile whose
keys fit one block (every windowed geometry of the model zoo in fp16/bf16) runs without a loop and issues all its
loads at once; global attention (196, 1568 tokens) loops. Configs: ``attention_forward_config``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .unrolled_layout import (cached_config, cdiv, next_power_of_2, packed_window_token, pooled_query_row,
                              softmax_stats_dtype, token_row)


@triton.jit
def _load_rows(base, rows, row_ok, stride_n, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``[len(rows), BLOCK_D]`` tile of ``base[row * stride_n + d]``; zero past ``HEAD_DIM`` and on masked rows."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as ``torch.max`` does (bf16 is computed in fp32 by Triton: cast back, exact)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL).to(a.dtype)


@triton.jit
def _load_kv_block(qkv_bh, start, hi, w0, T, num_windows, stride_n, C,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PACKED: tl.constexpr):
    """K and V of packed key indices ``j = start + [0, BLOCK_N)``: window ``j // T`` of the pack, token ``j % T``."""
    j = start + tl.arange(0, BLOCK_N)
    if PACKED:
        k_win, t = packed_window_token(j, T)
    else:
        k_win = tl.zeros_like(j)
        t = j
    col_ok = j < hi
    rows = token_row(t, w0 + k_win, num_windows).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_t = (d < HEAD_DIM)[:, None] & col_ok[None, :]
    k_t = tl.load(qkv_bh + C + d[:, None] + rows[None, :] * stride_n, mask=mask_t, other=0.0)  # K^T [D, N]
    v = _load_rows(qkv_bh + 2 * C, rows, col_ok, stride_n, BLOCK_D, HEAD_DIM)
    return k_t, v, k_win, col_ok


@triton.jit
def _online_softmax_step(q, k_t, v, q_win, k_win, col_ok, m_i, l_i, acc, qk_scale,
                         PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One flash step: scores in log2 units, rescale the running (max, sum, acc) and add ``P @ V``."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=acc.dtype) * qk_scale  # [M, N]
    ok = col_ok[None, :]
    if PACKED:
        ok = ok & (q_win[:, None] == k_win[None, :])  # block-diagonal: a query sees its own window only
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no key yet (all -inf: a packed row's block of other windows) subtracts 0: p = alpha = 0,
    # not NaN; any finite score, however negative, is its own reference, so no score range is lost
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    # out_dtype = the accumulator's (fp64 for fp64): triton 3.6 requires it to match acc's dtype
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return m_new, l_i, acc


@triton.jit
def _mask_unit_attn_fwd_kernel(
    QKV, Out, Lse,
    stride_qkv_b, stride_qkv_n,
    num_heads, num_windows, tokens_per_window, windows_per_program, num_q_blocks,
    HEAD_DIM: tl.constexpr, Q_STRIDE: tl.constexpr, Q_CANDIDATES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, ONE_KV_BLOCK: tl.constexpr, STORE_LSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(num_heads * num_q_blocks * num_packs, B)``, head fastest so neighbouring programs share qkv rows.

    Reads ``QKV[b, n, c]`` at ``b * stride_qkv_b + n * stride_qkv_n + c`` (channel stride 1), each element of the
    program's windows once. Writes ``Out [B, N_out, C]`` contiguous and, with ``STORE_LSE``, ``Lse [B, H, N_out]``
    (natural log; fp32, fp64 for fp64 inputs). Scores are scaled by ``HEAD_DIM**-0.5 * log2(e)``, a compile-time
    constant (exact in fp64).
    Accumulates in ``ACC_DTYPE`` (fp32; fp64 for fp64 inputs); P is cast to the input dtype for the PV dot.
    ``ONE_KV_BLOCK``: every key of the tile's windows fits one ``BLOCK_N`` block (windowed attention): K/V and all
    query candidates are loaded up front, no loop.
    """
    pid = tl.program_id(0)
    h = pid % num_heads
    qb = (pid // num_heads) % num_q_blocks
    w0 = pid // num_heads // num_q_blocks * windows_per_program
    b = tl.program_id(1).to(tl.int64)
    T = tokens_per_window
    T_out = T // Q_STRIDE
    C = num_heads * HEAD_DIM
    n_rows = tl.minimum(windows_per_program, num_windows - w0) * T_out  # valid packed query rows
    qkv_bh = QKV + b * stride_qkv_b + h * HEAD_DIM
    qk_scale = tl.full([], 1.4426950408889634 / HEAD_DIM**0.5, ACC_DTYPE)  # log2(e) / sqrt(head_dim), exact in fp64

    # packed key range [lo, hi) of the windows this query tile touches
    i_lo = qb * BLOCK_M
    lo = i_lo // T_out * T
    hi = ((tl.minimum(i_lo + BLOCK_M, n_rows) - 1) // T_out + 1) * T
    if ONE_KV_BLOCK:
        k_t, v, k_win, col_ok = _load_kv_block(qkv_bh, lo, hi, w0, T, num_windows, stride_qkv_n, C,
                                             BLOCK_N, BLOCK_D, HEAD_DIM, PACKED)

    # pooled queries: one [Q_CANDIDATES, BLOCK_M, BLOCK_D] load of all candidates, max over the first axis (exact);
    # Q_CANDIDATES is Q_STRIDE rounded up to a power of two (tl.arange's rule), the extra slots repeat the last one
    i = i_lo + tl.arange(0, BLOCK_M)
    if PACKED:
        q_win, r = packed_window_token(i, T_out)
    else:
        q_win = tl.zeros_like(i)
        r = i
    row_ok = i < n_rows
    if Q_CANDIDATES == Q_STRIDE:
        cand = tl.arange(0, Q_CANDIDATES)[:, None]
    else:
        cand = tl.minimum(tl.arange(0, Q_CANDIDATES), Q_STRIDE - 1)[:, None]
    q_rows = pooled_query_row(r[None, :], cand, w0 + q_win[None, :], T_out, num_windows).to(tl.int64)  # [S, M]
    d3 = tl.arange(0, BLOCK_D)[None, None, :]
    q_mask = row_ok[None, :, None] & (d3 < HEAD_DIM)  # broadcast over the candidates
    q = tl.reduce(tl.load(qkv_bh + q_rows[:, :, None] * stride_qkv_n + d3, mask=q_mask, other=0.0), 0, _max_nan)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    if ONE_KV_BLOCK:
        m_i, l_i, acc = _online_softmax_step(q, k_t, v, q_win, k_win, col_ok, m_i, l_i, acc, qk_scale,
                                             PACKED, DOT_PRECISION)
    else:
        for start in range(lo, hi, BLOCK_N):
            k_t, v, k_win, col_ok = _load_kv_block(qkv_bh, start, hi, w0, T, num_windows, stride_qkv_n, C,
                                                 BLOCK_N, BLOCK_D, HEAD_DIM, PACKED)
            m_i, l_i, acc = _online_softmax_step(q, k_t, v, q_win, k_win, col_ok, m_i, l_i, acc, qk_scale,
                                                 PACKED, DOT_PRECISION)

    # normalise; store at output row r * nw + w
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out_rows = token_row(r, w0 + q_win, num_windows).to(tl.int64)
    n_out = num_windows * T_out
    d = tl.arange(0, BLOCK_D)
    out_ptrs = Out + (b * n_out + out_rows)[:, None] * C + h * HEAD_DIM + d[None, :]
    tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 units -> natural log
        tl.store(Lse + (b * num_heads + h) * n_out + out_rows, lse.to(Lse.dtype.element_ty), mask=row_ok)


def attention_forward_config(head_dim: int, tokens_per_window: int, q_stride: int, num_windows: int,
                             dtype: torch.dtype) -> dict:
    """The launch configuration: the kernel's constexprs plus ``windows_per_program``, ``num_warps``, ``num_stages``.

    A pure function of shape classes (no autotuning: no per-shape recompiles, the same choice under the interpreter).
    fp16/bf16: windows of <= 64 keys are packed until the query tile has 16 rows (``tl.dot``'s minimum), and further
    while the packed keys fit one 64-key block, so no query row does more score work than a stage-1 row (packing
    computes the off-diagonal blocks; the kernel is memory-bound: docs/DESIGN.md, "Performance model"); all loads of
    such a tile are issued at once (``ONE_KV_BLOCK``). Larger windows and global attention run the flash loop over
    64-query tiles (128 for long, compute-bound sequences such as video's 1568-token stage 3) and 64-key blocks (32 for
    head dims > 64). fp32 (3xTF32 dots, fp32-accurate on tensor cores) and fp64 (IEEE, fp64 accumulation) use 16x16
    tiles and 8 warps, the spill-free choice up to head dim 256, and the fp16 tiling (64) for head dims <= 16, where it
    is spill-free too (fewer, fuller programs: what keeps the interpreter lane's tiny models fast). Warps and block
    sizes were picked from the compile lane's register / spill table (tests/test_kernels_compile.py), not from timings.
    """
    T, T_out = tokens_per_window, tokens_per_window // q_stride
    block_d = max(16, next_power_of_2(head_dim))
    wide = dtype in (torch.float32, torch.float64)
    tile = (64 if block_d <= 16 else 16) if wide else 64
    if T <= tile:  # windowed: pack small windows
        wp = max(1, min(num_windows, max(cdiv(16, T_out), tile // T)))
        block_m = min(tile, max(16, next_power_of_2(wp * T_out)))
        block_n = min(tile, max(16, next_power_of_2(wp * T)))
    else:  # one window per program, flash loop
        wp = 1
        long_seq = T_out >= 512 and block_d <= 128 and not wide
        block_m = 128 if long_seq else min(tile, max(16, next_power_of_2(T_out)))
        block_n = tile
    one_kv_block = wp * T <= block_n
    if not (one_kv_block or wide) and block_d > 64:
        block_n = 32  # K and V are double-buffered in the loop: keep registers and shared memory in bounds
    big = block_m * block_d >= (64 * 128 if one_kv_block else 64 * 64)
    return {
        "HEAD_DIM": head_dim, "Q_STRIDE": q_stride, "Q_CANDIDATES": next_power_of_2(q_stride),
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
        "PACKED": wp > 1, "ONE_KV_BLOCK": one_kv_block,
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        "DOT_PRECISION": {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32"),
        "windows_per_program": wp,
        "num_warps": 8 if wide or big or block_d == 256 else 4,
        "num_stages": 1 if one_kv_block else 2,
    }


def _launch_config(head_dim: int, tokens_per_window: int, q_stride: int, num_windows: int, dtype: torch.dtype):
    """(constexprs, windows_per_program, num_warps, num_stages) of :func:`attention_forward_config`."""
    cfg = attention_forward_config(head_dim, tokens_per_window, q_stride, num_windows, dtype)
    return cfg, cfg.pop("windows_per_program"), cfg.pop("num_warps"), cfg.pop("num_stages")


def mask_unit_attention_forward(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int, *,
                                return_lse: bool = False, out: torch.Tensor | None = None,
                                lse_out: torch.Tensor | None = None):
    """qkv ``[B, N, 3 * C]`` (channels ``(3, heads, head_dim)``, rows ``t * nw + w``, last stride 1, other strides
    arbitrary) → out ``[B, N // q_stride, C]`` contiguous in qkv's dtype, row ``r * nw + w``, channel
    ``h * head_dim + d``; ``num_windows == 1`` is global attention. With ``return_lse`` also returns
    ``lse [B, heads, N // q_stride]`` fp32 (fp64 for fp64 qkv), the natural-log log-sum-exp of
    ``(q_pooled . k) * head_dim**-0.5``.

    Shapes are assumed validated by the ops layer. Dtypes fp16 / bf16 / fp32, and fp64 with fp64 math throughout
    (tested in the interpreter; compiles spill-free for sm_80/90, where ``tl.dot`` emits fp64 ``mma.sync``).
    ``out`` / ``lse_out`` let a caller supply (e.g. NaN-poisoned) contiguous buffers of the right shape.
    Grid and memory layout: see ``_mask_unit_attn_fwd_kernel``.
    """
    assert qkv.stride(-1) == 1, "qkv channels must be contiguous"
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim, T = C // num_heads, N // num_windows
    n_out = N // q_stride
    cfg, wp, num_warps, num_stages = cached_config(_launch_config, head_dim, T, q_stride, num_windows, qkv.dtype)
    out = torch.empty(B, n_out, C, device=qkv.device, dtype=qkv.dtype) if out is None else out
    shape = (B, num_heads, n_out) if return_lse else (1,)
    lse = torch.empty(shape, device=qkv.device, dtype=softmax_stats_dtype(qkv.dtype)) if lse_out is None else lse_out
    if out.numel() == 0:  # an empty batch: nothing to launch (CUDA rejects a grid axis of 0)
        return (out, lse) if return_lse else out
    num_q_blocks = cdiv(wp * (T // q_stride), cfg["BLOCK_M"])
    grid = (num_heads * num_q_blocks * cdiv(num_windows, wp), B)
    _mask_unit_attn_fwd_kernel[grid](
        qkv, out, lse, qkv.stride(0), qkv.stride(1),
        num_heads, num_windows, T, wp, num_q_blocks,
        STORE_LSE=return_lse, num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return (out, lse) if return_lse else out


__all__ = ["attention_forward_config", "mask_unit_attention_forward"]
