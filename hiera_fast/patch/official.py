"""The official ``hiera`` package (PyPI ``hiera-transformer``): ``hiera.hiera.MaskUnitAttention`` and ``HieraBlock``.

Covers ``Hiera`` and ``MaskedAutoencoderHiera`` (encoder and decoder blocks), image and video. Only attention and
blocks are patched, so the rest is the package's own (e.g. its ``Head`` still applies softmax in eval).
"""

from __future__ import annotations

import torch

from .. import ops
from . import core


def attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``MaskUnitAttention.forward`` on the fused kernel."""
    LIBRARY.check(self, LIBRARY.attention)
    return core.fused_attention(self, x, self.heads, self.q_stride)


def block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``HieraBlock.forward`` with ``do_pool(proj(x_norm))`` on the fused max-pool; the rest as the package has it."""
    LIBRARY.check(self, LIBRARY.block)
    x_norm = self.norm1(x)
    if self.dim != self.dim_out:
        x = ops.unrolled_max_pool(self.proj(x_norm), self.attn.q_stride, fused=True)  # [B, N // q_stride, dim_out]
    x = x + self.drop_path(self.attn(x_norm))
    return x + self.drop_path(self.mlp(self.norm2(x)))


def _pools(block) -> bool:
    return block.dim != block.dim_out


def _fused_pool(block) -> bool:
    """The block pools its residual with a stride > 1 (a stride of 1 is a no-op, and no kernel runs)."""
    return _pools(block) and block.attn.q_stride > 1


LIBRARY = core.register(core.Library(
    name="official",
    module="hiera.hiera",
    distribution="hiera-transformer",
    attention=core.Role("MaskUnitAttention",
                        attrs=("qkv", "proj", "heads", "q_stride", "window_size", "use_mask_unit_attn"),
                        forward=attention_forward, tag="hiera_fast: fused attention"),
    block=core.Role("HieraBlock", attrs=("norm1", "attn", "norm2", "mlp", "drop_path", "dim", "dim_out"),
                    forward=block_forward, tag="hiera_fast: fused pooled residual", applies=_fused_pool,
                    needs=lambda block: ("proj",) if _pools(block) else ()),
))


def patch_official(*, attention: bool = True, pooling: bool = True) -> None:
    """Patch the official package's ``MaskUnitAttention`` / ``HieraBlock`` classes until :func:`unpatch_official`."""
    core.patch_library(LIBRARY, attention, pooling)


def unpatch_official() -> None:
    """Undo :func:`patch_official` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
