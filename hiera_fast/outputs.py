"""Model outputs, with transformers' field names and shapes. Each is a registered pytree node (a dataclass whose unset
fields are None), so ``torch.export.export`` and ``torch.compile`` take a model that returns one."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class _Output:
    """Attribute access plus tuple-style indexing over the fields that are set (like transformers' ModelOutput)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class HieraModelOutput(_Output):
    """last_hidden_state ``[B, N_last, C_last]`` (unrolled order, visible windows only when masked);
    pooler_output ``[B, C_last]`` (mean + LayerNorm, absent in MAE mode); bool_masked_pos ``[B, #MUs]`` (True =
    visible); ids_restore ``[B, #MUs]``; hidden_states: embeddings + each stage's output ``[B, N_s, C_s]``;
    reshaped_hidden_states: the same rerolled to ``[B, *spatial, C_s]`` (masked: ``[B, #kept, *mu_shape, C_s]``)."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    ids_restore: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class HieraForImageClassificationOutput(_Output):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class HieraForPreTrainingOutput(_Output):
    """loss: normalized-pixel MSE on masked patches; logits ``[B, L, pred_stride**2 * C_in]`` for every prediction
    token (spatial order); bool_masked_pos ``[B, L]`` at prediction resolution (True = visible), as transformers."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    ids_restore: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BackboneOutput(_Output):
    """feature_maps: one ``[B, C, *spatial]`` map per ``config.out_features`` entry, in spatial order."""

    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


for _cls in (HieraModelOutput, HieraForImageClassificationOutput, HieraForPreTrainingOutput, BackboneOutput):
    torch.export.register_dataclass(_cls, serialized_type_name=f"hiera_fast.{_cls.__name__}")
