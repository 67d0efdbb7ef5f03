"""A minimal, readable Hiera (image and video): encoder, classifier, MAE pretraining and backbone.

Module names follow transformers' Hiera so the state dict *is* the transformers checkpoint format
(``embeddings.*``, ``encoder.stages.{s}.layers.{l}.*``, ``pooler.*``, ``classifier.*``, ``decoder.*``); the
official and timm checkpoints are converted by :mod:`hiera_fast.checkpoints.hiera`. The computation follows the official
``hiera`` package. Attention and the pooled residual go through :mod:`hiera_fast.ops` with ``fused=`` on or off;
this module never imports Triton.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import inputs, losses, ops
from .config import HieraConfig
from .outputs import BackboneOutput, HieraForImageClassificationOutput, HieraForPreTrainingOutput, HieraModelOutput
from .unroll import gather_windows, reroll, scatter_windows, undo_windowing, unroll
from .checkpoints.hiera import PretrainedMixin

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "gelu_new": lambda: nn.GELU("tanh")}


def _conv_nd(dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or with p = 0), as timm's ``DropPath``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"DropPath probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.p
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * (keep / keep_prob if keep_prob > 0 else keep)


# ------------------------------------------------------------------------------------------------ embeddings
class HieraPatchEmbeddings(nn.Module):
    """Conv patch embedding (2-D or 3-D); masked windows are zeroed in the input first (no leakage through the
    overlapping kernel). ``[B, C_in, *size]`` → ``[B, N, C]`` in raster order."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        self.projection = _conv_nd(config.spatial_dims)(
            config.num_channels, config.embed_dim, kernel_size=config.patch_size,
            stride=config.patch_stride, padding=config.patch_padding)

    def forward(self, pixel_values: torch.Tensor, keep_mask: torch.Tensor | None, mask_shape: Sequence[int]):
        if keep_mask is not None:
            mask = keep_mask.view(pixel_values.shape[0], 1, *mask_shape).float()  # [B, 1, *#MUs]
            pixel_values = pixel_values * F.interpolate(mask, size=pixel_values.shape[2:]).to(pixel_values.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class HieraEmbeddings(nn.Module):
    """Patch embedding + absolute position embedding (video: separate spatial and temporal, summed)."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = HieraPatchEmbeddings(config)
        tokens = config.tokens_spatial_shape
        if config.sep_pos_embed:
            self.position_embeddings_spatial = nn.Parameter(torch.zeros(1, tokens[1] * tokens[2], config.embed_dim))
            self.position_embeddings_temporal = nn.Parameter(torch.zeros(1, tokens[0], config.embed_dim))
        else:
            self.position_embeddings = nn.Parameter(torch.zeros(1, math.prod(tokens), config.embed_dim))

    def position_embedding(self, tokens: Sequence[int]) -> torch.Tensor:
        """``[1, prod(tokens), C]`` for a token grid ``tokens``, interpolated if it differs from the config's."""
        base = self.config.tokens_spatial_shape
        C = self.config.embed_dim
        if not self.config.sep_pos_embed:
            pos = self.position_embeddings
            if tuple(tokens) != base:
                mode = "bicubic" if len(base) == 2 else "trilinear"
                pos = pos.reshape(1, *base, C).movedim(-1, 1)
                pos = F.interpolate(pos, size=tuple(tokens), mode=mode, align_corners=False).movedim(1, -1)
                pos = pos.reshape(1, -1, C)
            return pos
        spatial, temporal = self.position_embeddings_spatial, self.position_embeddings_temporal
        if tuple(tokens[1:]) != base[1:]:
            spatial = spatial.reshape(1, *base[1:], C).permute(0, 3, 1, 2)
            spatial = F.interpolate(spatial, size=tuple(tokens[1:]), mode="bicubic", align_corners=False)
            spatial = spatial.permute(0, 2, 3, 1).reshape(1, -1, C)
        if tokens[0] != base[0]:
            temporal = F.interpolate(temporal.transpose(1, 2), size=tokens[0], mode="linear", align_corners=False)
            temporal = temporal.transpose(1, 2)
        # official get_pos_embed: spatial repeated over time + temporal repeated over space
        return spatial.repeat(1, tokens[0], 1) + torch.repeat_interleave(temporal, tokens[1] * tokens[2], dim=1)

    def forward(self, pixel_values, keep_mask, mask_shape, tokens):
        x = self.patch_embeddings(pixel_values, keep_mask, mask_shape)
        return x + self.position_embedding(tokens)


# ------------------------------------------------------------------------------------------------ blocks
class HieraMaskUnitAttention(nn.Module):
    """qkv Linear → :class:`hiera_fast.ops.MaskUnitAttention` (mask-unit or global, query max-pooling) → proj.

    ``fused`` and ``global_attention`` set the op's route (decided once per device and dtype, then cached on the op:
    :attr:`op`'s ``routes``)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, query_stride: int = 1, window_size: int = 0,
                 use_mask_unit_attn: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.query_stride = query_stride
        self.window_size = window_size
        self.use_mask_unit_attn = use_mask_unit_attn
        self.op = ops.MaskUnitAttention(num_heads, query_stride, window_size, use_mask_unit_attn)
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    @property
    def fused(self) -> bool:
        return self.op.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.set_route(fused=value)

    def set_route(self, fused: bool | None = None, global_attention: str | None = "keep") -> None:
        """A new op with ``fused`` and/or ``global_attention`` changed (its routes are decided afresh)."""
        op = self.op
        self.op = ops.MaskUnitAttention(
            self.num_heads, self.query_stride, self.window_size, self.use_mask_unit_attn,
            fused=op.fused if fused is None else fused,
            global_attention=op.global_attention if global_attention == "keep" else global_attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.op(self.qkv(x)))  # [B, N, dim] -> [B, N // q_stride, dim_out]

    def extra_repr(self) -> str:
        kind = f"mask-unit (window {self.window_size})" if self.use_mask_unit_attn else "global"
        return f"heads={self.num_heads}, q_stride={self.query_stride}, {kind}, fused={self.fused}"


class HieraMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; choose from {sorted(_ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden)
        self.activation_fn = _ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class HieraLayer(nn.Module):
    """One Hiera block: ``x_norm = norm(x)``; if the dim changes, the residual is ``max_pool(proj(x_norm))``;
    ``x = x + attn(x_norm)``; ``x = x + mlp(norm(x))``."""

    def __init__(self, config: HieraConfig, dim: int, dim_out: int, num_heads: int, drop_path: float = 0.0,
                 query_stride: int = 1, window_size: int = 0, use_mask_unit_attn: bool = False):
        super().__init__()
        self.dim, self.dim_out, self.query_stride = dim, dim_out, query_stride
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = HieraMaskUnitAttention(dim, dim_out, num_heads, query_stride, window_size, use_mask_unit_attn)
        self.layernorm_after = nn.LayerNorm(dim_out, eps=config.layer_norm_eps)
        self.mlp = HieraMlp(dim_out, int(dim_out * config.mlp_ratio), config.hidden_act)
        self.drop_path = DropPath(drop_path)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.layernorm_before(x)
        if self.dim != self.dim_out:
            x = ops.unrolled_max_pool(self.proj(x_norm), self.query_stride, fused=self.attn.fused)
        x = x + self.drop_path(self.attn(x_norm))
        return x + self.drop_path(self.mlp(self.layernorm_after(x)))


class HieraStage(nn.Module):
    """A stage's layers in order. With ``gradient_checkpointing`` (set on the encoder's stages by
    :meth:`HieraPreTrainedModel.gradient_checkpointing_enable`), training forwards that record gradients keep only
    each layer's input and run the layer again in the backward (``torch.utils.checkpoint`` with
    ``checkpoint_kwargs``, non-reentrant unless they say otherwise; the RNG state is replayed, so drop path draws
    the same samples)."""

    gradient_checkpointing = False  # class defaults: a stage pickled before these attributes existed loads too
    checkpoint_kwargs: dict = {}

    def __init__(self, layers: list[HieraLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            for layer in self.layers:
                x = layer(x)
            return x
        kwargs = {"use_reentrant": False, **self.checkpoint_kwargs}
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, **kwargs)
        return x


def _encoder_stages(config: HieraConfig) -> list[HieraStage]:
    """The official block schedule: dims/heads change at stage starts, q-pooling in the first block of the first
    ``num_query_pool`` stages, and a stage's first block keeps the *previous* stage's attention kind (the lag)."""
    dpr = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
    window = config.flat_mask_unit_size
    dims = config.stage_dims
    stages, i = [], 0
    for s, depth in enumerate(config.depths):
        layers = []
        for j in range(depth):
            first = j == 0 and s > 0
            pools = first and s <= config.num_query_pool
            if pools:
                window //= config.flat_query_stride
            layers.append(HieraLayer(
                config, dim=dims[s - 1] if first else dims[s], dim_out=dims[s], num_heads=config.num_heads[s],
                drop_path=dpr[i], query_stride=config.flat_query_stride if pools else 1, window_size=window,
                use_mask_unit_attn=config.masked_unit_attention[s - 1 if first else s]))
            i += 1
        stages.append(HieraStage(layers))
    return stages


class HieraEncoder(nn.Module):
    def __init__(self, config: HieraConfig):
        super().__init__()
        self.stages = nn.ModuleList(_encoder_stages(config))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns every stage's output ``[B, N_s, C_s]`` in unrolled order."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


# ------------------------------------------------------------------------------------------------ shared base
class HieraPreTrainedModel(PretrainedMixin, nn.Module):
    """Common pieces: the ``fused`` switch, weight init, and input checks."""

    config: HieraConfig

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (``pixel_values`` must have it outside autocast)."""
        return next(self.parameters()).dtype

    @property
    def fused(self) -> bool:
        flags = {m.fused for m in self.modules() if isinstance(m, HieraMaskUnitAttention)}
        return flags == {True}

    @fused.setter
    def fused(self, value: bool) -> None:
        value = ops.check_flag("fused", value)  # a bool (or 0 / 1): the string "False" is a TypeError, not True
        for m in self.modules():
            if isinstance(m, HieraMaskUnitAttention):
                m.fused = value

    @property
    def global_attention(self) -> str | None:
        """What ``fused=True`` runs for global attention (one window): "sdpa" (PyTorch's SDPA on views of qkv, on any
        device), "triton" (our kernels), or None (the default of :func:`hiera_fast.ops.set_global_attention`: SDPA on
        CUDA, our kernels elsewhere). Set it to choose for this model's blocks."""
        choices = {m.op.global_attention for m in self.modules() if isinstance(m, HieraMaskUnitAttention)}
        return choices.pop() if len(choices) == 1 else None

    @global_attention.setter
    def global_attention(self, backend: str | None) -> None:
        for m in self.modules():
            if isinstance(m, HieraMaskUnitAttention):
                m.set_route(global_attention=backend)

    def fused_routes(self) -> dict[str, dict]:
        """Each attention block's routes decided so far (on its first call per device and dtype):
        ``{block name: {(device, dtype, head_dim, global call, default global choice): Route}}``."""
        return {name: dict(m.op.routes) for name, m in self.named_modules() if isinstance(m, HieraMaskUnitAttention)}

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder layer in the backward instead of keeping its activations (training only): less
        memory, one more forward of the encoder per step. Fused or not, under ``torch.compile`` too. The MAE decoder
        is not checkpointed. ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
        (default ``use_reentrant=False``), as in transformers (whose Trainer passes them)."""
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(f"gradient_checkpointing_kwargs must be a dict or None, got "
                            f"{type(gradient_checkpointing_kwargs).__name__}")
        self._set_gradient_checkpointing(True, dict(gradient_checkpointing_kwargs or {}))

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False, {})

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(stage.gradient_checkpointing for stage in self._encoder_stages())

    def _encoder_stages(self) -> list[HieraStage]:
        return [stage for m in self.modules() if isinstance(m, HieraEncoder) for stage in m.stages]

    def _set_gradient_checkpointing(self, value: bool, kwargs: dict) -> None:
        for stage in self._encoder_stages():
            stage.gradient_checkpointing, stage.checkpoint_kwargs = value, kwargs

    def _init_weights(self) -> None:
        """transformers' initialisation (truncated normal, biases = initializer_range)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.constant_(m.bias, std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, std)
                nn.init.constant_(m.weight, self.config.layer_norm_init)
        for name, p in self.named_parameters():
            if "position_embeddings" in name or name.endswith("mask_token"):
                nn.init.trunc_normal_(p, std=std)


def stage_geometry(config: HieraConfig, tokens: Sequence[int], stage: int) -> tuple[list[int], list]:
    """Token grid and remaining unroll schedule of stage ``stage``'s output (0-based; the stem is stage 0 too)."""
    pools = min(stage, config.num_query_pool)
    size = [t // q**pools for t, q in zip(tokens, config.query_stride)]
    return size, [config.query_stride] * (len(config.depths) - 1 - pools)


# ------------------------------------------------------------------------------------------------ models
class HieraModel(HieraPreTrainedModel):
    """The Hiera encoder: embeddings → unroll → (drop masked windows) → stages → mean-pool + LayerNorm.

    ``is_mae=True`` masks a random ``config.mask_ratio`` of the mask units (``noise`` makes it reproducible), as
    transformers' MAE encoder; ``bool_masked_pos`` (True = visible) masks explicitly, as the official ``mask=``, with
    any number of visible units (the same in every sample). Masking needs :attr:`HieraConfig.supports_masking`.

    Shapes: with ``noise`` or no mask they never depend on data. With ``bool_masked_pos`` the output has as many
    tokens as the mask keeps, which is read from the mask (a device-to-host sync) unless ``keep_ids`` is passed too;
    ``torch.compile(fullgraph=True)`` needs ``keep_ids`` (HieraForPreTraining passes them).
    """

    _checkpoint_prefix = ""

    def __init__(self, config: HieraConfig, fused: bool = False, *, add_pooling_layer: bool = True,
                 is_mae: bool = False):
        super().__init__()
        if is_mae:
            inputs.check_masking(config, "HieraModel(is_mae=True)")
        self.config, self.is_mae = config, is_mae
        self.embeddings = HieraEmbeddings(config)
        self.encoder = HieraEncoder(config)
        if add_pooling_layer:
            self.pooler = nn.Module()
            self.pooler.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.pooler = None
        self._init_weights()
        self.fused = fused

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                bool_masked_pos: torch.Tensor | None = None, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False, return_dict: bool = True, *,
                keep_ids: torch.Tensor | None = None, check_keep_ids: bool = True):
        """``keep_ids`` (``[B, K]`` ascending visible-window ids of ``bool_masked_pos``, e.g.
        ``torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]``) fixes K without reading it off the
        mask; in eager mode they are checked against the mask, which reads the result on the host (a device-to-host
        sync that stalls a GPU training loop) unless ``check_keep_ids=False`` (for ids made from that mask, as
        HieraForPreTraining does)."""
        config = self.config
        tokens = inputs.check_pixels(config, pixel_values, interpolate_pos_encoding, self.dtype)
        mask_shape = [t // mu for t, mu in zip(tokens, config.masked_unit_size)]
        num_windows, B = math.prod(mask_shape), pixel_values.shape[0]
        ids_restore = None
        if keep_ids is not None and bool_masked_pos is None:
            raise ValueError("keep_ids needs the bool_masked_pos it was taken from")
        if noise is not None and not self.is_mae:
            raise ValueError("noise drives the random masking of an MAE encoder (is_mae=True); this one has none")
        if noise is not None and bool_masked_pos is not None:
            raise ValueError("pass noise (random masking) or bool_masked_pos (explicit masking), not both")
        if bool_masked_pos is not None:
            inputs.check_masking(config, "bool_masked_pos")
            bool_masked_pos = inputs.check_mask(bool_masked_pos, B, num_windows, pixel_values.device)
            if keep_ids is None:
                keep_ids = inputs.keep_ids_from_mask(bool_masked_pos)
            else:
                inputs.check_keep_ids(keep_ids, B, num_windows, pixel_values.device)
                keep_ids = keep_ids.long()
                if (check_keep_ids and not torch.compiler.is_compiling() and pixel_values.device.type != "meta"
                        and not torch.equal(keep_ids, inputs.keep_ids_from_mask(bool_masked_pos, keep_ids.shape[-1]))):
                    raise ValueError("keep_ids must be the ascending visible-unit ids of bool_masked_pos")
        elif self.is_mae:
            bool_masked_pos, ids_restore, keep_ids = self.random_masking(B, num_windows, noise, pixel_values.device)

        x = self.embeddings(pixel_values, bool_masked_pos, mask_shape, tokens)  # [B, N, C] raster order
        x = unroll(x, tokens, [config.query_stride] * (len(config.depths) - 1))  # [B, N, C] unrolled
        if keep_ids is not None:
            x = gather_windows(x, keep_ids, num_windows)  # [B, T * K, C]
        stage_outputs = self.encoder(x)
        last = stage_outputs[-1]

        hidden_states = reshaped = None
        if output_hidden_states:
            hidden_states = (x, *stage_outputs)
            reshaped = tuple(self.reroll(h, max(i - 1, 0), tokens, masked=keep_ids is not None)
                             for i, h in enumerate(hidden_states))
        pooled = None
        if self.pooler is not None and keep_ids is None:
            pooled = self.pooler.layernorm(last.mean(dim=1))
        out = HieraModelOutput(last, pooled, bool_masked_pos, ids_restore, hidden_states, reshaped)
        return out if return_dict else out.to_tuple()

    def random_masking(self, batch: int, num_windows: int, noise: torch.Tensor | None, device):
        return inputs.random_masking(self.config, batch, num_windows, noise, device)

    def reroll(self, x: torch.Tensor, stage: int, tokens: Sequence[int], masked: bool = False) -> torch.Tensor:
        """Stage ``stage``'s unrolled output → ``[B, *spatial, C]`` (masked: ``[B, #kept, *mu_shape, C]``)."""
        size, schedule = stage_geometry(self.config, tokens, stage)
        return reroll(x, size, schedule, masked=masked)


class HieraForImageClassification(HieraPreTrainedModel):
    """HieraModel + a linear classifier on the pooled output; returns logits (not probabilities)."""

    _checkpoint_prefix = "hiera."

    def __init__(self, config: HieraConfig, fused: bool = False):
        super().__init__()
        self.config = config
        self.hiera = HieraModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self._init_weights()
        self.fused = fused

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, interpolate_pos_encoding: bool = False, return_dict: bool = True):
        if labels is not None:
            inputs.check_labels(labels, pixel_values.shape[0], self.config)
        outputs = self.hiera(pixel_values, output_hidden_states=output_hidden_states,
                             interpolate_pos_encoding=interpolate_pos_encoding)
        logits = self.classifier(outputs.pooler_output)
        loss = None if labels is None else losses.classification_loss(logits, labels, self.config)
        out = HieraForImageClassificationOutput(loss, logits, outputs.hidden_states, outputs.reshaped_hidden_states)
        return out if return_dict else out.to_tuple()


class HieraMultiScaleHead(nn.Module):
    """MAE multi-scale fusion: strided convs bring stages 1..q_pool down to the last stage's mask-unit grid."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        final = [mu // q**config.num_query_pool for mu, q in zip(config.masked_unit_size, config.query_stride)]
        unit = list(config.masked_unit_size)
        heads = []
        for s in range(config.num_query_pool):
            kernel = [u // f for u, f in zip(unit, final)]
            unit = [u // q for u, q in zip(unit, config.query_stride)]
            heads.append(_conv_nd(config.spatial_dims)(config.stage_dims[s], config.hidden_size, kernel, kernel))
        self.multi_scale_fusion_heads = nn.ModuleList(heads + [nn.Identity()])

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """feature_maps: ``[B, #MUs, *mu_shape_s, C_s]`` per fused stage → summed ``[B, #MUs, *mu_final, C]``."""
        fused = 0.0
        for head, x in zip(self.multi_scale_fusion_heads, feature_maps):
            if not isinstance(head, nn.Identity):
                B, M = x.shape[:2]
                x = head(x.flatten(0, 1).movedim(-1, 1))  # [B * #MUs, C, *mu_final]
                x = x.movedim(1, -1).reshape(B, M, *x.shape[2:], x.shape[1])
            fused = fused + x
        return fused


class HieraDecoder(nn.Module):
    """MAE decoder: embed the visible windows, fill masked ones with the mask token, back to spatial order, add
    position embeddings, global-attention blocks, LayerNorm, pixel prediction."""

    def __init__(self, config: HieraConfig):
        super().__init__()
        if config.decoder_hidden_size is None:
            raise ValueError("HieraForPreTraining needs config.decoder_hidden_size/decoder_depth/decoder_num_heads")
        dim = config.decoder_hidden_size
        self.config = config
        self.mu_final = [mu // q**config.num_query_pool for mu, q in zip(config.masked_unit_size, config.query_stride)]
        tokens_final = [t // q**config.num_query_pool for t, q in zip(config.tokens_spatial_shape, config.query_stride)]
        self.decoder_embeddings = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_position_embeddings = nn.Parameter(torch.zeros(1, math.prod(tokens_final), dim))
        self.decoder_block = HieraStage([HieraLayer(config, dim, dim, config.decoder_num_heads)
                                         for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.pred_stride = config.patch_stride[-1] * config.query_stride[-1] ** config.num_query_pool
        self.decoder_pred = nn.Linear(dim, self.pred_stride ** min(2, config.spatial_dims) * config.num_channels)

    def forward(self, x: torch.Tensor, keep_ids: torch.Tensor, keep_mask: torch.Tensor, tokens_final: Sequence[int]):
        """x: ``[B, K, *mu_final, C]`` visible windows → (logits ``[B, L, P]``, visible ``[B, L]``) spatial order."""
        num_windows = keep_mask.shape[1]
        x = self.decoder_embeddings(x)
        x = scatter_windows(x, keep_ids, num_windows, self.mask_token.view(1, 1, *[1] * len(self.mu_final), -1))
        x = undo_windowing(x, tokens_final, self.mu_final)  # [B, *tokens_final, D]
        visible = keep_mask.view(keep_mask.shape[0], num_windows, *[1] * len(self.mu_final), 1)
        visible = undo_windowing(visible.expand(-1, -1, *self.mu_final, 1), tokens_final, self.mu_final)
        tokens = math.prod(tokens_final)  # explicit sizes, not -1: B may be 0
        x = x.reshape(x.shape[0], tokens, x.shape[-1]) + self.decoder_position_embeddings
        x = self.decoder_pred(self.decoder_norm(self.decoder_block(x)))
        return x, visible.reshape(x.shape[0], tokens)


class HieraForPreTraining(HieraPreTrainedModel):
    """Hiera MAE: masked encoder → multi-scale fusion → LayerNorm → decoder → normalized-pixel MSE on masked patches.

    Masking keeps a fixed number of windows, ``int(#mask units * (1 - mask_ratio))`` (gather/scatter, no boolean
    indexing), so shapes never depend on data: a ``bool_masked_pos`` must keep exactly that many units per sample.
    It runs only at ``config.image_size``.
    """

    _checkpoint_prefix = "hiera."

    def __init__(self, config: HieraConfig, fused: bool = False):
        super().__init__()
        inputs.check_masking(config, "HieraForPreTraining")
        num_windows = math.prod(t // mu for t, mu in zip(config.tokens_spatial_shape, config.masked_unit_size))
        if inputs.num_keep(config, num_windows) == num_windows:
            raise ValueError(f"HieraConfig.mask_ratio={config.mask_ratio} masks none of the {num_windows} mask units: "
                             "the reconstruction loss would be empty")
        self.config = config
        self.hiera = HieraModel(config, add_pooling_layer=False, is_mae=True)
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.multiscale_fusion = HieraMultiScaleHead(config)
        self.decoder = HieraDecoder(config)
        self.pred_stride = self.decoder.pred_stride
        inputs.check_prediction_grid(config, self.pred_stride)
        self._init_weights()
        self.fused = fused

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None,
                bool_masked_pos: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True):
        config = self.config
        inputs.check_pixels(config, pixel_values, None, self.dtype)
        num_windows = math.prod([t // mu for t, mu in zip(config.tokens_spatial_shape, config.masked_unit_size)])
        ids_restore = None
        if bool_masked_pos is None:
            bool_masked_pos, ids_restore, keep_ids = self.hiera.random_masking(
                pixel_values.shape[0], num_windows, noise, pixel_values.device)
        elif noise is not None:
            raise ValueError("pass noise (random masking) or bool_masked_pos (explicit masking), not both")
        else:
            B = pixel_values.shape[0]
            bool_masked_pos = inputs.check_mask(bool_masked_pos, B, num_windows, pixel_values.device)
            # checks the user's mask
            keep_ids = inputs.keep_ids_from_mask(bool_masked_pos, inputs.num_keep(config, num_windows))
        # keep_ids were made from bool_masked_pos just above: no need to check them again (a host sync per step)
        out = self.hiera(pixel_values, bool_masked_pos=bool_masked_pos, keep_ids=keep_ids, output_hidden_states=True,
                         check_keep_ids=False)
        maps = out.reshaped_hidden_states
        maps = maps[1: config.num_query_pool + 1] + maps[-1:]  # pooled stages + last, [B, K, *mu_s, C_s]
        fused = self.encoder_norm(self.multiscale_fusion(maps))  # [B, K, *mu_final, C]
        tokens_final = [t // q**config.num_query_pool for t, q in zip(config.tokens_spatial_shape, config.query_stride)]
        logits, visible = self.decoder(fused, keep_ids, out.bool_masked_pos, tokens_final)
        num_masked = (num_windows - keep_ids.shape[1]) * math.prod(self.decoder.mu_final)
        loss = self.loss(pixel_values, logits, visible, num_masked)
        hidden = (out.hidden_states, out.reshaped_hidden_states) if output_hidden_states else (None, None)
        result = HieraForPreTrainingOutput(loss, logits, visible, ids_restore, *hidden)
        return result if return_dict else result.to_tuple()

    def pixel_labels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per prediction token, its ``pred_stride``-sized patch of pixels ``[B, L, P]``
        (:func:`hiera_fast.losses.mae_pixel_labels`)."""
        return losses.mae_pixel_labels(self.config, pixel_values, self.pred_stride)

    def loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, visible: torch.Tensor,
             num_masked: int) -> torch.Tensor:
        """The normalized-pixel MSE over the ``num_masked`` masked prediction tokens
        (:func:`hiera_fast.losses.mae_loss`)."""
        return losses.mae_loss(self.config, self.pixel_labels(pixel_values), logits, visible, num_masked)


class HieraBackbone(HieraPreTrainedModel):
    """Spatial feature maps ``[B, C, *spatial]`` of ``config.out_features`` (stem, stage1..4), each LayerNorm-ed.

    Unlike transformers' HieraBackbone (which skips the unroll), the maps are the official model's
    ``return_intermediates`` features in spatial order.
    """

    _checkpoint_prefix = ""

    def __init__(self, config: HieraConfig, fused: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = HieraEmbeddings(config)
        self.encoder = HieraEncoder(config)
        channels = [config.embed_dim] + config.stage_dims
        self.channels = [channels[i] for i in config.out_indices]
        # nn.LayerNorm's default eps (1e-5), as transformers' backbone
        norms = {name: nn.LayerNorm(c) for name, c in zip(config.out_features, self.channels)}
        self.hidden_states_norms = nn.ModuleDict(norms)
        self._init_weights()
        self.fused = fused

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False, return_dict: bool = True):
        config = self.config
        tokens = inputs.check_pixels(config, pixel_values, interpolate_pos_encoding, self.dtype)
        x = self.embeddings(pixel_values, None, None, tokens)
        x = unroll(x, tokens, [config.query_stride] * (len(config.depths) - 1))
        hidden = (x, *self.encoder(x))
        maps = []
        for name, index in zip(config.out_features, config.out_indices):
            size, schedule = stage_geometry(config, tokens, max(index - 1, 0))
            feature = self.hidden_states_norms[name](reroll(hidden[index], size, schedule))  # [B, *spatial, C]
            maps.append(feature.movedim(-1, 1).contiguous())  # [B, C, *spatial]
        out = BackboneOutput(tuple(maps), hidden if output_hidden_states else None)
        return out if return_dict else out.to_tuple()
