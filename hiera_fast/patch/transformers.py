"""transformers' Hiera (``transformers.models.hiera.modeling_hiera``): ``HieraMaskUnitAttention`` and ``HieraLayer``.

Covers HieraModel, HieraForImageClassification, HieraForPreTraining (encoder and decoder) and HieraBackbone, which
all build their blocks from these two classes. transformers never imports here: the library is imported lazily by
:func:`patch_transformers` only.
"""

from __future__ import annotations

import torch

from .. import ops
from . import core


@core.fused
def attention_forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, **kwargs):
    """``HieraMaskUnitAttention.forward`` on the fused kernel; returns ``(out, None)``. The attention weights are
    never formed, so ``output_attentions=True`` (or an argument this version does not know) runs the original."""
    if output_attentions or kwargs:
        return core.original(self, "forward")(hidden_states, output_attentions=output_attentions, **kwargs)
    LIBRARY.check(self, LIBRARY.attention)
    return core.fused_attention(self, hidden_states, self.num_heads, self.query_stride), None


@core.fused
def layer_forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, **kwargs):
    """``HieraLayer.forward`` with the pooled residual on the fused max-pool; the rest as transformers writes it."""
    if kwargs:
        return core.original(self, "forward")(hidden_states, output_attentions=output_attentions, **kwargs)
    LIBRARY.check(self, LIBRARY.block)
    hidden_states_norm = self.layernorm_before(hidden_states)
    if self.hidden_size != self.hidden_size_output:
        # [B, N, dim] -> [B, N // query_stride, dim_out]
        hidden_states = ops.unrolled_max_pool(self.proj(hidden_states_norm), self.query_stride, fused=True)
    hidden_states_norm, attn_weights = self.attn(hidden_states_norm, output_attentions=output_attentions)
    hidden_states = hidden_states + self.drop_path(hidden_states_norm)
    residual = hidden_states
    hidden_states = self.mlp(self.layernorm_after(hidden_states))
    return residual + self.drop_path(hidden_states), attn_weights


def _pools(layer) -> bool:
    return layer.hidden_size != layer.hidden_size_output


LIBRARY = core.register(core.Library(
    name="transformers",
    module="transformers.models.hiera.modeling_hiera",
    distribution="transformers",
    attention=core.Role("HieraMaskUnitAttention",
                        attrs=("qkv", "proj", "num_heads", "query_stride", "window_size", "use_mask_unit_attn"),
                        forward=attention_forward, tag="hiera_fast: fused attention"),
    block=core.Role("HieraLayer",
                    attrs=("layernorm_before", "attn", "layernorm_after", "mlp", "drop_path", "hidden_size",
                           "hidden_size_output", "query_stride"),
                    forward=layer_forward, tag="hiera_fast: fused pooled residual", applies=_pools,
                    needs=lambda layer: ("proj",) if _pools(layer) else ()),
))


def patch_transformers(*, attention: bool = True, pooling: bool = True) -> None:
    """Patch transformers' Hiera classes (every instance, built before or after, runs the fused kernels) until
    :func:`unpatch_transformers`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention, pooling)


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
