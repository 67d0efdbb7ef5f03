"""ultralytics' SAM 2 Hiera trunk (``ultralytics.models.sam.modules.encoders.Hiera``, whose blocks live in
``ultralytics.models.sam.modules.blocks``): ``MultiScaleAttention``, a copy of the official one.

Its attention (already 4-D SDPA on views) runs :func:`hiera_fast.sam2.attention.window_attention`, the function the
fused kernels will replace; for now that is the same eager math. ``MultiScaleBlock`` (window partition, pooled
residual, MLP) keeps ultralytics' own forward, so the block role applies to no module.
"""

from __future__ import annotations

import torch

from ..sam2 import attention
from . import core


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleAttention.forward``: ``[B', h, w, dim]`` → ``[B', h // q, w // q, dim_out]`` through
    :func:`~hiera_fast.sam2.attention.window_attention`. A query pool other than ``MaxPool2d(q, q)`` runs
    ultralytics' forward."""
    LIBRARY.check(self, LIBRARY.attention)
    if not attention.is_plain_pool(self.q_pool):
        return core.original(self, "forward")(x)
    out = attention.window_attention(self.qkv(x), self.num_heads, attention.pool_stride(self.q_pool))
    return self.proj(out)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MultiScaleBlock.forward`` as ultralytics has it (blocks are not patched yet)."""
    return core.original(self, "forward")(x)


LIBRARY = core.register(core.Library(
    name="ultralytics_sam2",
    module="ultralytics.models.sam.modules.blocks",
    distribution="ultralytics",
    attention=core.Role("MultiScaleAttention", attrs=("qkv", "proj", "num_heads", "q_pool"),
                        forward=attention_forward, tag="hiera_fast: window attention"),
    block=core.Role("MultiScaleBlock", attrs=("norm1", "attn", "norm2", "mlp", "window_size", "q_stride"),
                    forward=block_forward, tag="hiera_fast: block", applies=lambda block: False),
))


def patch_ultralytics_sam2() -> None:
    """Patch ultralytics' ``MultiScaleAttention`` class (every instance, built before or after) until
    :func:`unpatch_ultralytics_sam2`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention=True, pooling=False)


def unpatch_ultralytics_sam2() -> None:
    """Undo :func:`patch_ultralytics_sam2` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
