"""Index math of SAM 2's windows on a BHWC map, written once for every kernel (docs/DESIGN.md, "The kernel contract
(SAM 2's hieradet)").

The map ``[B, H, W, ...]`` is cut into ``ws x ws`` windows on a grid padded at the bottom and right to
``Hp = ceil(H / ws) * ws`` by ``Wp = ceil(W / ws) * ws`` (``window_partition``). Windows are numbered in raster order,
``w = wi * windows_w + wj`` with ``windows_w = Wp // ws``; tokens inside a window too, ``t = a * ws + b``. Then:

- token ``t`` of window ``w``                  → map position ``(wi * ws + a, wj * ws + b)``        (``window_token``)
- that position is padding iff ``row >= H`` or ``col >= W``: it reads as the qkv Linear's bias   (``is_padding``)
- candidate ``c < q * q`` (row-major in its ``q x q`` cell) of pooled query ``r = li * wo + lj`` (``wo = ws // q``)
  → ``(wi * ws + q * li + c // q, wj * ws + q * lj + c % q)``                                 (``pooled_candidate``)
- pooled query ``r`` of window ``w``            → output position ``(wi * wo + li, wj * wo + lj)`` of the
  ``[B, H // q, W // q, C]`` output, written only inside it (the crop)                       (``output_position``)

``q = 1`` is the same with one candidate per query (the token itself) and ``wo = ws``. With an odd ``ws`` and
``q = 2`` a window's last row and column are nobody's candidate (``MaxPool2d`` floors): ``outside_pool``. Output
window ``(wi, wj)`` is attention window ``(wi, wj)`` only if both grids have the same number of windows per side,
``ceil(H / ws) == ceil((H // q) / wo)`` (what the official ``window_unpartition`` needs): ``check_window_geometry``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .unrolled_layout import cdiv


@triton.jit
def window_origin(w, windows_w, SIZE: tl.constexpr):
    """(row, col) of the top-left token of window ``w`` on a grid of ``SIZE x SIZE`` windows, ``windows_w`` a row."""
    return (w // windows_w) * SIZE, (w % windows_w) * SIZE


@triton.jit
def window_token(w, t, windows_w, WINDOW: tl.constexpr):
    """Map position (row, col) of token ``t`` (raster order in the window) of window ``w``."""
    row0, col0 = window_origin(w, windows_w, WINDOW)
    return row0 + t // WINDOW, col0 + t % WINDOW


@triton.jit
def is_padding(row, col, height, width):
    """Whether map position (row, col) lies in the bottom/right padding of an ``height x width`` map."""
    return (row >= height) | (col >= width)


@triton.jit
def pooled_candidate(w, r, c, windows_w, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr):
    """Map position of candidate ``c`` (row-major: (0,0), (0,1), (1,0), (1,1) for ``Q_STRIDE`` 2) of pooled query
    ``r`` (raster order over the ``WINDOW // Q_STRIDE`` pooled window) of window ``w``."""
    WO: tl.constexpr = WINDOW // Q_STRIDE
    row0, col0 = window_origin(w, windows_w, WINDOW)
    return row0 + (r // WO) * Q_STRIDE + c // Q_STRIDE, col0 + (r % WO) * Q_STRIDE + c % Q_STRIDE


@triton.jit
def output_position(w, r, windows_w, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr):
    """Position (row, col) in the ``[B, H // q, W // q, C]`` output of pooled query ``r`` of window ``w``."""
    WO: tl.constexpr = WINDOW // Q_STRIDE
    row0, col0 = window_origin(w, windows_w, WO)
    return row0 + r // WO, col0 + r % WO


@triton.jit
def outside_pool(t, WINDOW: tl.constexpr, Q_STRIDE: tl.constexpr):
    """Whether token ``t`` of a window is no pooled query's candidate (its last row / column when ``WINDOW`` is not a
    multiple of ``Q_STRIDE``)."""
    EDGE: tl.constexpr = (WINDOW // Q_STRIDE) * Q_STRIDE
    return (t // WINDOW >= EDGE) | (t % WINDOW >= EDGE)


@triton.jit
def packed_index(i, PER_WINDOW: tl.constexpr):
    """Split an index over a pack of windows into (window offset in the pack, index inside the window)."""
    return i // PER_WINDOW, i % PER_WINDOW


def window_grid(height: int, width: int, window_size: int) -> tuple[int, int]:
    """Windows per column and per row of the padded grid: ``(ceil(H / ws), ceil(W / ws))``."""
    return cdiv(height, window_size), cdiv(width, window_size)


def check_window_geometry(height: int, width: int, window_size: int, q_stride: int) -> None:
    """``ValueError`` unless the official code runs this block: ``1 <= q_stride <= ws`` and, per side, the pooled
    map cut into windows of ``ws // q_stride`` has as many windows as the map cut into windows of ``ws``
    (``hiera_fast.sam2.config.HieraDetConfig.check_image_size`` is the model-level rule)."""
    if not 1 <= q_stride <= window_size:
        raise ValueError(f"need 1 <= q_stride ({q_stride}) <= window_size ({window_size})")
    wo = window_size // q_stride
    for n, side in ((height, "height"), (width, "width")):
        if cdiv(n, window_size) != cdiv(n // q_stride, wo):
            raise ValueError(f"a {side} of {n} tokens gives {cdiv(n, window_size)} windows of {window_size} but its "
                             f"pooled {n // q_stride} gives {cdiv(n // q_stride, wo)} of {wo}: the official "
                             "window_unpartition cannot put them back")


__all__ = ["window_origin", "window_token", "is_padding", "pooled_candidate", "output_position", "outside_pool",
           "packed_index", "window_grid", "check_window_geometry"]
