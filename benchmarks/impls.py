"""The attention implementations the op benchmarks compare with the fused kernel (besides ``fused=False``)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def official_5d(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """``hiera/hiera.py: MaskUnitAttention.forward`` minus the Linear layers, SDPA on 5-D tensors as written there."""
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    qkv = qkv.reshape(B, -1, num_windows, 3, num_heads, head_dim).permute(3, 0, 4, 2, 1, 5)  # [3, B, H, nw, T, hd]
    q, k, v = qkv[0], qkv[1], qkv[2]
    if q_stride > 1:
        q = q.view(B, num_heads, num_windows, q_stride, -1, head_dim).max(dim=3).values  # [B, H, nw, T', hd]
    x = F.scaled_dot_product_attention(q, k, v)  # 5-D: the math path
    return x.transpose(1, 3).reshape(B, -1, C)  # [B, T' * nw, C]


@functools.lru_cache(maxsize=None)
def flex_module():
    """(compiled ``flex_attention``, ``create_block_mask``); ImportError where this torch has no FlexAttention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # every geometry and dtype is a recompile of the same function: past dynamo's limit it would run eager
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))
    return torch.compile(flex_attention, dynamic=False), create_block_mask


@functools.lru_cache(maxsize=8)
def _window_mask(num_windows: int, q_len: int, kv_len: int, device: str):
    create_block_mask = flex_module()[1]

    def same_window(b, h, q_idx, kv_idx):
        return q_idx % num_windows == kv_idx % num_windows

    return create_block_mask(same_window, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def flex(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """FlexAttention straight on the unrolled layout: a token's window is ``row % num_windows``."""
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    q, k, v = qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd], strided views
    if q_stride > 1:
        q = q.reshape(B, num_heads, q_stride, N // q_stride, head_dim).max(dim=2).values  # [B, H, N', hd]
    mask = None if num_windows == 1 else _window_mask(num_windows, q.shape[2], N, str(qkv.device))
    x = flex_module()[0](q, k, v, block_mask=mask)  # [B, H, N', hd]
    return x.transpose(1, 2).reshape(B, -1, C)
