"""transformers' SAM 2 vision backbone (``transformers.models.sam2.modeling_sam2``): ``Sam2MultiScaleAttention``.

Covers ``Sam2HieraDetModel`` and the models that hold it (``Sam2VisionModel.backbone``,
``Sam2Model.vision_encoder.backbone``). transformers' attention first forms a softmax it never uses (``(q * scale) @
k^T`` over ``[B', h*w, heads, heads]``, in every attention mode) and then the attention proper through its
``config._attn_implementation`` (eager: an explicit fp32 softmax); patched, it runs only
:func:`hiera_fast.sam2.attention.window_attention` (4-D SDPA on views), the function the fused kernels will replace.
``Sam2MultiScaleBlock`` keeps transformers' forward, so the block role applies to no module.
"""

from __future__ import annotations

import torch

from ..sam2 import attention
from . import core

_FLAGS = {"output_attentions", "output_hidden_states"}  # what Sam2HieraDetModel hands its blocks: read by its hooks


def attention_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``Sam2MultiScaleAttention.forward``: ``[B', h, w, dim]`` → ``[B', h // q, w // q, dim_out]`` through
    :func:`~hiera_fast.sam2.attention.window_attention` (the output is the one tensor transformers returns, so its
    output recording is unchanged). A keyword other than the output flags runs transformers' forward."""
    if set(kwargs) - _FLAGS:
        return core.original(self, "forward")(hidden_states, **kwargs)
    LIBRARY.check(self, LIBRARY.attention)
    stride = self.query_stride  # transformers' max_pool2d kernel and stride: None, an int or a pair
    if stride is not None:
        pair = tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)
        if len(pair) != 2 or pair[0] != pair[1]:
            return core.original(self, "forward")(hidden_states, **kwargs)
        stride = int(pair[0])
    return self.proj(attention.window_attention(self.qkv(hidden_states), self.num_attention_heads, stride))


def block_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``Sam2MultiScaleBlock.forward`` as transformers has it (blocks are not patched yet)."""
    return core.original(self, "forward")(hidden_states, **kwargs)


LIBRARY = core.register(core.Library(
    name="transformers_sam2",
    module="transformers.models.sam2.modeling_sam2",
    distribution="transformers",
    attention=core.Role("Sam2MultiScaleAttention", attrs=("qkv", "proj", "num_attention_heads", "query_stride"),
                        forward=attention_forward, tag="hiera_fast: window attention"),
    block=core.Role("Sam2MultiScaleBlock",
                    attrs=("layer_norm1", "attn", "layer_norm2", "mlp", "window_size", "query_stride"),
                    forward=block_forward, tag="hiera_fast: block", applies=lambda block: False),
))


def patch_transformers_sam2() -> None:
    """Patch transformers' ``Sam2MultiScaleAttention`` class (every instance, built before or after) until
    :func:`unpatch_transformers_sam2`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention=True, pooling=False)


def unpatch_transformers_sam2() -> None:
    """Undo :func:`patch_transformers_sam2` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
