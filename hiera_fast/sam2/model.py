"""SAM 2's Hiera image encoder ("hieradet"): BHWC throughout, computed as the official
``sam2/modeling/backbones/hieradet.py`` computes it.

Nothing is unrolled (unlike :mod:`hiera_fast.model`). The official block cuts windows from the spatial map by
:func:`window_partition`, which zero-pads the *normed* input, so padded tokens enter ``qkv`` as zero rows (q = b_q,
k = b_k, v = b_v) and attention runs without a mask: they are live keys. Here the qkv Linear runs on the unpadded map
and :class:`hiera_fast.ops.WindowAttention` takes its bias for the padded tokens: the same numbers, and no padded or
partitioned copy (:func:`window_partition` / :func:`window_unpartition` stay as the official formulation's
executable form, for tests). Module names are the official trunk's (``patch_embed.proj``,
``blocks.{i}.norm1``, ``attn.qkv``, ``mlp.layers.{0,1}``, ...), so an official (or ultralytics) checkpoint's
``image_encoder.trunk.*`` loads as it is; :mod:`hiera_fast.checkpoints.sam2` maps timm's and transformers' names.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DropPath
from .. import ops
from ..ops import check_flag
from .attention import window_attention
from .config import BlockSpec, HieraDetConfig


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, H, W, C]`` → (``[B * nH * nW, ws, ws, C]``, padded ``(Hp, Wp)``): zero-padded at the bottom and right to
    multiples of ``ws``, windows in raster order."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window_size, (-W) % window_size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)  # [B, nH, ws, nW, ws, C]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C), (Hp, Wp)  # [B * nH * nW, ws, ws, C]


def window_unpartition(windows: torch.Tensor, window_size: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """``[B * nH * nW, ws, ws, C]`` → ``[B, H, W, C]``: the windows of a ``padded`` grid back in place, cropped to
    ``size``."""
    (Hp, Wp), (H, W) = padded, size
    nH, nW = Hp // window_size, Wp // window_size
    B = windows.shape[0] // (nH * nW)
    x = windows.view(B, nH, nW, window_size, window_size, -1)  # [B, nH, nW, ws, ws, C]
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)  # [B, Hp, Wp, C]
    return x[:, :H, :W]


def max_pool_bhwc(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``MaxPool2d(stride, stride)`` on ``[B, H, W, C]`` → ``[B, H // stride, W // stride, C]``."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)


class HieraDetPatchEmbed(nn.Module):
    """Conv 7x7 stride 4 pad 3 (by default): ``[B, C_in, H, W]`` → ``[B, h, w, C]``."""

    def __init__(self, config: HieraDetConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.embed_dim, config.patch_kernel_size, config.patch_stride,
                              config.patch_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class HieraDetMlp(nn.Module):
    """Linear → exact GELU → Linear, named as the official ``MLP`` (``layers.0``, ``layers.1``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.act(self.layers[0](x)))


class HieraDetAttention(nn.Module):
    """qkv Linear → attention (queries max-pooled by ``q_stride`` if set) → proj, on the block's whole normed map.

    A windowed block (``window_size > 0``) runs :class:`hiera_fast.ops.WindowAttention` on the qkv of the unpadded
    map with the Linear's bias standing for the padded tokens (what the official zero-padded windows give): the
    eager reference with ``fused=False``, our Triton kernels with ``fused=True`` (where the device allows; else the
    reference, with one warning). A global block runs :func:`window_attention` (4-D SDPA on views) either way.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int | None = None, window_size: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)
        self.op = ops.WindowAttention(num_heads, window_size, q_stride or 1) if window_size else None
        self._fused = False

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = check_flag("fused", value)
        if self.window_size:  # a new op: its routes are decided afresh
            self.op = ops.WindowAttention(self.num_heads, self.window_size, self.q_stride or 1, fused=self._fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, dim]`` (the normed map, unpadded) → ``[B, H // q, W // q, dim_out]``."""
        qkv = self.qkv(x)  # [B, H, W, 3 * dim_out]
        if self.op is None:
            return self.proj(window_attention(qkv, self.num_heads, self.q_stride))
        return self.proj(self.op(qkv, self.qkv.bias))

    def extra_repr(self) -> str:
        window = self.window_size or "global"
        return f"heads={self.num_heads}, window={window}, q_stride={self.q_stride}, fused={self.fused}"


class HieraDetBlock(nn.Module):
    """One block: ``x_n = norm1(x)``; the residual is ``x``, or ``MaxPool(proj(x_n))`` over the whole unpadded map
    where the width changes; windowed (or global) attention on ``x_n``, its queries pooled inside each window, the
    windows back in place and cropped (:class:`HieraDetAttention`); ``+ mlp(norm2)``."""

    def __init__(self, spec: BlockSpec, mlp_ratio: float, eps: float):
        super().__init__()
        self.dim, self.dim_out = spec.dim, spec.dim_out
        self.window_size, self.q_stride = spec.window_size, spec.q_stride
        self.norm1 = nn.LayerNorm(spec.dim, eps=eps)
        self.attn = HieraDetAttention(spec.dim, spec.dim_out, spec.num_heads, spec.q_stride, spec.window_size)
        self.drop_path = DropPath(spec.drop_path)
        self.norm2 = nn.LayerNorm(spec.dim_out, eps=eps)
        self.mlp = HieraDetMlp(spec.dim_out, int(spec.dim_out * mlp_ratio))
        if spec.dim != spec.dim_out:
            self.proj = nn.Linear(spec.dim, spec.dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, dim]`` → ``[B, H', W', dim_out]`` (``H' = H // q_stride`` where the block pools)."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = max_pool_bhwc(shortcut, self.q_stride)  # [B, H // q, W // q, dim_out]
        x = shortcut + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"window={self.window_size or 'global'}, q_stride={self.q_stride}"


class HieraDetModel(nn.Module):
    """SAM 2's Hiera trunk: ``[B, 3, H, W]`` → the stage outputs ``[B, C_s, H_s, W_s]`` (NCHW views of the BHWC
    maps), a list, finest first, as the official ``Hiera.forward`` returns them: every stage's with
    ``config.return_interm_layers``, else the last only. ``channel_list`` (coarsest first) is the official
    attribute SAM 2's neck checks, so the model can stand in for ``image_encoder.trunk``.

    ``fused=True`` runs every windowed block's attention on our Triton kernels (:class:`hiera_fast.ops.WindowAttention`:
    window partition, padding, query pooling and unpartition in one kernel, forward and backward); global blocks run
    SDPA on views and the pooled residual PyTorch's ``max_pool2d``, fused or not. :meth:`fused_routes` reports the
    routes taken. Initialised as the official trunk: PyTorch's default layer init, zero position embeddings.
    """

    def __init__(self, config: HieraDetConfig, fused: bool = False):
        super().__init__()
        if not isinstance(config, HieraDetConfig):
            raise TypeError(f"config must be a HieraDetConfig, got {type(config).__name__}")
        self.config = config
        self.patch_embed = HieraDetPatchEmbed(config)
        ws0 = config.window_spec[0]
        self.pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, *config.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, config.embed_dim, ws0, ws0))
        self.blocks = nn.ModuleList(HieraDetBlock(spec, config.mlp_ratio, config.layer_norm_eps)
                                    for spec in config.block_specs())
        self.stage_ends = config.stage_ends
        self.channel_list = config.channel_list
        self.fused = fused

    @property
    def fused(self) -> bool:
        return all(block.attn.fused for block in self.blocks)

    @fused.setter
    def fused(self, value: bool) -> None:
        value = check_flag("fused", value)
        for block in self.blocks:
            block.attn.fused = value

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    def fused_routes(self) -> dict[str, dict]:
        """Each windowed block's routes decided so far (on its first call per device, dtype and head dim):
        ``{attention module name: {(device, dtype, head_dim): Route}}``."""
        return {name: dict(m.op.routes) for name, m in self.named_modules()
                if isinstance(m, HieraDetAttention) and m.op is not None}

    def position_embedding(self, size: tuple[int, int]) -> torch.Tensor:
        """``[1, h, w, C]``: ``pos_embed`` bicubic-interpolated to the token grid plus ``pos_embed_window`` tiled
        over it (the grid is a multiple of the window: :meth:`HieraDetConfig.check_image_size`)."""
        pos = F.interpolate(self.pos_embed, size=tuple(size), mode="bicubic")  # [1, C, h, w]
        window = self.pos_embed_window
        pos = pos + window.tile(1, 1, size[0] // window.shape[2], size[1] // window.shape[3])
        return pos.permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        self._check_pixels(pixel_values)
        x = self.patch_embed(pixel_values)  # [B, h, w, C]
        x = x + self.position_embedding(x.shape[1:3])
        outputs = []
        last = self.stage_ends[-1]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == last or (i in self.stage_ends and self.config.return_interm_layers):
                outputs.append(x.permute(0, 3, 1, 2))  # [B, C_s, H_s, W_s]
        return outputs

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        if pixel_values.dtype != self.dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            raise TypeError(f"pixel_values is {pixel_values.dtype} but the model is {self.dtype}: convert one to the "
                            "other (or run under torch.autocast)")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values must be [B, {self.config.num_channels}, H, W], got shape "
                             f"{tuple(pixel_values.shape)}")
        self.config.check_image_size(*pixel_values.shape[2:])

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, source, config: HieraDetConfig | str | None = None,
                        fused: bool = False) -> HieraDetModel:
        """Build and load from ``source``: an official SAM 2 checkpoint (``{"model": ...}`` with
        ``image_encoder.trunk.*``) or an ultralytics one (the same format), a transformers ``Sam2Model`` /
        ``Sam2VisionModel`` / ``Sam2HieraDetModel`` directory, a timm ``sam2_hiera_*`` state dict, a file of any of
        them, an in-memory state dict, or a Hugging Face hub id. ``config``: a :class:`HieraDetConfig`, a preset name,
        or None to read a transformers ``config.json`` beside the weights or recognise a preset by the shapes."""
        from ..checkpoints import sam2 as weights

        return weights.from_pretrained(cls, source, config, fused)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a transformers ``Sam2HieraDetModel`` directory (``config.json`` + ``model.safetensors``), which
        transformers and :meth:`from_pretrained` read."""
        from ..checkpoints import sam2 as weights

        weights.save_pretrained(self, directory)
