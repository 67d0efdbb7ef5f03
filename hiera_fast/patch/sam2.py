"""The official ``sam2`` package's Hiera trunk (``sam2.modeling.backbones.hieradet``): ``MultiScaleBlock`` and
``MultiScaleAttention``.

A windowed ``MultiScaleBlock`` runs its attention on the fused BHWC kernels (:mod:`.hieradet`: no padded or
partitioned copies); a global block keeps the package's forward and its ``MultiScaleAttention`` (already 4-D SDPA on
views) runs :func:`hiera_fast.sam2.attention.window_attention`, the same math without the package's reshapes.
"""

from __future__ import annotations

import torch

from ..sam2 import attention
from . import core, hieradet


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleAttention.forward``: ``[B', h, w, dim]`` → ``[B', h // q, w // q, dim_out]`` through
    :func:`~hiera_fast.sam2.attention.window_attention`. A query pool other than ``MaxPool2d(q, q)`` runs the
    package's forward."""
    LIBRARY.check(self, LIBRARY.attention)
    if not attention.is_plain_pool(self.q_pool):
        return core.original(self, "forward")(x)
    out = attention.window_attention(self.qkv(x), self.num_heads, attention.pool_stride(self.q_pool))
    return self.proj(out)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleBlock.forward`` with a windowed block on the fused kernels
    (:func:`~hiera_fast.patch.hieradet.official_block_forward`); global blocks run the package's forward."""
    return hieradet.official_block_forward(LIBRARY, self, x)


LIBRARY = core.register(core.Library(
    name="sam2",
    module="sam2.modeling.backbones.hieradet",
    distribution="sam2",
    attention=core.Role("MultiScaleAttention", attrs=("qkv", "proj", "num_heads", "q_pool"),
                        forward=attention_forward, tag="hiera_fast: window attention"),
    block=core.Role("MultiScaleBlock",
                    attrs=("norm1", "attn", "norm2", "mlp", "window_size", "q_stride", "dim", "dim_out", "pool",
                           "drop_path"),
                    forward=block_forward, tag="hiera_fast: fused window attention",
                    applies=lambda block: hieradet.runs_fused(block, block.window_size),
                    needs=lambda block: ("proj",) if block.dim != block.dim_out else ()),
    block_with_attention=True,
))


def patch_sam2() -> None:
    """Patch the official package's ``MultiScaleBlock`` and ``MultiScaleAttention`` classes (every instance, built
    before or after) until :func:`unpatch_sam2`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention=True, pooling=False)


def unpatch_sam2() -> None:
    """Undo :func:`patch_sam2` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
