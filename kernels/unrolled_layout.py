"""Index math of Hiera's unrolled token layout, written once for every kernel (docs/DESIGN.md, "The unrolled layout").

Tokens are stored as ``n = t * num_windows + w``: ``w`` is the window (mask unit), ``t`` the token inside it.
With ``T`` tokens per window and query stride ``s`` (``T_out = T // s`` pooled queries per window):

- key/value token ``t`` of window ``w``          → row ``t * num_windows + w``           (``token_row``)
- candidate ``j < s`` of pooled query ``r``        → row ``(j * T_out + r) * num_windows + w`` (``pooled_query_row``)
- output / pooled row ``r`` of window ``w``        → row ``r * num_windows + w``           (``token_row`` again)

The same holds for the pooled residual ``x.view(B, s, N // s, C).max(1)``: candidate ``j`` of row ``m`` is row
``j * (N // s) + m``, which is ``pooled_query_row`` with one window of ``N // s`` tokens.
"""

import functools

import torch
import triton
import triton.language as tl  # noqa: F401  (used inside the jitted helpers)


@triton.jit
def token_row(t, w, num_windows):
    """Row of token ``t`` of window ``w`` (works for kv rows and for output rows)."""
    return t * num_windows + w


@triton.jit
def pooled_query_row(r, j, w, tokens_out_per_window, num_windows):
    """Row of the ``j``-th max-pool candidate of pooled query ``r`` of window ``w``."""
    return (j * tokens_out_per_window + r) * num_windows + w


@triton.jit
def packed_window_token(i, tokens_per_window):
    """Split a packed index ``i`` over several windows into (window offset in the pack, token in the window)."""
    return i // tokens_per_window, i % tokens_per_window


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' grids, in plain Python: ``triton.cdiv`` is a constexpr function in newer
    Triton, whose host-side call costs ~4 µs (measured, triton 3.8) on every launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (tile sizes and padded head dims): Triton's value for ``n >= 1`` (1 for
    ``n <= 1``, where Triton gives 0 for 0; no caller passes 0). Plain Python, as :func:`cdiv`
    (``triton.next_power_of_2`` costs ~5 µs per host call in triton 3.8)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def softmax_stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row softmax statistics the attention kernels keep between passes (the forward's log-sum-exp,
    the backward's ``D = rowsum(dO * O)``): float64 for float64 inputs (fp64 gradients to fp64 accuracy), else
    float32. ``hiera_fast.ops`` allocates the same for its fake tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def cached_config(config_fn, *args):
    """``config_fn(*args)``, computed once per function and arguments (configs are pure functions of shape classes;
    computing one costs tens of µs of host time per launch). Keyed on the function too, so a test that swaps a
    module's config function gets its own entries. The result is shared: callers must not mutate it."""
    return config_fn(*args)


__all__ = ["token_row", "pooled_query_row", "packed_window_token", "cdiv", "next_power_of_2", "softmax_stats_dtype",
           "cached_config"]
