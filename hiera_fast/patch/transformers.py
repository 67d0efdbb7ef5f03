"""transformers' Hiera (``transformers.models.hiera.modeling_hiera``): ``HieraMaskUnitAttention`` and ``HieraLayer``.

Covers HieraModel, HieraForImageClassification, HieraForPreTraining (encoder and decoder) and HieraBackbone, which
all build their blocks from these two classes, in transformers 4.x (whose forwards also take a ``head_mask``: a call
with one runs the original) and 5.x. transformers never imports here: the library is imported lazily by
:func:`patch_transformers` only.
"""

from __future__ import annotations

import torch

from .. import ops
from . import core


def _output_attentions(args: tuple, kwargs: dict) -> bool | None:
    """A call's ``output_attentions``, read alike from both signatures of ``HieraMaskUnitAttention.forward`` and
    ``HieraLayer.forward``: 4.x ``(hidden_states, head_mask=None, output_attentions=False)``, whose layers call
    ``attn(x, head_mask, output_attentions=...)`` and ``layer(x, layer_head_mask, output_attentions=...)``; 5.x
    ``(hidden_states, output_attentions=False)``. None where only the original forward serves the call: a head mask,
    a positional argument that is not None (its meaning depends on the version) or an argument neither version has."""
    if len(args) > 1 or any(arg is not None for arg in args) or kwargs.get("head_mask") is not None:
        return None
    if set(kwargs) - {"head_mask", "output_attentions"}:
        return None
    return bool(kwargs.get("output_attentions", False))


def attention_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """``HieraMaskUnitAttention.forward`` on the fused kernel; returns ``(out, None)``. The attention weights are
    never formed, so ``output_attentions=True`` (or a head mask, or an argument we do not know) runs the original."""
    if _output_attentions(args, kwargs) is not False:
        return core.original(self, "forward")(hidden_states, *args, **kwargs)
    LIBRARY.check(self, LIBRARY.attention)
    return core.fused_attention(self, hidden_states, self.num_heads, self.query_stride), None


def layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """``HieraLayer.forward`` with the pooled residual on the fused max-pool; the rest as transformers writes it. A
    head mask (transformers 4.x) or an argument we do not know runs the original."""
    output_attentions = _output_attentions(args, kwargs)
    if output_attentions is None:
        return core.original(self, "forward")(hidden_states, *args, **kwargs)
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


def _fused_pool(layer) -> bool:
    """The layer pools its residual with a stride > 1 (a stride of 1 is a no-op, and no kernel runs)."""
    return _pools(layer) and layer.query_stride > 1


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
                    forward=layer_forward, tag="hiera_fast: fused pooled residual", applies=_fused_pool,
                    needs=lambda layer: ("proj",) if _pools(layer) else ()),
))


def patch_transformers(*, attention: bool = True, pooling: bool = True) -> None:
    """Patch transformers' Hiera classes (every instance, built before or after, runs the fused kernels) until
    :func:`unpatch_transformers`. Patching twice is a no-op."""
    core.patch_library(LIBRARY, attention, pooling)


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers` (a no-op if not patched)."""
    core.unpatch_library(LIBRARY)
