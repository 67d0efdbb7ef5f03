"""timm's Hiera (``timm.models.hiera``): ``MaskUnitAttention`` and ``HieraBlock``.

timm's block adds layer scale (``ls1``/``ls2``) and two drop paths, and with ``use_expand_proj=False`` pools the
residual as ``cat(max, mean)`` with no projection: that case keeps timm's own forward. timm's ``hieradet_sam2``
(SAM 2's Hiera) has other classes and is not covered.
"""

from __future__ import annotations

import torch

from .. import ops
from . import core


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MaskUnitAttention.forward`` on the fused kernel (windowed and global alike)."""
    LIBRARY.check(self, LIBRARY.attention)
    return core.fused_attention(self, x, self.heads, self.q_stride)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``HieraBlock.forward`` with the projected max-pool residual on the fused max-pool."""
    LIBRARY.check(self, LIBRARY.block)
    if self.do_expand and self.proj is None:  # cat(max-pool, avg-pool): timm's own forward
        return core.original(self, "forward")(x)
    x_norm = self.norm1(x)
    if self.do_expand:
        x = ops.unrolled_max_pool(self.proj(x_norm), self.attn.q_stride, fused=True)  # [B, N // q_stride, dim_out]
    x = x + self.drop_path1(self.ls1(self.attn(x_norm)))
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


LIBRARY = core.register(core.Library(
    name="timm",
    module="timm.models.hiera",
    distribution="timm",
    attention=core.Role("MaskUnitAttention",
                        attrs=("qkv", "proj", "heads", "q_stride", "window_size", "use_mask_unit_attn"),
                        forward=attention_forward, tag="hiera_fast: fused attention"),
    block=core.Role("HieraBlock",
                    attrs=("norm1", "attn", "norm2", "mlp", "ls1", "ls2", "drop_path1", "drop_path2", "do_expand",
                           "proj"),
                    forward=block_forward, tag="hiera_fast: fused pooled residual",
                    applies=lambda block: block.do_expand and block.proj is not None and block.attn.q_stride > 1),
))


def patch_timm(*, attention: bool = True, pooling: bool = True) -> None:
    """Patch timm's Hiera ``MaskUnitAttention`` / ``HieraBlock`` classes until :func:`unpatch_timm`."""
    core.patch_library(LIBRARY, attention, pooling)


def unpatch_timm() -> None:
    """Undo :func:`patch_timm` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
