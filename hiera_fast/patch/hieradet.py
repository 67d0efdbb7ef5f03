"""What the four SAM 2 trunks' patched blocks share: a windowed block's attention on the fused BHWC kernels.

A library's windowed ``MultiScaleBlock`` pads the normed map, partitions it into windows, runs its attention module
on them and puts the (pooled) windows back; patched, the block runs its attention module's ``qkv`` Linear on the
unpadded map, :func:`hiera_fast.ops.window_attention` (``fused=True``: padding, partition, query pooling and
unpartition inside the kernels, the Linear's bias standing for the padded tokens) and the module's ``proj``; its
residual, MLP, layer scale and drop paths stay the library's own modules. Global blocks keep their library's block
forward (their attention patched to SDPA on views).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


def square(value) -> int | None:
    """``value`` as one int if it is an int or an equal pair (a window or a stride), else None."""
    if isinstance(value, (tuple, list)):
        return int(value[0]) if len(value) == 2 and value[0] == value[1] else None
    return None if value is None else int(value)


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks of its own (a fused block that skipped it would skip them): such a block
    runs its library's forward, which calls the module."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def fused_window_attention(attn: nn.Module, x: torch.Tensor, num_heads: int, window_size: int,
                           q_stride: int | None) -> torch.Tensor:
    """``attn.proj(window_attention(attn.qkv(x), attn.qkv.bias, ...))``: the normed map ``x [B, H, W, dim]`` →
    ``[B, H // q, W // q, dim_out]``, what the library's partition → attention → unpartition → crop returns."""
    qkv = attn.qkv(x)  # [B, H, W, 3 * dim_out]
    out = ops.window_attention(qkv, attn.qkv.bias, num_heads, window_size, q_stride or 1, fused=True)
    return attn.proj(out)
