"""timm's SAM 2 Hiera (``timm.models.hieradet_sam2``, ``sam2_hiera_*``): ``MultiScaleAttention``.

Its attention runs :func:`hiera_fast.sam2.attention.window_attention`, the function the fused kernels will replace;
for now that is the same eager math (timm's own is 4-D SDPA on views too, or an explicit softmax where
``use_fused_attn()`` is off). ``MultiScaleBlock`` (with timm's layer scale and two drop paths) keeps timm's forward, so
the block role applies to no module. timm's ``MultiScaleBlock`` / ``MultiScaleAttention`` names are also MViTv2's and
CrossViT's: this library is matched by class only (``match_by_name=False``).
"""

from __future__ import annotations

import torch

from ..sam2 import attention
from . import core


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleAttention.forward``: ``[B', h, w, dim]`` → ``[B', h // q, w // q, dim_out]`` through
    :func:`~hiera_fast.sam2.attention.window_attention`. A query pool other than ``MaxPool2d(q, q)`` runs timm's."""
    LIBRARY.check(self, LIBRARY.attention)
    if not attention.is_plain_pool(self.q_pool):
        return core.original(self, "forward")(x)
    out = attention.window_attention(self.qkv(x), self.num_heads, attention.pool_stride(self.q_pool))
    return self.proj(out)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleBlock.forward`` as timm has it (blocks are not patched yet)."""
    return core.original(self, "forward")(x)


LIBRARY = core.register(core.Library(
    name="timm_sam2",
    module="timm.models.hieradet_sam2",
    distribution="timm",
    attention=core.Role("MultiScaleAttention", attrs=("qkv", "proj", "num_heads", "q_pool"),
                        forward=attention_forward, tag="hiera_fast: window attention"),
    block=core.Role("MultiScaleBlock", attrs=("norm1", "attn", "norm2", "mlp", "window_size", "q_stride"),
                    forward=block_forward, tag="hiera_fast: block", applies=lambda block: False),
    match_by_name=False,
))


def patch_timm_sam2() -> None:
    """Patch timm's ``hieradet_sam2.MultiScaleAttention`` class (every instance, built before or after) until
    :func:`unpatch_timm_sam2`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention=True, pooling=False)


def unpatch_timm_sam2() -> None:
    """Undo :func:`patch_timm_sam2` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
