"""The attention of a SAM 2 Hiera block, in one function so that a fused kernel can replace it.

Every peer computes the same math (official ``sam2``, ultralytics and timm with 4-D SDPA on views already;
transformers also forms an unused softmax over the wrong axes and, in eager mode, a second, explicit one). Here: 4-D
SDPA on views of the qkv GEMM output, no mask, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_attention(qkv: torch.Tensor, num_heads: int, q_stride: int | None = None) -> torch.Tensor:
    """Multi-head attention within each window; with ``q_stride``, the queries are max-pooled first.

    Args:
        qkv: ``[B * nW, ws, ws, 3 * C]``, the qkv Linear's output on window-partitioned tokens (a global block passes
            the whole map, ``[B, H, W, 3 * C]``); channels ordered ``(3, heads, head_dim)``. Padded tokens are rows
            like any other: every token is a key, there is no mask.
        num_heads: heads; ``C % num_heads == 0``.
        q_stride: the queries' ``q_stride x q_stride`` max-pool inside the window (``MaxPool2d``: floor, no padding);
            None or 1 for none.

    Returns:
        ``[B * nW, ws', ws', C]`` with ``ws' = ws // q_stride``, channels ``(heads, head_dim)``.
    """
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be [B * windows, ws, ws, 3 * C], got shape {tuple(qkv.shape)}")
    B, h, w, C3 = qkv.shape
    if num_heads < 1 or C3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim {C3} must be 3 * C with C divisible by num_heads={num_heads}")
    C = C3 // 3
    q, k, v = qkv.reshape(B, h * w, 3, num_heads, C // num_heads).unbind(2)  # each [B', h*w, heads, hd], views
    if q_stride is not None and q_stride > 1:
        q = q.reshape(B, h, w, C).permute(0, 3, 1, 2)  # [B', C, h, w], a view
        q = F.max_pool2d(q, q_stride, q_stride).permute(0, 2, 3, 1)  # [B', h', w', C]
        h, w = q.shape[1:3]
        q = q.reshape(B, h * w, num_heads, C // num_heads)  # [B', h'*w', heads, hd]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B', heads, L', hd]
    return out.transpose(1, 2).reshape(B, h, w, C)  # [B', h', w', C]


def is_plain_pool(pool: nn.Module | None) -> bool:
    """Whether a peer's query pool is None or ``nn.MaxPool2d(q, q)`` (square, no padding, dilation or ceil mode):
    the pooling :func:`window_attention` computes."""
    if pool is None:
        return True
    if type(pool) is not nn.MaxPool2d:
        return False
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return (kernel == stride and kernel[0] == kernel[1] and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def pool_stride(pool: nn.Module | None) -> int | None:
    """The stride of a plain query pool (:func:`is_plain_pool`) as :func:`window_attention` takes it; None for none."""
    return None if pool is None else _pair(pool.kernel_size)[0]


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
