"""timm's SAM 2 Hiera (``timm.models.hieradet_sam2``, ``sam2_hiera_*``): ``MultiScaleBlock`` and
``MultiScaleAttention``.

A windowed ``MultiScaleBlock`` (square window) runs its attention on the fused BHWC kernels (:mod:`.hieradet`), with
timm's own layer scale, drop paths, pooled residual and MLP; a global block keeps timm's forward and its
``MultiScaleAttention`` runs :func:`hiera_fast.sam2.attention.window_attention` (4-D SDPA on views; timm's own is too,
or an explicit softmax where ``use_fused_attn()`` is off). timm's ``MultiScaleBlock`` / ``MultiScaleAttention``
names are also MViTv2's and CrossViT's: this library is matched by class only (``match_by_name=False``).
"""

from __future__ import annotations

import torch

from ..sam2 import attention
from . import core, hieradet


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleAttention.forward``: ``[B', h, w, dim]`` → ``[B', h // q, w // q, dim_out]`` through
    :func:`~hiera_fast.sam2.attention.window_attention`. A query pool other than ``MaxPool2d(q, q)`` runs timm's."""
    LIBRARY.check(self, LIBRARY.attention)
    if not attention.is_plain_pool(self.q_pool):
        return core.original(self, "forward")(x)
    out = attention.window_attention(self.qkv(x), self.num_heads, attention.pool_stride(self.q_pool))
    return self.proj(out)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleBlock.forward`` with a windowed block's pad → partition → attention → unpartition → crop on the
    fused kernels; the pooled residual (``proj`` then ``pool``), layer scales, drop paths and MLP are timm's own
    modules. Global blocks, other windows or query pools and an attention module with hooks run timm's forward."""
    window = hieradet.square(self.window_size)
    if not hieradet.runs_fused(self, window) or hieradet.hooked(self.attn):
        return core.original(self, "forward")(x)
    LIBRARY.check(self, LIBRARY.block)
    x_norm = self.norm1(x)
    attn = self.attn
    out = hieradet.fused_window_attention(attn, x_norm, attn.num_heads, window, attention.pool_stride(attn.q_pool))
    x = hieradet.pooled_shortcut(self, x, x_norm) + self.drop_path1(self.ls1(out))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


LIBRARY = core.register(core.Library(
    name="timm_sam2",
    module="timm.models.hieradet_sam2",
    distribution="timm",
    attention=core.Role("MultiScaleAttention", attrs=("qkv", "proj", "num_heads", "q_pool"),
                        forward=attention_forward, tag="hiera_fast: window attention"),
    block=core.Role("MultiScaleBlock",
                    attrs=("norm1", "attn", "norm2", "mlp", "window_size", "q_stride", "dim", "dim_out", "pool",
                           "proj", "ls1", "ls2", "drop_path1", "drop_path2"),
                    forward=block_forward, tag="hiera_fast: fused window attention",
                    applies=lambda block: hieradet.runs_fused(block, hieradet.square(block.window_size))),
    match_by_name=False,
    block_with_attention=True,
))


def patch_timm_sam2() -> None:
    """Patch timm's ``hieradet_sam2.MultiScaleBlock`` and ``MultiScaleAttention`` classes
    (every instance, built before or after) until :func:`unpatch_timm_sam2`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention=True, pooling=False)


def unpatch_timm_sam2() -> None:
    """Undo :func:`patch_timm_sam2` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
