"""The fused ops of hiera-fast: mask-unit attention with query pooling, and the unrolled max-pool.

Each op takes ``fused=``: ``False`` runs the eager PyTorch reference (:mod:`hiera_fast.ops.reference`), ``True`` the
route :mod:`hiera_fast.ops.routing` decides once per call site, device and dtype: our Triton kernels (a CUDA GPU of
compute capability 8.0 or newer; a CPU whose kernels were defined under ``TRITON_INTERPRET=1``), PyTorch's SDPA for
global attention on CUDA, or the eager reference with one warning saying why. See docs/DESIGN.md ("Routing").

- :class:`MaskUnitAttention` / :func:`mask_unit_attention`: one block's attention on the qkv Linear's output.
- :func:`unrolled_max_pool`: the pooled residual.
- :class:`WindowAttention` / :func:`window_attention`: SAM 2's windowed attention with query pooling on the BHWC map.
- :func:`fused_backend`: what ``fused=True`` can run on a device, and why.
- :func:`set_global_attention` / :func:`global_attention`: the default route of global attention on CUDA.
- :data:`kernel_launches`: launches per op (outside ``torch.compile``), so tests can prove which path ran.
"""

from __future__ import annotations

import torch

from . import reference, routing
from .attention import MaskUnitAttention, global_attention_sdpa, mask_unit_attention
from .checks import check_flag, check_qkv, window_count
from .pool import unrolled_max_pool
from .windows import WindowAttention, window_attention
from .routing import (
    GLOBAL_ATTENTION_BACKENDS,
    MAX_FUSED_HEAD_DIM,
    MIN_CUDA_CAPABILITY,
    MIN_FP64_TRITON,
    MIN_INTERPRETER_TRITON,
    MIN_TRITON,
    Route,
    fused_backend,
    global_attention,
    kernel_launches,
    kernels_interpreted,
    set_global_attention,
)


def runs_sdpa(num_windows: int, device: torch.device | str, global_attention: str | None = None) -> bool:
    """Whether ``fused=True`` runs an attention call of ``num_windows`` windows (the run-time count: an MAE that keeps
    one mask unit has one) on ``device`` by :func:`global_attention_sdpa`, for an op whose ``global_attention`` is
    the one given (None: the default)."""
    return num_windows == 1 and routing.attention_route(True, torch.device(device), torch.float32, 64, True,
                                                        global_attention).kind == "sdpa"


__all__ = [
    "MaskUnitAttention", "mask_unit_attention", "unrolled_max_pool", "WindowAttention", "window_attention",
    "global_attention_sdpa", "fused_backend",
    "kernel_launches", "kernels_interpreted", "set_global_attention", "global_attention", "runs_sdpa",
    "check_qkv", "check_flag", "window_count", "Route", "reference", "routing", "GLOBAL_ATTENTION_BACKENDS",
    "MAX_FUSED_HEAD_DIM", "MIN_CUDA_CAPABILITY", "MIN_TRITON", "MIN_FP64_TRITON", "MIN_INTERPRETER_TRITON",
]
