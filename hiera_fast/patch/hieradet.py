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
from ..sam2 import attention
from . import core


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


def runs_fused(block: nn.Module, window: int | None) -> bool:
    """Whether a block with (square) ``window`` (0 or None: global) runs fused: windowed, its attention's query pool
    ``MaxPool2d(q, q)`` (or none) with the block's own ``q_stride``."""
    q_pool = block.attn.q_pool
    return (bool(window) and attention.is_plain_pool(q_pool)
            and attention.pool_stride(q_pool) == square(block.q_stride))


def pooled_shortcut(block: nn.Module, x: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """The official block's residual: ``x``, or where the width changes ``proj(x_norm)`` max-pooled by the block's
    own ``pool`` (``[B, H // q, W // q, dim_out]``)."""
    if block.dim == block.dim_out:
        return x
    shortcut = block.proj(x_norm)
    return shortcut if block.pool is None else block.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def official_block_forward(library: core.Library, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official ``MultiScaleBlock.forward`` (ultralytics' is a copy) with a windowed block's partition →
    attention → unpartition on the fused kernels; its residual, drop path and MLP are the library's own modules.
    Global blocks, other query pools and an attention module with hooks run the library's forward."""
    if not runs_fused(block, block.window_size) or hooked(block.attn):
        return core.original(block, "forward")(x)
    library.check(block, library.block)
    x_norm = block.norm1(x)
    attn = block.attn
    out = fused_window_attention(attn, x_norm, attn.num_heads, block.window_size, attention.pool_stride(attn.q_pool))
    x = pooled_shortcut(block, x, x_norm) + block.drop_path(out)
    return x + block.drop_path(block.mlp(block.norm2(x)))
