"""Hiera's unrolled token order on the model side: unroll, reroll, undo_windowing and window masking.

``unroll`` reorders tokens so that every later pooling is a ``max`` over the leading index of a view and every mask unit
(window) is the set of tokens ``n = t * num_windows + w`` for one ``w`` (docs/DESIGN.md, "The unrolled layout"). These
are plain tensor functions written as the official ``hiera_utils.py`` writes them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def unroll(x: torch.Tensor, size: Sequence[int], schedule: Sequence[Sequence[int]]) -> torch.Tensor:
    """Spatial raster order → unrolled order.

    x: ``[B, prod(size), C]`` in raster order over ``size`` (e.g. ``[H, W]``); each entry of ``schedule`` is a
    stride per spatial dim. Returns ``[B, N, C]`` such that ``x.view(B, prod(stride), -1, C).max(1)`` max-pools
    with the first stride, and so on.
    """
    B, _, C = x.shape
    cur_size = list(size)
    x = x.view(B, *cur_size, C)
    for strides in schedule:
        # [B, H // Sy, Sy, W // Sx, Sx, C] -> [B, Sy, Sx, H // Sy, W // Sx, C] -> [B * Sy * Sx, H // Sy, W // Sx, C]
        cur_size = [i // s for i, s in zip(cur_size, strides)]
        new_shape = [B] + [d for pair in zip(cur_size, strides) for d in pair] + [C]
        x = x.view(new_shape)
        L = len(new_shape)
        x = x.permute([0] + list(range(2, L - 1, 2)) + list(range(1, L - 1, 2)) + [L - 1])
        x = x.flatten(0, len(strides))
        B *= math.prod(strides)
    return x.reshape(-1, math.prod(size), C)


def undo_windowing(x: torch.Tensor, shape: Sequence[int], mu_shape: Sequence[int]) -> torch.Tensor:
    """``[B, #MUs, *mu_shape, C]`` (windows in raster order) → ``[B, *shape, C]`` spatial feature map."""
    D = len(shape)
    B, C = x.shape[0], x.shape[-1]
    num_mus = [s // mu for s, mu in zip(shape, mu_shape)]
    x = x.view(B, *num_mus, *mu_shape, C)  # [B, #MUy, #MUx, MUy, MUx, C]
    permute = [0] + [d for p in zip(range(1, 1 + D), range(1 + D, 1 + 2 * D)) for d in p] + [2 * D + 1]
    return x.permute(permute).reshape(B, *shape, C)  # [B, #MUy * MUy, #MUx * MUx, C]


def reroll(
    x: torch.Tensor, size: Sequence[int], schedule: Sequence[Sequence[int]], masked: bool = False
) -> torch.Tensor:
    """Undo the unroll levels still present in ``x`` (``schedule``) to get spatial features.

    x: ``[B, N, C]`` unrolled, with ``size`` the current token grid (it would be if nothing were masked).
    Returns ``[B, *size, C]``, or with ``masked=True`` (windows were dropped) ``[B, #kept MUs, *mu_shape, C]``.
    """
    B, N, C = x.shape
    D = len(size)
    mu_shape = [1] * D
    for strides in schedule:
        # [B, Sy, Sx, N // (Sy * Sx), MUy, MUx, C] -> [B, N // (Sy * Sx), Sy, MUy, Sx, MUx, C]
        x = x.view(B, *strides, N // math.prod(strides), *mu_shape, C)
        L = x.dim()
        permute = [0, 1 + D] + [d for p in zip(range(1, 1 + D), range(2 + D, L - 1)) for d in p] + [L - 1]
        x = x.permute(permute)
        mu_shape = [m * s for m, s in zip(mu_shape, strides)]
        x = x.reshape(B, N // math.prod(strides), *mu_shape, C)  # explicit sizes: B may be 0
        N = x.shape[1]
    x = x.view(B, N, *mu_shape, C)  # [B, #MUs, *mu_shape, C]
    if masked:
        return x
    return undo_windowing(x, size, mu_shape)


def gather_windows(x: torch.Tensor, keep_ids: torch.Tensor, num_windows: int) -> torch.Tensor:
    """Keep only the windows ``keep_ids`` (``[B, K]``, ascending) of unrolled tokens ``x`` ``[B, N, C]``.

    Same result and order as the official ``x[mask[..., None].tile(1, mu_size, C)]`` (kept token ``t * K + k``),
    but with a gather, so the shape does not depend on the data.
    """
    B, N, C = x.shape
    x = x.view(B, N // num_windows, num_windows, C)  # [B, T, nw, C]
    index = keep_ids[:, None, :, None].expand(B, x.shape[1], keep_ids.shape[1], C)
    return torch.gather(x, 2, index).reshape(B, x.shape[1] * keep_ids.shape[1], C)  # [B, T * K, C]


def scatter_windows(
    x: torch.Tensor, keep_ids: torch.Tensor, num_windows: int, fill: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`gather_windows` along dim 1 of ``x`` ``[B, K, ...]`` → ``[B, num_windows, ...]``.

    Windows not in ``keep_ids`` get ``fill`` (broadcast to one window's shape).
    """
    B, K = keep_ids.shape
    out = fill.to(x.dtype).expand(B, num_windows, *x.shape[2:]).clone()
    index = keep_ids.view(B, K, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter(1, index, x)
