"""SAM 2's windowed attention fused with its window partition, query max-pool and unpartition, on the BHWC map.

Contract (docs/DESIGN.md, "The kernel contract (SAM 2's hieradet)"; the spec:
:func:`hiera_fast.ops.reference.window_attention_bhwc_reference`). ``qkv [B, H, W, 3C]`` is the qkv Linear applied
to the *unpadded* map (channels ``(3, heads, head_dim)``, unit channel stride, any other
strides); ``bias [3C]`` is that Linear's bias (None: zeros). The official block zero-pads the map to
``Hp x Wp = ceil(H / ws) * ws x ceil(W / ws) * ws`` before the Linear, so a padded token's q, k, v are exactly the
bias; here a position with ``row >= H`` or ``col >= W`` reads as the bias. Per (batch, head, window) of the padded
grid (index math: :mod:`.bhwc_windows`), with ``wo = ws // q`` and ``scale = head_dim ** -0.5``:

    q[r]   = max over the q x q candidates of pooled query r (q = 1: the token itself; NaN propagates, as torch)
    out[r] = softmax_t(scale * q[r] . k[t]) @ v[t]      over all ws * ws tokens t of the window, padding included

stored at output position ``(wi * wo + r // wo, wj * wo + r % wo)`` of ``out [B, H // q, W // q, C]``
(contiguous), channels ``h * head_dim + d``; positions past the output are not written (the crop). ``lse
[B, heads, H // q, W // q]`` (natural log, fp32; fp64 for fp64) is the forward's log-sum-exp for the backward.
Inputs: ``q`` 1 or 2, ``ws >= q``, head dims up to 256 (padded to a power of two >= 16, masked), fp16 / bf16 / fp32
/ fp64; the bias is used in qkv's dtype (what the Linear writes into a padded row). Only geometries the official
code runs are accepted: per side ``ceil(n / ws) == ceil((n // q) / wo)`` (else ``ValueError``;
:func:`.bhwc_windows.check_window_geometry`). Finite inputs only for exactness across windows: a NaN / Inf in one
window of a *pack* also reaches the pack's other windows (``0 * NaN`` in the block-diagonal dots); one-window
programs keep it inside its window, as the official code does.

Backward (:func:`window_attention_backward`): ``d_qkv [B, H, W, 3C]`` for the real tokens (every element written;
tokens that are no pooled query's candidate get 0) and ``d_bias [3C]`` (fp32; fp64 for fp64) = the sum of the
gradients of every padded token's q, k and v. A pooled query's gradient goes per element to one candidate, the
rule of ``F.max_pool2d``'s CPU backward (checked in tests/test_kernels_windows.py): the lowest candidate index among
equal maxima, but the *last* NaN candidate if there is one (its update rule is ``v > max or isnan(v)``); padded
queries at a block that does not pool produce cropped outputs, so they get no gradient. Deterministic: no atomics;
``d_bias`` is reduced from per-program partial sums by ``torch.sum``.

Grids (configs: :func:`window_attention_forward_config`, :func:`window_attention_backward_config`):

- forward: ``(heads * q_blocks * packs, B)``, head fastest. A program owns one head of a *pack* of
  ``windows_per_program`` consecutive windows; packed query ``i`` is (window ``i // T_out``, pooled query
  ``i % T_out``), packed key ``j`` is (window ``j // T``, token ``j % T``), a block-diagonal mask keeps windows
  apart. 4x4 windows are packed 4 a program (64 queries, or 16 pooled ones, so ``tl.dot`` gets >= 16 rows), 8x8 and
  7x7 windows fill a 64-key tile alone, all keys in one tile (``ONE_KV_BLOCK``); big windows (14x14 = 196, 16x16 =
  256 tokens) run one window per program with query tiles on the grid and a flash-style online-softmax loop over
  key blocks.
- backward ``window``: ``(heads, packs, B)``, a pack's whole backward in one pass while its keys fit one tile;
  ``d_bias`` partials ``[B, packs, 3C]``. ``split`` (big windows): a dQ kernel ``(q_blocks, heads * windows, B)``
  that also writes ``D = rowsum(dO * O)`` (``[B, heads, windows, T_out]``), then a dK/dV kernel
  ``(k_blocks, heads * windows, B)`` looping over the pooled queries; ``d_bias`` partials ``[B, windows * q_blocks,
  C]`` and ``[B, windows * k_blocks, 2C]``. Partials are only kept (``HAS_PAD``) where the map has padding.

Memory: qkv is read once per program (the q candidates, k and v of its windows; the split re-reads them per
block), out / grad_out / lse once, d_qkv written once; 64-bit batch offsets, 32-bit offsets inside one batch element
(checked). Math in fp32 (fp64 for fp64): softmax in exp2 with the scale folded in, P (and dS) rounded to the input
dtype for their dots; fp32 dots are 3xTF32 in the forward (as ``attention_fwd``) and IEEE in the backward (as
``attention_bwd``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bhwc_windows import (check_window_geometry, is_padding, output_position, outside_pool, packed_index,
                           pooled_candidate, window_grid, window_token)
from .unrolled_layout import cached_config, cdiv, next_power_of_2, softmax_stats_dtype

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code may read it


# ---------------------------------------------------------------------------------------------- jitted helpers
@triton.jit
def _load_tokens(base, bias, row, col, ok, height, width, stride_h, stride_w,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``[len(row), BLOCK_D]`` tile of one head's channels at map positions (row, col): the map's value, or the bias
    (zeros without ``HAS_BIAS``) at a padding position; zeros where not ``ok`` and past ``HEAD_DIM``."""
    d = tl.arange(0, BLOCK_D)
    pad = is_padding(row, col, height, width)
    ptrs = base + (row * stride_h + col * stride_w)[:, None] + d[None, :]
    x = tl.load(ptrs, mask=(ok & ~pad)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    if HAS_BIAS:
        pad_value = tl.load(bias + d, mask=d < HEAD_DIM, other=0.0)
        x = tl.where((ok & pad)[:, None], pad_value[None, :], x)
    return x


@triton.jit
def _load_grid(base, row, col, ok, stride_h, stride_w, stride_c, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[len(row), BLOCK_D]`` tile of ``base[row * stride_h + col * stride_w + d * stride_c]`` (an output-shaped
    tensor, any strides), zeros where not ``ok``."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + (row * stride_h + col * stride_w)[:, None] + d[None, :] * stride_c
    return tl.load(ptrs, mask=ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _pooled_queries(base, bias, w, r, ok, height, width, windows_w, stride_h, stride_w,
                    WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """``(q, arg)``: the max over the candidates of pooled queries ``r`` of windows ``w`` and, per element, the
    winning candidate: a candidate replaces the best so far if it is larger or NaN (``F.max_pool2d``'s CPU rule:
    lowest index among ties, last NaN). The max equals ``torch.max``'s, NaN included."""
    row, col = pooled_candidate(w, r, 0, windows_w, WINDOW, Q_STRIDE)
    q = _load_tokens(base, bias, row, col, ok, height, width, stride_h, stride_w, HEAD_DIM, BLOCK_D, HAS_BIAS)
    arg = tl.zeros(q.shape, dtype=tl.int32)
    for c in tl.static_range(1, Q_STRIDE * Q_STRIDE):
        row, col = pooled_candidate(w, r, c, windows_w, WINDOW, Q_STRIDE)
        cand = _load_tokens(base, bias, row, col, ok, height, width, stride_h, stride_w, HEAD_DIM, BLOCK_D, HAS_BIAS)
        wins = (cand > q) | (cand != cand)
        q = tl.where(wins, cand, q)
        arg = tl.where(wins, c, arg)
    return q, arg


@triton.jit
def _store_tokens(base, row, col, ok, height, width, stride_h, stride_w, x,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store ``x`` (cast to base's dtype) at the real map positions among (row, col); return the column sums of its
    rows at padding positions (``[BLOCK_D]``, x's dtype): their share of ``d_bias``."""
    d = tl.arange(0, BLOCK_D)
    pad = is_padding(row, col, height, width)
    ptrs = base + (row * stride_h + col * stride_w)[:, None] + d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(ok & ~pad)[:, None] & (d < HEAD_DIM)[None, :])
    return tl.sum(tl.where((ok & pad)[:, None], x, 0.0), 0)


@triton.jit
def _store_query_grad(DQ, Q, bias, dq, w, r, ok, height, width, windows_w, stride_q_h, stride_q_w, stride_dq_h,
                      stride_dq_w, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write ``dq`` to each element's winning candidate and 0 to the other candidates (real positions); return the
    padding candidates' share of ``d_bias`` (``[BLOCK_D]``). The winners are recomputed from the candidates in
    ``Q`` (an L2 hit in practice) rather than carried through the kernel as an int tile, which costs registers."""
    if Q_STRIDE > 1:
        _, arg = _pooled_queries(Q, bias, w, r, ok, height, width, windows_w, stride_q_h, stride_q_w, WINDOW,
                                 Q_STRIDE, HEAD_DIM, BLOCK_D, HAS_BIAS)
    else:
        arg = tl.zeros(dq.shape, dtype=tl.int32)
    pad_sum = tl.zeros([BLOCK_D], dtype=dq.dtype)
    for c in tl.static_range(Q_STRIDE * Q_STRIDE):
        row, col = pooled_candidate(w, r, c, windows_w, WINDOW, Q_STRIDE)
        g = tl.where(arg == c, dq, 0.0)
        pad_sum += _store_tokens(DQ, row, col, ok, height, width, stride_dq_h, stride_dq_w, g, HEAD_DIM, BLOCK_D)
    return pad_sum


@triton.jit
def _zero_outside_pool(base, t, row, col, ok, height, width, stride_h, stride_w, WINDOW: tl.constexpr,
                       Q_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero the q gradient of the tokens (``t`` of the window, at (row, col)) that are no candidate (odd windows)."""
    if WINDOW % Q_STRIDE != 0:
        zeros = tl.zeros([t.shape[0], BLOCK_D], dtype=tl.float32)
        _store_tokens(base, row, col, ok & outside_pool(t, WINDOW, Q_STRIDE), height, width, stride_h, stride_w,
                      zeros, HEAD_DIM, BLOCK_D)


@triton.jit
def _store_bias_partial(base, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store one head's ``[BLOCK_D]`` partial sum of ``d_bias`` at ``base[:HEAD_DIM]``."""
    d = tl.arange(0, BLOCK_D)
    tl.store(base + d, x.to(base.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _softmax_step(q, k, v, q_win, k_win, col_ok, m_i, l_i, acc, qk_scale,
                  PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key block: scores in log2 units, rescale (max, sum, acc), add ``P @ V``."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=acc.dtype) * qk_scale  # [M, N]
    ok = col_ok[None, :]
    if PACKED:
        ok = ok & (q_win[:, None] == k_win[None, :])  # block-diagonal: a query sees its own window only
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: p = alpha = 0, not NaN
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return m_new, l_i, acc


@triton.jit
def _load_kv(qkv_bh, bias_h, j, n_keys, w0, height, width, windows_w, stride_h, stride_w, C,
             WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
             PACKED: tl.constexpr):
    """K and V ``[len(j), BLOCK_D]`` of keys ``j`` (packed: window ``w0 + j // T``, token ``j % T``; else window
    ``w0``, token ``j``), keys ``>= n_keys`` masked; also returns each key's window offset and mask."""
    if PACKED:
        k_win, t = packed_index(j, WINDOW * WINDOW)
        row, col = window_token(w0 + k_win, t, windows_w, WINDOW)
    else:
        k_win = tl.zeros_like(j)
        row, col = window_token(w0, j, windows_w, WINDOW)
    col_ok = j < n_keys
    k = _load_tokens(qkv_bh + C, bias_h + C, row, col, col_ok, height, width, stride_h, stride_w,
                     HEAD_DIM, BLOCK_D, HAS_BIAS)
    v = _load_tokens(qkv_bh + 2 * C, bias_h + 2 * C, row, col, col_ok, height, width, stride_h, stride_w,
                     HEAD_DIM, BLOCK_D, HAS_BIAS)
    return k, v, k_win, col_ok


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _window_attn_fwd_kernel(
    QKV, Bias, Out, Lse,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    height, width, windows_w, num_windows, num_heads, windows_per_program, num_q_blocks,
    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, ONE_KV_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_LSE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(num_heads * num_q_blocks * packs, B)``; see the module docstring for the math and layout.

    Reads ``QKV[b, row, col, c]`` at ``b * stride_qkv_b + row * stride_qkv_h + col * stride_qkv_w + c`` and
    ``Bias [3C]`` (padding, if ``HAS_BIAS``); writes ``Out [B, H // q, W // q, C]`` contiguous and, with
    ``STORE_LSE``, ``Lse [B, heads, H // q, W // q]`` contiguous. ``ONE_KV_BLOCK``: all keys of the pack fit one
    ``BLOCK_N`` tile (no loop); else one window per program, a loop over its keys in ``BLOCK_N`` blocks.
    """
    pid = tl.program_id(0)
    h = pid % num_heads
    qb = (pid // num_heads) % num_q_blocks
    w0 = pid // num_heads // num_q_blocks * windows_per_program
    b = tl.program_id(1).to(tl.int64)
    T: tl.constexpr = WINDOW * WINDOW
    T_OUT: tl.constexpr = (WINDOW // Q_STRIDE) * (WINDOW // Q_STRIDE)
    C = num_heads * HEAD_DIM
    n_win = tl.minimum(windows_per_program, num_windows - w0)  # windows in this pack
    qkv_bh = QKV + b * stride_qkv_b + h * HEAD_DIM
    bias_h = Bias + h * HEAD_DIM
    qk_scale = tl.full([], LOG2E / HEAD_DIM**0.5, ACC_DTYPE)  # log2(e) / sqrt(head_dim), compile-time constant

    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACKED:
        q_win, r = packed_index(i, T_OUT)
    else:
        q_win = tl.zeros_like(i)
        r = i
    row_ok = i < n_win * T_OUT
    q, _ = _pooled_queries(qkv_bh, bias_h, w0 + q_win, r, row_ok, height, width, windows_w, stride_qkv_h,
                           stride_qkv_w, WINDOW, Q_STRIDE, HEAD_DIM, BLOCK_D, HAS_BIAS)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    if ONE_KV_BLOCK:
        k, v, k_win, col_ok = _load_kv(qkv_bh, bias_h, tl.arange(0, BLOCK_N), n_win * T, w0, height, width,
                                       windows_w, stride_qkv_h, stride_qkv_w, C, WINDOW, HEAD_DIM, BLOCK_D,
                                       HAS_BIAS, PACKED)
        m_i, l_i, acc = _softmax_step(q, k, v, q_win, k_win, col_ok, m_i, l_i, acc, qk_scale, PACKED, DOT_PRECISION)
    else:
        for start in range(0, T, BLOCK_N):
            k, v, k_win, col_ok = _load_kv(qkv_bh, bias_h, start + tl.arange(0, BLOCK_N), T, w0, height, width,
                                           windows_w, stride_qkv_h, stride_qkv_w, C, WINDOW, HEAD_DIM, BLOCK_D,
                                           HAS_BIAS, False)
            m_i, l_i, acc = _softmax_step(q, k, v, q_win, k_win, col_ok, m_i, l_i, acc, qk_scale, False,
                                          DOT_PRECISION)

    # normalise; store at the output position, inside the (cropped) output only
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out_h, out_w = height // Q_STRIDE, width // Q_STRIDE
    oi, oj = output_position(w0 + q_win, r, windows_w, WINDOW, Q_STRIDE)
    keep = row_ok & (oi < out_h) & (oj < out_w)
    pos = (b * out_h + oi) * out_w + oj  # int64
    d = tl.arange(0, BLOCK_D)
    out_ptrs = Out + pos[:, None] * C + h * HEAD_DIM + d[None, :]
    tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=keep[:, None] & (d < HEAD_DIM)[None, :])
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 units -> natural log
        lse_ptrs = Lse + (b * num_heads + h) * out_h * out_w + oi * out_w + oj
        tl.store(lse_ptrs, lse.to(Lse.dtype.element_ty), mask=keep)


# ---------------------------------------------------------------------------------------------- backward, window
@triton.jit
def _window_attn_bwd_kernel(
    DO, QKV, Bias, OUT, LSE, DQKV, DBias,
    stride_do_b, stride_do_h, stride_do_w, stride_do_c,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_o_b, stride_o_h, stride_o_w, stride_o_c,
    stride_lse_b, stride_lse_n, stride_lse_h, stride_lse_w,
    stride_dqkv_b, stride_dqkv_h, stride_dqkv_w,
    height, width, windows_w, num_windows, num_heads, windows_per_program,
    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Whole backward of one head of a pack of windows, in one pass. Grid ``(heads, packs, B)``.

    Query row ``i``: pooled query ``i % T_out`` of window ``w0 + i // T_out``; key row ``j``: token ``j % T`` of
    window ``w0 + j // T`` (``BLOCK_M >= pack * T_out``, ``BLOCK_N >= pack * T``), scores off the block diagonal
    and of cropped queries masked. ``P = exp2(S * scale * log2 e - lse * log2 e)``, ``D = rowsum(dO * O)``,
    ``dV = P^T dO``, ``dS = P * (dO V^T - D)``, ``dK = scale * dS^T Q``, ``dQ = scale * dS K`` routed to the
    winning candidates. Writes the d_qkv elements of its windows' real tokens, each once, and (``HAS_PAD``) its
    padding tokens' sums to ``DBias [B, packs, 3C]`` at ``[b, pack, part * C + h * hd + d]``."""
    h = tl.program_id(0)
    pack = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    T: tl.constexpr = WINDOW * WINDOW
    T_OUT: tl.constexpr = (WINDOW // Q_STRIDE) * (WINDOW // Q_STRIDE)
    C = num_heads * HEAD_DIM
    w0 = pack * windows_per_program
    qk_scale = tl.full([], LOG2E / HEAD_DIM**0.5, ACC)
    sm_scale = tl.full([], 1.0 / HEAD_DIM**0.5, ACC)
    qkv = QKV + b * stride_qkv_b + h * HEAD_DIM
    dqkv = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    bias = Bias + h * HEAD_DIM

    i = tl.arange(0, BLOCK_M)
    wm, r = packed_index(i, T_OUT)
    wm += w0
    valid_m = (i < windows_per_program * T_OUT) & (wm < num_windows)
    oi, oj = output_position(wm, r, windows_w, WINDOW, Q_STRIDE)
    live = valid_m & (oi < height // Q_STRIDE) & (oj < width // Q_STRIDE)  # has an output (not cropped)
    j = tl.arange(0, BLOCK_N)
    wn, t = packed_index(j, T)
    wn += w0
    valid_n = (j < windows_per_program * T) & (wn < num_windows)
    row, col = window_token(wn, t, windows_w, WINDOW)

    q, _ = _pooled_queries(qkv, bias, wm, r, valid_m, height, width, windows_w, stride_qkv_h, stride_qkv_w,
                             WINDOW, Q_STRIDE, HEAD_DIM, BLOCK_D, HAS_BIAS)
    k = _load_tokens(qkv + C, bias + C, row, col, valid_n, height, width, stride_qkv_h, stride_qkv_w,
                     HEAD_DIM, BLOCK_D, HAS_BIAS)
    v = _load_tokens(qkv + 2 * C, bias + 2 * C, row, col, valid_n, height, width, stride_qkv_h, stride_qkv_w,
                     HEAD_DIM, BLOCK_D, HAS_BIAS)
    do = _load_grid(DO + b * stride_do_b + h * HEAD_DIM * stride_do_c, oi, oj, live, stride_do_h, stride_do_w,
                    stride_do_c, HEAD_DIM, BLOCK_D)
    o = _load_grid(OUT + b * stride_o_b + h * HEAD_DIM * stride_o_c, oi, oj, live, stride_o_h, stride_o_w,
                   stride_o_c, HEAD_DIM, BLOCK_D)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)  # D = rowsum(dO * O)
    do = do.to(q.dtype)
    lse = tl.load(LSE + b * stride_lse_b + h * stride_lse_n + oi * stride_lse_h + oj * stride_lse_w, mask=live,
                  other=0.0).to(ACC)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC)  # [BLOCK_M, BLOCK_N]
    same = (wm[:, None] == wn[None, :]) & live[:, None] & valid_n[None, :]
    p = tl.exp2(tl.where(same, s * qk_scale - (lse * LOG2E)[:, None], float("-inf")))  # 0 off the pack's windows
    dv = tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=DOT_PRECISION).to(ACC)
    pad_v = _store_tokens(dqkv + 2 * C, row, col, valid_n, height, width, stride_dqkv_h, stride_dqkv_w, dv,
                          HEAD_DIM, BLOCK_D)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION).to(ACC) * sm_scale
    pad_k = _store_tokens(dqkv + C, row, col, valid_n, height, width, stride_dqkv_h, stride_dqkv_w, dk,
                          HEAD_DIM, BLOCK_D)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION).to(ACC) * sm_scale
    pad_q = _store_query_grad(dqkv, qkv, bias, dq, wm, r, valid_m, height, width, windows_w, stride_qkv_h,
                              stride_qkv_w, stride_dqkv_h, stride_dqkv_w, WINDOW, Q_STRIDE, HEAD_DIM, BLOCK_D,
                              HAS_BIAS)
    _zero_outside_pool(dqkv, t, row, col, valid_n, height, width, stride_dqkv_h, stride_dqkv_w, WINDOW, Q_STRIDE,
                       HEAD_DIM, BLOCK_D)
    if HAS_PAD:
        partial = DBias + (b * tl.num_programs(1) + pack) * 3 * C + h * HEAD_DIM
        _store_bias_partial(partial, pad_q, HEAD_DIM, BLOCK_D)
        _store_bias_partial(partial + C, pad_k, HEAD_DIM, BLOCK_D)
        _store_bias_partial(partial + 2 * C, pad_v, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------- backward, split
@triton.jit
def _window_attn_bwd_dq_kernel(
    DO, QKV, Bias, OUT, LSE, DELTA, DQKV, DBias,
    stride_do_b, stride_do_h, stride_do_w, stride_do_c,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_o_b, stride_o_h, stride_o_w, stride_o_c,
    stride_lse_b, stride_lse_n, stride_lse_h, stride_lse_w,
    stride_dqkv_b, stride_dqkv_h, stride_dqkv_w,
    height, width, windows_w, num_windows, num_heads,
    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of ``BLOCK_M`` pooled queries of one (batch, window, head), looping over the window's keys.

    Grid ``(cdiv(T_out, BLOCK_M), heads * windows, B)``, axis 1 is ``w * heads + h``. Writes the q part of d_qkv
    at its queries' candidates (0 for the losers), ``D = rowsum(dO * O)`` to ``DELTA [B, heads, windows, T_out]``
    (contiguous, ACC) for the dK/dV kernel, and (``HAS_PAD``) its padding candidates' sums to
    ``DBias [B, windows * q_blocks, C]`` at ``[b, w * q_blocks + block, h * hd + d]``."""
    h = tl.program_id(1) % num_heads
    w = tl.program_id(1) // num_heads
    b = tl.program_id(2).to(tl.int64)
    T: tl.constexpr = WINDOW * WINDOW
    T_OUT: tl.constexpr = (WINDOW // Q_STRIDE) * (WINDOW // Q_STRIDE)
    C = num_heads * HEAD_DIM
    qk_scale = tl.full([], LOG2E / HEAD_DIM**0.5, ACC)
    qkv = QKV + b * stride_qkv_b + h * HEAD_DIM
    bias = Bias + h * HEAD_DIM

    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = r < T_OUT
    oi, oj = output_position(w, r, windows_w, WINDOW, Q_STRIDE)
    live = valid_m & (oi < height // Q_STRIDE) & (oj < width // Q_STRIDE)
    q, _ = _pooled_queries(qkv, bias, w, r, valid_m, height, width, windows_w, stride_qkv_h, stride_qkv_w,
                             WINDOW, Q_STRIDE, HEAD_DIM, BLOCK_D, HAS_BIAS)
    do = _load_grid(DO + b * stride_do_b + h * HEAD_DIM * stride_do_c, oi, oj, live, stride_do_h, stride_do_w,
                    stride_do_c, HEAD_DIM, BLOCK_D)
    o = _load_grid(OUT + b * stride_o_b + h * HEAD_DIM * stride_o_c, oi, oj, live, stride_o_h, stride_o_w,
                   stride_o_c, HEAD_DIM, BLOCK_D)
    delta = tl.sum(do.to(ACC) * o.to(ACC), axis=1)
    tl.store(DELTA + ((b * num_heads + h) * num_windows + w) * T_OUT + r, delta, mask=valid_m)
    do = do.to(q.dtype)
    lse2 = tl.load(LSE + b * stride_lse_b + h * stride_lse_n + oi * stride_lse_h + oj * stride_lse_w, mask=live,
                   other=0.0).to(ACC) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(0, T, BLOCK_N):
        k, v, _k_win, valid_n = _load_kv(qkv, bias, start + tl.arange(0, BLOCK_N), T, w, height, width, windows_w,
                                    stride_qkv_h, stride_qkv_w, C, WINDOW, HEAD_DIM, BLOCK_D, HAS_BIAS, False)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC)  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(tl.where(live[:, None] & valid_n[None, :], s * qk_scale - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION).to(ACC)

    dq = dq * tl.full([], 1.0 / HEAD_DIM**0.5, ACC)
    pad_q = _store_query_grad(DQKV + b * stride_dqkv_b + h * HEAD_DIM, qkv, bias, dq, w, r, valid_m, height, width,
                              windows_w, stride_qkv_h, stride_qkv_w, stride_dqkv_h, stride_dqkv_w, WINDOW, Q_STRIDE,
                              HEAD_DIM, BLOCK_D, HAS_BIAS)
    if HAS_PAD:
        slot = b * num_windows * tl.num_programs(0) + w * tl.num_programs(0) + tl.program_id(0)
        _store_bias_partial(DBias + slot * C + h * HEAD_DIM, pad_q, HEAD_DIM, BLOCK_D)


@triton.jit
def _window_attn_bwd_dkdv_kernel(
    DO, QKV, Bias, LSE, DELTA, DQKV, DBias,
    stride_do_b, stride_do_h, stride_do_w, stride_do_c,
    stride_qkv_b, stride_qkv_h, stride_qkv_w,
    stride_lse_b, stride_lse_n, stride_lse_h, stride_lse_w,
    stride_dqkv_b, stride_dqkv_h, stride_dqkv_w,
    height, width, windows_w, num_windows, num_heads,
    HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV of ``BLOCK_N`` tokens of one (batch, window, head), looping over the window's pooled queries.

    Grid ``(cdiv(T, BLOCK_N), heads * windows, B)``, axis 1 is ``w * heads + h``. Works on ``S^T [BLOCK_N,
    BLOCK_M]``; recomputes the pooled queries per query block and reads the dQ kernel's ``D``. Writes the k and v
    parts of d_qkv of its real tokens (and the zero q gradient of tokens outside the pool), and (``HAS_PAD``) its
    padding tokens' sums to ``DBias [B, windows * k_blocks, 2C]`` at ``[b, w * k_blocks + block, part * C + ...]``."""
    h = tl.program_id(1) % num_heads
    w = tl.program_id(1) // num_heads
    b = tl.program_id(2).to(tl.int64)
    T: tl.constexpr = WINDOW * WINDOW
    T_OUT: tl.constexpr = (WINDOW // Q_STRIDE) * (WINDOW // Q_STRIDE)
    C = num_heads * HEAD_DIM
    qk_scale = tl.full([], LOG2E / HEAD_DIM**0.5, ACC)
    qkv = QKV + b * stride_qkv_b + h * HEAD_DIM
    bias = Bias + h * HEAD_DIM
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = t < T
    row, col = window_token(w, t, windows_w, WINDOW)
    k, v, _k_win, _k_ok = _load_kv(qkv, bias, t, T, w, height, width, windows_w, stride_qkv_h, stride_qkv_w, C, WINDOW,
                          HEAD_DIM, BLOCK_D, HAS_BIAS, False)
    delta_w = DELTA + ((b * num_heads + h) * num_windows + w) * T_OUT

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start in range(0, T_OUT, BLOCK_M):
        r = start + tl.arange(0, BLOCK_M)
        valid_m = r < T_OUT
        oi, oj = output_position(w, r, windows_w, WINDOW, Q_STRIDE)
        live = valid_m & (oi < height // Q_STRIDE) & (oj < width // Q_STRIDE)
        q, _arg = _pooled_queries(qkv, bias, w, r, valid_m, height, width, windows_w, stride_qkv_h, stride_qkv_w,
                                  WINDOW, Q_STRIDE, HEAD_DIM, BLOCK_D, HAS_BIAS)
        do = _load_grid(DO + b * stride_do_b + h * HEAD_DIM * stride_do_c, oi, oj, live, stride_do_h, stride_do_w,
                        stride_do_c, HEAD_DIM, BLOCK_D).to(q.dtype)
        lse2 = tl.load(LSE + b * stride_lse_b + h * stride_lse_n + oi * stride_lse_h + oj * stride_lse_w,
                       mask=live, other=0.0).to(ACC) * LOG2E
        delta = tl.load(delta_w + r, mask=live, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION).to(ACC)  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(tl.where(valid_n[:, None] & live[None, :], st * qk_scale - lse2[None, :], float("-inf")))
        dv += tl.dot(pt.to(q.dtype), do, input_precision=DOT_PRECISION).to(ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION).to(ACC)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=DOT_PRECISION).to(ACC)

    dk = dk * tl.full([], 1.0 / HEAD_DIM**0.5, ACC)
    dqkv = DQKV + b * stride_dqkv_b + h * HEAD_DIM
    pad_k = _store_tokens(dqkv + C, row, col, valid_n, height, width, stride_dqkv_h, stride_dqkv_w, dk,
                          HEAD_DIM, BLOCK_D)
    pad_v = _store_tokens(dqkv + 2 * C, row, col, valid_n, height, width, stride_dqkv_h, stride_dqkv_w, dv,
                          HEAD_DIM, BLOCK_D)
    _zero_outside_pool(dqkv, t, row, col, valid_n, height, width, stride_dqkv_h, stride_dqkv_w, WINDOW, Q_STRIDE,
                       HEAD_DIM, BLOCK_D)
    if HAS_PAD:
        slot = b * num_windows * tl.num_programs(0) + w * tl.num_programs(0) + tl.program_id(0)
        _store_bias_partial(DBias + slot * 2 * C + h * HEAD_DIM, pad_k, HEAD_DIM, BLOCK_D)
        _store_bias_partial(DBias + slot * 2 * C + C + h * HEAD_DIM, pad_v, HEAD_DIM, BLOCK_D)


KERNELS = {
    "forward": _window_attn_fwd_kernel,
    "window": _window_attn_bwd_kernel,
    "dq": _window_attn_bwd_dq_kernel,
    "dkdv": _window_attn_bwd_dkdv_kernel,
}


# ---------------------------------------------------------------------------------------------- configs
def window_attention_forward_config(head_dim: int, window_size: int, q_stride: int, dtype: torch.dtype) -> dict:
    """The forward's constexprs plus ``windows_per_program``, ``num_warps``, ``num_stages`` (and ``maxnreg``): a pure
    function of shape classes (no autotuning; the same choice under the interpreter).

    A window whose keys fit one key tile runs without a loop (``ONE_KV_BLOCK``); small windows are packed while the
    pack's keys fit the key tile and its queries the query tile: 4x4 windows 4 a program, 64 queries (16 pooled)
    against 64 keys, so ``tl.dot`` gets >= 16 rows. Bigger windows (14x14 = 196, 16x16 = 256 keys) run one window
    per program, query tiles on the grid, a flash loop over key blocks. fp16/bf16: 64-query tiles (``wgmma`` on
    sm_90; 32 in the loop for head dims > 128), 64-key tiles (32 in the loop for head dims > 64: K and V are
    double-buffered). fp32 (3xTF32 dots hold each operand twice) and fp64: 16-query tiles, 64-key tiles (16 for head
    dims > 128; 32 in the loop for head dims > 64), and a 255-register budget (ptxas otherwise caps 8-warp kernels
    at 128 registers and spills). These are the compile lane's spill-free choices on sm_80 / sm_90 (fp32 beyond head
    dim 128 and fp64 aside: they spill a little); a 256-key tile for 14x14 windows spills in fp32 (528-768 bytes) and,
    spill-free in fp16, holds 144 KB of shared memory (one program per SM; the loop's 64 KB allow more), so 14x14
    and 16x16 windows loop."""
    T, T_out = window_size * window_size, (window_size // q_stride) ** 2
    block_d = max(16, next_power_of_2(head_dim))
    wide = dtype in (torch.float32, torch.float64)
    max_m, max_n = (16, 64 if block_d <= 128 else 16) if wide else (64, 64)
    if T <= max_n:  # one key block: pack small windows
        wp = max(1, min(max_n // T, max_m // T_out))
        block_m = min(max_m, max(16, next_power_of_2(wp * T_out)))
        block_n = max(16, next_power_of_2(wp * T))
    else:
        wp, block_m = 1, min(max_m, 64 if block_d <= 128 else 32, max(16, next_power_of_2(T_out)))
        block_n = max_n if block_d <= 64 else min(max_n, 32)
    one_kv_block = wp * T <= block_n
    big = block_m * block_d >= (64 * 128 if one_kv_block else 64 * 64)
    extra = {"maxnreg": 255} if wide else {}  # ptxas otherwise caps itself at 128 registers and spills
    return {
        "HEAD_DIM": head_dim, "WINDOW": window_size, "Q_STRIDE": q_stride,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "PACKED": wp > 1, "ONE_KV_BLOCK": one_kv_block,
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        "DOT_PRECISION": {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32"),
        "windows_per_program": wp,
        "num_warps": 8 if wide or big or block_d == 256 else 4,
        "num_stages": 1 if one_kv_block else 2,
        **extra,
    }




def window_attention_backward_config(head_dim: int, window_size: int, q_stride: int, dtype: torch.dtype) -> dict:
    """``{"variant": "window" | "split", "windows_per_program", "launches": {kernel: {constexprs..., "num_warps",
    "num_stages"[, "maxnreg"]}}}``, kernels named as in :data:`KERNELS`, in launch order; a pure function of shape
    classes. The one-pass ``window`` variant while a pack's keys fit one tile (fp16/bf16: 64 keys up to head dim
    128, 32 beyond; fp32/fp64: 16, or 64 for head dims <= 16): 8x8 and 7x7 windows alone, 4x4 windows 4 a program
    (64 queries, or 16 pooled ones, against 64 keys). Otherwise (14x14, 16x16; fp32 beyond 4x4) the ``split``, its
    (queries, keys) tiles by head-dim class: fp16/bf16 dQ (64, 16) / dK-dV (32, 64) with 4 warps up to 64, (32, 64) /
    (32, 64) with 8 up to 128, (16, 32) / (32, 16) beyond; fp32/fp64 (16, 16). ``attention_bwd``'s tiles spill here
    (the 2-D index math and the padding sums cost registers): these are the compile lane's spill-free choices
    (fp32 beyond head dim 128 and fp64 aside, which spill a little). Dots in IEEE precision for fp32/fp64
    (``attention_bwd``'s choice: fp32-exact gradients)."""
    T, T_out = window_size * window_size, (window_size // q_stride) ** 2
    block_d = max(16, next_power_of_2(head_dim))
    wide = dtype in (torch.float32, torch.float64)
    common = dict(HEAD_DIM=head_dim, WINDOW=window_size, Q_STRIDE=q_stride, BLOCK_D=block_d,
                  ACC=tl.float64 if dtype == torch.float64 else tl.float32, DOT_PRECISION="ieee")
    max_keys = (64 if block_d <= 16 else 16) if wide else (32 if block_d > 128 else 64)
    pack = max(1, max_keys // T)
    block_m, block_n = max(16, next_power_of_2(pack * T_out)), max(16, next_power_of_2(pack * T))
    # ptxas caps itself at 128 registers for 8 warps and spills: fp32 (FMA dots) and head dim 256 get a budget
    extra = {"maxnreg": 255} if dtype == torch.float32 or block_d == 256 else {}
    if block_n <= max_keys:
        warps = 8 if block_m * block_d >= 64 * 64 or block_n * block_d >= 64 * 128 or wide else 4
        return {"variant": "window", "windows_per_program": pack, "launches": {"window": dict(
            common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=1, **extra)}}
    if wide:
        (dq, dq_warps), (dkdv, dkdv_warps) = ((16, 16), 8), ((16, 16), 8)
    elif block_d <= 64:
        (dq, dq_warps), (dkdv, dkdv_warps) = ((64, 16), 4), ((32, 64), 4)
    elif block_d <= 128:
        (dq, dq_warps), (dkdv, dkdv_warps) = ((32, 64), 8), ((32, 64), 8)
    else:
        (dq, dq_warps), (dkdv, dkdv_warps) = ((16, 32), 8), ((32, 16), 8)
    return {"variant": "split", "windows_per_program": 1, "launches": {
        "dq": dict(common, BLOCK_M=dq[0], BLOCK_N=dq[1], num_warps=dq_warps, num_stages=2, **extra),
        "dkdv": dict(common, BLOCK_M=dkdv[0], BLOCK_N=dkdv[1], num_warps=dkdv_warps, num_stages=2, **extra)}}


# ---------------------------------------------------------------------------------------------- plans + launchers
def _geometry(qkv: torch.Tensor, num_heads: int, window_size: int, q_stride: int):
    """Validate the call's shapes; ``(B, H, W, C, head_dim, windows_w, num_windows)``."""
    B, H, W, three_c = qkv.shape
    assert qkv.stride(-1) == 1 and three_c % (3 * num_heads) == 0, "qkv [B, H, W, 3C], unit channel stride"
    assert three_c // (3 * num_heads) <= 256, "head_dim > 256 is not supported"
    assert q_stride in (1, 2), "q_stride 1 or 2"
    check_window_geometry(H, W, window_size, q_stride)
    windows_h, windows_w = window_grid(H, W, window_size)
    Hp, Wp = windows_h * window_size, windows_w * window_size
    for stride_h, stride_w in (qkv.stride()[1:3], (W * three_c, three_c)):  # qkv, and d_qkv (contiguous)
        assert (Hp - 1) * stride_h + (Wp - 1) * stride_w + three_c < 2**31, "offsets in a batch are 32-bit"
    assert B < 65536 and windows_h * windows_w * num_heads < 65536, "grid limits"
    return B, H, W, three_c // 3, three_c // 3 // num_heads, windows_w, windows_h * windows_w


def window_attention_forward_plan(qkv, bias, out, lse, num_heads: int, window_size: int, q_stride: int,
                                  store_lse: bool) -> list[tuple]:
    """``[(kernel name, grid, args, launch kwargs)]`` that :func:`window_attention_forward` launches (split out so
    the compile lane builds the launcher's exact argument list from meta tensors)."""
    B, H, W, _, head_dim, windows_w, num_windows = _geometry(qkv, num_heads, window_size, q_stride)
    cfg = dict(cached_config(window_attention_forward_config, head_dim, window_size, q_stride, qkv.dtype))
    wp = cfg.pop("windows_per_program")
    num_q_blocks = cdiv(wp * (window_size // q_stride) ** 2, cfg["BLOCK_M"])
    grid = (num_heads * num_q_blocks * cdiv(num_windows, wp), B)
    args = (qkv, qkv if bias is None else bias, out, lse, *qkv.stride()[:3],
            H, W, windows_w, num_windows, num_heads, wp, num_q_blocks)
    return [("forward", grid, args, dict(cfg, HAS_BIAS=bias is not None, STORE_LSE=store_lse))]


def window_attention_forward(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, window_size: int,
                             q_stride: int, *, return_lse: bool = False, out: torch.Tensor | None = None,
                             lse_out: torch.Tensor | None = None):
    """qkv ``[B, H, W, 3C]`` (the qkv Linear on the unpadded map; unit channel stride, other strides arbitrary),
    bias ``[3C]`` or None → out ``[B, H // q, W // q, C]`` contiguous in qkv's dtype (and, with ``return_lse``,
    ``lse [B, heads, H // q, W // q]`` fp32, fp64 for fp64). ``bias`` is used in qkv's dtype (what a padded token
    holds after the Linear). ``out`` / ``lse_out``: optional contiguous buffers of those shapes; only the output's
    elements are written. Contract, grid and layout: the module docstring."""
    B, H, W, three_c = qkv.shape
    shape = (B, H // q_stride, W // q_stride)
    out = torch.empty(*shape, three_c // 3, device=qkv.device, dtype=qkv.dtype) if out is None else out
    lse_shape = (B, num_heads, *shape[1:]) if return_lse else (1,)
    if lse_out is None:
        lse_out = torch.empty(lse_shape, device=qkv.device, dtype=softmax_stats_dtype(qkv.dtype))
    assert out.is_contiguous() and out.shape == (*shape, three_c // 3) and out.dtype == qkv.dtype
    assert lse_out.is_contiguous() and (not return_lse or lse_out.shape == lse_shape)
    bias = None if bias is None else bias.to(qkv.dtype).contiguous()
    plan = window_attention_forward_plan(qkv, bias, out, lse_out, num_heads, window_size, q_stride, return_lse)
    if out.numel() > 0:  # an empty batch: nothing to launch (CUDA rejects a grid axis of 0)
        for name, grid, args, launch in plan:
            KERNELS[name][grid](*args, **launch)
    return (out, lse_out) if return_lse else out


def window_attention_backward_plan(grad_out, qkv, bias, out, lse, d_qkv, num_heads: int, window_size: int,
                                   q_stride: int) -> tuple[list[tuple], list[torch.Tensor]]:
    """``([(kernel name, grid, args, launch kwargs)], partials)`` of :func:`window_attention_backward`: the launches
    in order and the ``d_bias`` partial-sum buffers they fill (none without padding), whose sums over their first
    two axes, concatenated, are ``d_bias``. Allocates the split's ``D`` and the partial buffers."""
    B, H, W, C, head_dim, windows_w, num_windows = _geometry(qkv, num_heads, window_size, q_stride)
    cfg = cached_config(window_attention_backward_config, head_dim, window_size, q_stride, qkv.dtype)  # read-only
    has_pad = H % window_size != 0 or W % window_size != 0
    stats, dev = softmax_stats_dtype(qkv.dtype), qkv.device
    flags = dict(HAS_BIAS=bias is not None, HAS_PAD=has_pad)
    strides = (*grad_out.stride(), *qkv.stride()[:3])
    geometry = (H, W, windows_w, num_windows, num_heads)
    bias = qkv if bias is None else bias
    launch = cfg["launches"]
    if cfg["variant"] == "window":
        wp = cfg["windows_per_program"]
        grid = (num_heads, cdiv(num_windows, wp), B)
        partials = [torch.empty(B, grid[1], 3 * C, device=dev, dtype=stats)] if has_pad else []
        args = (grad_out, qkv, bias, out, lse, d_qkv, partials[0] if has_pad else lse, *strides, *out.stride(),
                *lse.stride(), *d_qkv.stride()[:3], *geometry, wp)
        return [("window", grid, args, dict(launch["window"], **flags))], partials
    T, T_out = window_size * window_size, (window_size // q_stride) ** 2
    q_blocks, k_blocks = cdiv(T_out, launch["dq"]["BLOCK_M"]), cdiv(T, launch["dkdv"]["BLOCK_N"])
    delta = torch.empty(B, num_heads, num_windows, T_out, device=dev, dtype=stats)
    partials = [torch.empty(B, num_windows * q_blocks, C, device=dev, dtype=stats),
                torch.empty(B, num_windows * k_blocks, 2 * C, device=dev, dtype=stats)] if has_pad else []
    dq_partial, dkdv_partial = partials if has_pad else (lse, lse)  # unused without padding
    dq_args = (grad_out, qkv, bias, out, lse, delta, d_qkv, dq_partial, *strides, *out.stride(), *lse.stride(),
               *d_qkv.stride()[:3], *geometry)
    dkdv_args = (grad_out, qkv, bias, lse, delta, d_qkv, dkdv_partial, *strides, *lse.stride(), *d_qkv.stride()[:3],
                 *geometry)
    launches = [("dq", (q_blocks, num_heads * num_windows, B), dq_args, dict(launch["dq"], **flags)),
                ("dkdv", (k_blocks, num_heads * num_windows, B), dkdv_args, dict(launch["dkdv"], **flags))]
    return launches, partials


def window_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor | None,
                              out: torch.Tensor, lse: torch.Tensor, num_heads: int, window_size: int, q_stride: int,
                              *, d_qkv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_qkv [B, H, W, 3C], d_bias [3C])`` of :func:`window_attention_forward`: d_qkv contiguous in qkv's dtype
    (``d_qkv=``: an optional contiguous buffer; every element is written), d_bias fp32 (fp64 for fp64) = the sum of
    the padded tokens' q, k, v gradients (zeros without padding). ``grad_out`` / ``out [B, H // q, W // q, C]`` and
    ``lse [B, heads, H // q, W // q]`` (natural log): any strides, stride 0 included. Max-pool ties and NaNs: the
    module docstring. Deterministic (no atomics)."""
    B, H, W, three_c = qkv.shape
    shape = (B, H // q_stride, W // q_stride)
    assert grad_out.shape == out.shape == (*shape, three_c // 3) and lse.shape == (B, num_heads, *shape[1:])
    for t in (grad_out, out, lse):
        assert sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) < 2**31, "32-bit offsets"
    d_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if d_qkv is None else d_qkv
    assert d_qkv.shape == qkv.shape and d_qkv.dtype == qkv.dtype and d_qkv.is_contiguous()
    bias = None if bias is None else bias.to(qkv.dtype).contiguous()
    plan, partials = window_attention_backward_plan(grad_out, qkv, bias, out, lse, d_qkv, num_heads, window_size,
                                                    q_stride)
    if qkv.numel() > 0:
        for name, grid, args, launch in plan:
            KERNELS[name][grid](*args, **launch)
    if not partials or qkv.numel() == 0:
        return d_qkv, torch.zeros(three_c, dtype=softmax_stats_dtype(qkv.dtype), device=qkv.device)
    return d_qkv, torch.cat([p.sum(dim=(0, 1)) for p in partials])


# ---------------------------------------------------------------------------------------------- compile lane
# SAM 2.1 tiny / small / base_plus / large at 1024²: (map side, window, q_stride) of every windowed block
SAM2_GEOMETRIES = [(256, 8, 1), (256, 8, 2), (128, 4, 1), (128, 4, 2), (64, 14, 1), (64, 14, 2), (32, 7, 1),
                   (64, 16, 1), (64, 16, 2), (32, 8, 1)]
# one padded map per config class of those (padding turns every flag on: the largest code), plus an odd window
# that pools; 14 stands for 16 and 8 for 7 (the same configs: only the window's size differs)
_EVERY = [(60, 8, 1), (60, 8, 2), (30, 4, 1), (30, 4, 2), (64, 14, 1), (64, 14, 2), (12, 7, 2)]
_SPOTS = [(60, 8, 1), (30, 4, 2), (64, 14, 2)]  # forward: one block / packed / loop; backward: window x2 / split


def window_attention_variants() -> list[dict]:
    """Call points whose launches are the compile lane's variants (each compiled for sm_80 and sm_90).

    fp16 at SAM 2's two head-dim classes, 56 (``BLOCK_D`` 64) and 96 (128; 72's class too): every config class of
    :data:`SAM2_GEOMETRIES` on padded maps (``HAS_PAD``, the bias, the log-sum-exp store: every flag on), forward
    and backward, and a pooling block over an odd window. Spot checks (``_SPOTS``: one geometry per forward path
    and backward variant): the inference forward without the store, the backward without padding, bf16 (fp16's
    tiles and MMA shapes), head dim 256 (the register-heaviest), fp32 at 56 / 96 / 256, fp64 (a test dtype) at 64.
    Each point is ``{"direction": "forward" | "backward", "dtype", "head_dim", "num_heads", "height", "width",
    "window_size", "q_stride", "store_lse"}``."""
    f16, b16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    plan = [(f16, hd, _EVERY, "forward", True) for hd in (56, 96)] + [(f16, hd, _EVERY, "backward", True)
                                                                      for hd in (56, 96)]
    plan += [(f16, 96, _SPOTS, "forward", False), (f16, 96, [(256, 8, 1), (64, 16, 2)], "backward", True)]
    plan += [(dt, hd, _SPOTS, direction, True) for dt, hd in ((b16, 96), (f16, 256), (f32, 56), (f32, 96), (f64, 64))
             for direction in ("forward", "backward")]
    plan += [(f32, 256, [(64, 14, 2)], direction, True) for direction in ("forward", "backward")]
    out, seen = [], set()
    for dtype, hd, geometries, direction, store_lse in plan:
        for side, ws, q in geometries:
            if direction == "forward":
                launches = [window_attention_forward_config(hd, ws, q, dtype)]
            else:
                launches = list(window_attention_backward_config(hd, ws, q, dtype)["launches"].values())
            key = (direction, str(dtype), hd, store_lse, side % ws != 0 and direction == "backward", ws % q,
                   repr([{k: str(v) for k, v in c.items() if k != "WINDOW"} for c in launches]))
            if key not in seen:  # e.g. fp32's spots that share a config
                seen.add(key)
                out.append({"direction": direction, "dtype": dtype, "head_dim": hd, "num_heads": 2, "height": side,
                            "width": side, "window_size": ws, "q_stride": q, "store_lse": store_lse})
    return out


__all__ = ["window_attention_forward", "window_attention_backward", "window_attention_forward_config",
           "window_attention_backward_config", "window_attention_forward_plan", "window_attention_backward_plan",
           "window_attention_variants", "KERNELS", "SAM2_GEOMETRIES"]
