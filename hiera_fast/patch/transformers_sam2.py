"""transformers' SAM 2 vision backbone (``transformers.models.sam2.modeling_sam2``): ``Sam2MultiScaleBlock``
and ``Sam2MultiScaleAttention``.

Covers ``Sam2HieraDetModel`` and the models that hold it (``Sam2VisionModel.backbone``,
``Sam2Model.vision_encoder.backbone``). transformers' attention first forms a softmax it never uses (``(q * scale) @
k^T`` over ``[B', h*w, heads, heads]``, in every attention mode) and then the attention proper through its
``config._attn_implementation`` (eager: an explicit fp32 softmax); patched, a windowed
``Sam2MultiScaleBlock`` runs its attention on the fused BHWC kernels (:mod:`.hieradet`), and a global block's
attention only :func:`hiera_fast.sam2.attention.window_attention` (4-D SDPA on views). With
``output_attentions=True`` transformers records each attention module's output by a hook: the blocks then run
transformers' block forward (through the patched attention), so the recorded outputs are there (the hook stays
installed after such a call but records nothing without the flag; the blocks are fused again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sam2 import attention
from . import core, hieradet

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


def _attention_observed(attn) -> bool:
    """Whether something watches the attention module's output now: transformers' output-capturing hook (installed
    once, then kept) while ``output_attentions=True`` collects attentions, or any other hook."""
    hooks = [*attn._forward_hooks.values(), *attn._forward_pre_hooks.values()]
    if not hooks:
        return False
    if any(getattr(hook, "__name__", "") != "output_capturing_hook" for hook in hooks):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers: assume it records
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _stride(block) -> int | None:
    return hieradet.square(block.query_stride)


def _runs_fused(block) -> bool:
    """A windowed block with no query pooling or a square one."""
    return block.window_size > 0 and (block.query_stride is None or _stride(block) is not None)


def block_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``Sam2MultiScaleBlock.forward`` with a windowed block's partition → attention → unpartition on the fused
    kernels; the pooled residual, norms and MLP are transformers' own modules. Global blocks, a keyword other than
    the output flags and an attention module with hooks (``output_attentions``) run transformers' forward."""
    if not _runs_fused(self) or set(kwargs) - _FLAGS or _attention_observed(self.attn):
        return core.original(self, "forward")(hidden_states, **kwargs)
    LIBRARY.check(self, LIBRARY.block)
    residual = hidden_states  # [B, H, W, dim]
    hidden_states = self.layer_norm1(hidden_states)
    stride = _stride(self)
    if self.dim != self.dim_out:
        residual = self.proj(hidden_states)
        if stride is not None:
            residual = F.max_pool2d(residual.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)
    out = hieradet.fused_window_attention(self.attn, hidden_states, self.attn.num_attention_heads, self.window_size,
                                          stride)
    hidden_states = residual + out
    return hidden_states + self.mlp(self.layer_norm2(hidden_states))


LIBRARY = core.register(core.Library(
    name="transformers_sam2",
    module="transformers.models.sam2.modeling_sam2",
    distribution="transformers",
    attention=core.Role("Sam2MultiScaleAttention", attrs=("qkv", "proj", "num_attention_heads", "query_stride"),
                        forward=attention_forward, tag="hiera_fast: window attention"),
    block=core.Role("Sam2MultiScaleBlock",
                    attrs=("layer_norm1", "attn", "layer_norm2", "mlp", "window_size", "query_stride", "dim",
                           "dim_out"),
                    forward=block_forward, tag="hiera_fast: fused window attention", applies=_runs_fused,
                    needs=lambda block: ("proj",) if block.dim != block.dim_out else ()),
    block_with_attention=True,
))


def patch_transformers_sam2() -> None:
    """Patch transformers' ``Sam2MultiScaleBlock`` and ``Sam2MultiScaleAttention`` classes
    (every instance, built before or after) until :func:`unpatch_transformers_sam2`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention=True, pooling=False)


def unpatch_transformers_sam2() -> None:
    """Undo :func:`patch_transformers_sam2` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
