"""Eager PyTorch references of the fused ops: the executable spec the Triton kernels are tested against.

Layout contract (see DESIGN.md §1). ``qkv`` is the qkv Linear's output ``[B, N, 3 * C]`` with channels
ordered ``(3, heads, head_dim)`` and tokens in Hiera's *unrolled* order ``n = t * nw + w``: ``w`` is the
window (mask unit), ``t`` the token inside it, so a window's tokens are strided by ``nw`` in memory.
With ``T = N // nw`` tokens per window and query stride ``s``, pooled query ``r < T // s`` of window ``w``
is the max over ``j < s`` of query row ``(j * T // s + r) * nw + w``; the output ``[B, N // s, C]`` holds
it at row ``r * nw + w``, channels ``h * head_dim + d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def num_windows_for(num_tokens: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """Number of mask units the attention runs over (1 for global attention), as the official code computes it."""
    return num_tokens // (q_stride * window_size) if use_mask_unit_attn else 1


def mask_unit_attention_official(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """The official 5-D formulation (``hiera/hiera.py: MaskUnitAttention``) with an explicit softmax.

    Works in any dtype, float64 included; used as the ground truth in tests.
    qkv: ``[B, N, 3 * C]`` → ``[B, N // q_stride, C]``.
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    # [B, T, nw, 3, H, hd] -> [3, B, H, nw, T, hd]
    qkv = qkv.reshape(B, -1, num_windows, 3, num_heads, head_dim).permute(3, 0, 4, 2, 1, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if q_stride > 1:
        # [B, H, nw, s, T // s, hd] -> max over s
        q = q.reshape(B, num_heads, num_windows, q_stride, -1, head_dim).max(dim=3).values
    attn = (q * head_dim**-0.5) @ k.transpose(-1, -2)
    x = attn.softmax(dim=-1) @ v  # [B, H, nw, T', hd]
    return x.transpose(1, 3).reshape(B, -1, C)  # [B, T' * nw, C]


def mask_unit_attention_eager(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """The best eager form: contiguous 4-D windows ``[B * nw, heads, T, hd]`` so SDPA can pick its fused kernels.

    Same contract as :func:`mask_unit_attention_official`. Query ties in the max-pool route the gradient to one
    element, as ``torch.max(dim).values`` does in the official code.
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    T = N // num_windows
    # [B, T, nw, 3, H, hd] -> [3, B, nw, H, T, hd] -> [3, B * nw, H, T, hd]
    qkv = qkv.reshape(B, T, num_windows, 3, num_heads, head_dim).permute(3, 0, 2, 4, 1, 5)
    qkv = qkv.reshape(3, B * num_windows, num_heads, T, head_dim)
    q, k, v = qkv.unbind(0)
    if q_stride > 1:
        # [B * nw, H, s, T // s, hd] -> max over s
        q = q.reshape(B * num_windows, num_heads, q_stride, T // q_stride, head_dim).max(dim=2).values
    x = F.scaled_dot_product_attention(q, k, v)  # [B * nw, H, T', hd]
    # [B, nw, H, T', hd] -> [B, T', nw, H, hd] -> [B, T' * nw, C]
    return x.reshape(B, num_windows, num_heads, -1, head_dim).permute(0, 3, 1, 2, 4).reshape(B, -1, C)


def unrolled_max_pool_eager(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Max-pool over the most significant unroll level: ``[B, N, C]`` → ``[B, N // stride, C]``.

    Because of the unrolled layout this is a max over the leading index of ``x.view(B, stride, N // stride, C)``
    (see the official ``Unroll`` docstring).
    """
    if stride == 1:
        return x
    return x.reshape(x.shape[0], stride, -1, x.shape[-1]).max(dim=1).values
