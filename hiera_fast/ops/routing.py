"""Which route ``fused=True`` takes, decided once per call site, device and dtype: our Triton kernels, PyTorch's SDPA
(global attention on CUDA) or the eager reference, each with the reason (docs/DESIGN.md, "Routing").

- :func:`device_backend`: what a device can run at all ("triton", "triton-interpreter" or "eager"), from the GPU's
  compute capability, the installed Triton and how the kernels were defined (``TRITON_INTERPRET``); cached per device.
- :func:`attention_route` / :func:`window_route` / :func:`pool_route`: the route of one op for a device and dtype
  (plus, for attention, the head dim and whether the call is global; for SAM 2's windows, the head dim and the
  query stride), a pure function of those, so a caller decides once and caches it.
- :func:`call_limit`: what only a call's shapes and strides can tell (the grid and 32-bit offset limits).
- :data:`kernel_launches`: launches per op, so tests can prove which path ran.

The kernel modules are imported here, once (with the ``TRITON_INTERPRET`` of ``import hiera_fast``).
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
import warnings
from typing import NamedTuple

import torch

try:
    from ..kernels import attention_bwd, attention_fwd, max_pool, window_attention
except ImportError as _err:  # no Triton (it is Linux-only on PyPI), or a broken install
    attention_bwd = attention_fwd = max_pool = window_attention = None
    KERNELS_MISSING: str | None = f"Triton (or the hiera_fast.kernels modules) could not be imported ({_err})"
else:
    KERNELS_MISSING = None

MIN_CUDA_CAPABILITY = (8, 0)
MIN_TRITON = (3, 3)
MIN_FP64_TRITON = (3, 5)  # float64 tl.dot: 3.3 and 3.4 fail to compile the attention kernels in fp64
MIN_INTERPRETER_TRITON = (3, 7)
MAX_FUSED_HEAD_DIM = 256
MAX_GRID_AXIS = 65535  # CUDA's limit on grid axes y and z, where the kernels put the batch (and heads * windows)
MAX_ROW_OFFSET = 2**31  # offsets inside one batch element are 32-bit in the kernels

kernel_launches: collections.Counter = collections.Counter()
_warned: set[tuple[str, str]] = set()  # (op, reason) pairs already warned about


class Route(NamedTuple):
    """What one fused call site runs on a device and dtype: ``kind`` is "kernel" (our Triton kernels), "sdpa"
    (PyTorch's SDPA on views of qkv, global attention) or "eager" (the reference), with the reason."""

    kind: str
    reason: str


# ---------------------------------------------------------------------------------------------- devices
def kernels_interpreted() -> bool | None:
    """Whether the kernels were *defined* under Triton's interpreter (``@triton.jit`` reads ``TRITON_INTERPRET``
    when it decorates, so this, not the current environment, decides where they can run); None without kernels."""
    if attention_fwd is None:
        return None
    return type(attention_fwd._mask_unit_attn_fwd_kernel).__name__ == "InterpretedFunction"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _triton_too_old(minimum: tuple[int, int]) -> str | None:
    """The installed Triton's version string when it is older than ``minimum``, else None."""
    try:
        import triton
    except ImportError:
        return None
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return triton.__version__ if version < minimum else None


def _compiler_limit() -> str | None:
    """Why this Triton cannot build the kernels for a GPU (older than :data:`MIN_TRITON`: 3.1 aborts inside its
    compiler on the forward kernel; 3.2 was not checked), or None."""
    old = _triton_too_old(MIN_TRITON)
    if old is None:
        return None
    return (f"Triton {old} is older than {_dotted(MIN_TRITON)}, the oldest that builds the kernels "
            f"(older ones fail or abort inside their compiler); upgrade triton (and torch) to use them")


def _interpreter_limit() -> str | None:
    """Why Triton's interpreter cannot run the kernels (3.6's fails on loops with computed bounds), or None."""
    old = _triton_too_old(MIN_INTERPRETER_TRITON)
    if old is None:
        return None
    return (f"Triton {old}'s interpreter cannot run the kernels (loops with computed bounds); it needs "
            f"triton >= {_dotted(MIN_INTERPRETER_TRITON)} (compiled for a CUDA GPU, triton >= {_dotted(MIN_TRITON)} "
            f"is fine)")


def _cuda_capability_limit(device: torch.device) -> str | None:
    """Why the kernels should not run on this CUDA device (older than Ampere: Triton builds them without tensor
    cores and with register spills there, where SDPA uses the tensor cores), or None."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= MIN_CUDA_CAPABILITY:
        return None
    return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; the Triton kernels need "
            f"{_dotted(MIN_CUDA_CAPABILITY)} or newer (Ampere, Ada, Hopper, Blackwell): Triton builds them for older "
            f"GPUs without tensor cores, where PyTorch's SDPA is the better choice")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_backend(device: torch.device | str) -> tuple[str, str]:
    """``(backend, reason)`` a device can run: "triton" (a CUDA GPU of compute capability
    :data:`MIN_CUDA_CAPABILITY` or newer, Triton :data:`MIN_TRITON` or newer), "triton-interpreter" (a CPU, kernels
    defined under ``TRITON_INTERPRET=1``, Triton :data:`MIN_INTERPRETER_TRITON` or newer) or "eager". Not cached:
    :func:`device_backend` is."""
    device = torch.device(device)
    if KERNELS_MISSING:
        return "eager", KERNELS_MISSING
    interpreted = kernels_interpreted()
    if device.type == "cuda":
        if interpreted:
            return "eager", ("the kernels were defined under TRITON_INTERPRET=1 (Triton's interpreter), which cannot "
                             "launch them on CUDA: unset it before hiera_fast is imported")
        if not torch.cuda.is_available():
            return "eager", "no CUDA device is available"
        too_old = _cuda_capability_limit(device) or _compiler_limit()
        if too_old:
            return "eager", too_old
        return "triton", "CUDA tensor: the Triton kernels run on the GPU"
    if device.type == "cpu":
        if interpreted:
            too_old = _interpreter_limit()
            if too_old:
                return "eager", too_old
            return "triton-interpreter", "CPU tensor and TRITON_INTERPRET=1: Triton's interpreter runs the kernels"
        when = "was set after" if _interpreter_on() else "was not set when"
        return "eager", (f"CPU tensor: the Triton kernels need CUDA, or Triton's interpreter, and TRITON_INTERPRET=1 "
                         f"{when} hiera_fast was imported")
    return "eager", f"no Triton kernels for device type {device.type!r}"


_DEVICE_BACKENDS: dict[torch.device, tuple[str, str]] = {}


def device_backend(device: torch.device) -> tuple[str, str]:
    """:func:`fused_backend`, cached per device (a device's answer does not change once the kernels are imported).
    A plain dict, not ``lru_cache``, so ``torch.compile`` traces the lookup."""
    found = _DEVICE_BACKENDS.get(device)
    if found is None:
        found = _DEVICE_BACKENDS[device] = fused_backend(device)
    return found


# ---------------------------------------------------------------------------------------------- routes
def dtype_limit(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the kernels cannot take ``dtype`` on ``device``, or None: bfloat16 under the CPU's interpreter (it
    computes bfloat16 wrongly), float64 attention on CUDA with a Triton older than :data:`MIN_FP64_TRITON`."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        return ("bfloat16 on the CPU: Triton's interpreter computes bfloat16 wrongly (the kernels run bfloat16 on a "
                "GPU)")
    return None


def _float64_dot_limit(dtype: torch.dtype, device_type: str) -> str | None:
    if dtype != torch.float64 or device_type != "cuda":
        return None
    old = _triton_too_old(MIN_FP64_TRITON)
    if old is None:
        return None
    return (f"float64 on CUDA needs triton >= {_dotted(MIN_FP64_TRITON)} (Triton {old} cannot compile the "
            f"attention kernels' float64 dot)")


def attention_route(fused: bool, device: torch.device, dtype: torch.dtype, head_dim: int, global_call: bool,
                    global_attention: str | None = None, default_global: str | None = None) -> Route:
    """The route of one attention call site: eager without ``fused``; for a global call SDPA when
    ``global_attention`` is "sdpa" (on any device) or when it is None and ``default_global`` (None: the
    :func:`set_global_attention` default) is "sdpa" (on CUDA); our kernels where :func:`device_backend`, the dtype
    and the head dim allow; else the eager reference, with the reason."""
    if not fused:
        return Route("eager", "fused=False")
    if global_call and (global_attention or default_global or _global_attention) == "sdpa":
        if global_attention is not None:
            return Route("sdpa", "global attention: SDPA on views of qkv (global_attention='sdpa')")
        if device.type == "cuda":
            return Route("sdpa", "global attention on CUDA: SDPA on views of qkv (the default)")
    backend, reason = device_backend(device)
    if backend == "eager":
        return Route("eager", reason)
    limit = dtype_limit(dtype, device) or _float64_dot_limit(dtype, device.type)
    if head_dim > MAX_FUSED_HEAD_DIM:
        limit = f"head_dim {head_dim} > {MAX_FUSED_HEAD_DIM}, the largest the Triton kernels take"
    return Route("eager", limit) if limit else Route("kernel", reason)


MAX_WINDOW_Q_STRIDE = 2  # SAM 2's query pooling is 2x2; the BHWC kernels pool 1x1 or 2x2


def window_route(fused: bool, device: torch.device, dtype: torch.dtype, head_dim: int, q_stride: int) -> Route:
    """The route of one SAM 2 windowed-attention call site (:class:`hiera_fast.ops.WindowAttention`): eager without
    ``fused``; our kernels where :func:`device_backend`, the dtype, the head dim and the query stride allow; else the
    eager reference, with the reason."""
    if not fused:
        return Route("eager", "fused=False")
    backend, reason = device_backend(device)
    if backend == "eager":
        return Route("eager", reason)
    limit = dtype_limit(dtype, device) or _float64_dot_limit(dtype, device.type)
    if head_dim > MAX_FUSED_HEAD_DIM:
        limit = f"head_dim {head_dim} > {MAX_FUSED_HEAD_DIM}, the largest the Triton kernels take"
    if q_stride > MAX_WINDOW_Q_STRIDE:
        limit = f"q_stride {q_stride} > {MAX_WINDOW_Q_STRIDE}: the window kernels pool 1x1 or 2x2 (SAM 2's stride)"
    return Route("eager", limit) if limit else Route("kernel", reason)


def pool_route(fused: bool, device: torch.device, dtype: torch.dtype) -> Route:
    """The route of the fused max-pool: our kernel where the device and dtype allow, else the eager reference."""
    if not fused:
        return Route("eager", "fused=False")
    backend, reason = device_backend(device)
    limit = reason if backend == "eager" else dtype_limit(dtype, device)
    return Route("eager", limit) if limit else Route("kernel", reason)


_ROUTES: dict[tuple, Route] = {}


@torch.compiler.assume_constant_result
def cached_attention_route(fused: bool, device: torch.device, dtype: torch.dtype, head_dim: int, global_call: bool,
                           global_attention: str | None, default_global: str) -> Route:
    """:func:`attention_route`, decided once per argument set. ``torch.compile`` takes its result as a constant of the
    graph: a cache read or filled while tracing would otherwise be guarded on, and the next call would recompile."""
    key = ("attention", fused, device, dtype, head_dim, global_call, global_attention, default_global)
    found = _ROUTES.get(key)
    if found is None:
        found = _ROUTES[key] = attention_route(fused, device, dtype, head_dim, global_call, global_attention,
                                               default_global)
    return found


@torch.compiler.assume_constant_result
def cached_pool_route(device: torch.device, dtype: torch.dtype) -> Route:
    """:func:`pool_route` with ``fused=True``, decided once per device and dtype (a constant under compile, as
    :func:`cached_attention_route`)."""
    key = ("pool", device, dtype)
    found = _ROUTES.get(key)
    if found is None:
        found = _ROUTES[key] = pool_route(True, device, dtype)
    return found


@torch.compiler.assume_constant_result
def cached_window_route(fused: bool, device: torch.device, dtype: torch.dtype, head_dim: int,
                        q_stride: int) -> Route:
    """:func:`window_route`, decided once per argument set (a constant under compile, as
    :func:`cached_attention_route`)."""
    key = ("window", fused, device, dtype, head_dim, q_stride)
    found = _ROUTES.get(key)
    if found is None:
        found = _ROUTES[key] = window_route(fused, device, dtype, head_dim, q_stride)
    return found


def clear_routes() -> None:
    """Forget every decided route and device backend (tests that fake a device or a Triton version)."""
    _ROUTES.clear()
    _DEVICE_BACKENDS.clear()


def _batch_element_extent(t: torch.Tensor) -> int:
    """Elements that 32-bit offsets inside one batch element of ``t [B, ...]`` must reach: through its strides, and
    in the contiguous outputs / gradients of its shape that the kernels write."""
    shape = t.shape[1:]
    element = math.prod(shape)
    if element == 0 or t.shape[0] == 0:
        return 0
    return max(1 + sum((n - 1) * abs(st) for n, st in zip(shape, t.stride()[1:])), element)


def call_limit(x: torch.Tensor) -> str | None:
    """Why one call's ``x [B, N, C]`` is past the kernels' launch limits (a batch past the grid axis, a batch
    element past 32-bit offsets through its strides), or None. Valid for every model-zoo shape."""
    B = x.shape[0]
    if B > MAX_GRID_AXIS:
        return f"batch {B} > {MAX_GRID_AXIS}, the largest one kernel launch takes"
    if x.is_contiguous() and x.numel() < MAX_ROW_OFFSET:  # the common case, without the stride walk
        return None
    extent = _batch_element_extent(x)
    if extent >= MAX_ROW_OFFSET:
        return (f"one batch element spans {extent} >= 2**31 elements through its strides (32-bit offsets inside a "
                f"batch element)")
    return None


def attention_call_limit(qkv: torch.Tensor, num_heads: int, num_windows: int) -> str | None:
    """:func:`call_limit` plus the backward kernels' grid axis of heads x windows."""
    if num_heads * num_windows > MAX_GRID_AXIS:
        return (f"num_heads * windows = {num_heads} * {num_windows} > {MAX_GRID_AXIS}, the backward kernels' grid "
                f"limit")
    return call_limit(qkv)


def window_call_limit(qkv: torch.Tensor, num_heads: int, window_size: int) -> str | None:
    """Why one SAM 2 window call's ``qkv [B, H, W, 3C]`` is past the window kernels' launch limits, or None: the
    batch and heads x windows on grid axes, and 32-bit offsets inside a batch element over the padded grid (through
    qkv's strides, and in its contiguous gradient)."""
    B, H, W, three_c = qkv.shape
    if B > MAX_GRID_AXIS:
        return f"batch {B} > {MAX_GRID_AXIS}, the largest one kernel launch takes"
    windows = -(-H // window_size) * -(-W // window_size)
    if num_heads * windows > MAX_GRID_AXIS:
        return (f"num_heads * windows = {num_heads} * {windows} > {MAX_GRID_AXIS}, the window kernels' grid limit")
    Hp, Wp = -(-H // window_size) * window_size, -(-W // window_size) * window_size
    for stride_h, stride_w in (qkv.stride()[1:3], (W * three_c, three_c)):
        extent = (Hp - 1) * abs(stride_h) + (Wp - 1) * abs(stride_w) + three_c
        if extent >= MAX_ROW_OFFSET:
            return (f"one batch element spans {extent} >= 2**31 elements over the padded grid (32-bit offsets inside "
                    f"a batch element)")
    return None


# ---------------------------------------------------------------------------------------------- global attention
GLOBAL_ATTENTION_BACKENDS = ("sdpa", "triton")
_global_attention = "sdpa"


def set_global_attention(backend: str) -> str:
    """The process-wide default of what ``fused=True`` runs for *global* attention (one window: Hiera's last two
    stages) on CUDA; returns the previous default. An op's (a model's) ``global_attention`` overrides it, on any
    device.

    - ``"sdpa"`` (default): :func:`hiera_fast.ops.global_attention_sdpa`, PyTorch's FlashAttention / cuDNN kernels
      reading qkv in place, with the query pooled by the fused max-pool (faster than our kernel at Hiera's global
      calls but the 49-token one: ``benchmarks/results/``).
    - ``"triton"``: our Triton kernels for global attention too.

    CPU tensors (the interpreter lane, the eager fallback) do not change. A compiled model traced with one choice
    guards on it and retraces on its next call after a change."""
    global _global_attention
    if backend not in GLOBAL_ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {GLOBAL_ATTENTION_BACKENDS}, got {backend!r}")
    previous, _global_attention = _global_attention, backend
    return previous


def default_global_attention() -> str:
    return _global_attention


class global_attention:  # noqa: N801  (a context manager, named like the function it wraps)
    """:func:`set_global_attention` for the duration of a ``with`` block; the previous default comes back after."""

    def __init__(self, backend: str):
        self.backend = backend

    def __enter__(self):
        self.previous = set_global_attention(self.backend)
        return self

    def __exit__(self, *exc):
        set_global_attention(self.previous)


# ---------------------------------------------------------------------------------------------- call state
def count(op: str) -> None:
    """Count a launch of ``op`` in :data:`kernel_launches`, except while ``torch.compile`` traces: dynamo would read
    the counter as a constant of the graph and guard on its value, so every later call would fail the guard and
    recompile (until dynamo's limit sent the frame to eager)."""
    if not torch.compiler.is_compiling():
        kernel_launches[op] += 1


def plain_eager(t: torch.Tensor) -> bool:
    """Whether a call can skip ``torch.library``'s dispatch: eager mode (no ``torch.compile``, export or
    ``torch.jit.trace``), a plain tensor (no FakeTensor, DTensor or other subclass) and no dispatch mode active.
    Everything else goes through the custom ops, whose fake implementations those need."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0)


def under_torch_func() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is active: the fused ops have no functorch rules,
    so they run the eager reference there."""
    return torch._C._are_functorch_transforms_active()


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep,
                  os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


def warn_eager_once(op: str, reason: str) -> None:
    """A RuntimeWarning that ``op`` runs the eager path and why, once per op and reason, attributed to the first
    frame outside hiera_fast and torch (the user's line)."""
    if (op, reason) in _warned:
        return
    _warned.add((op, reason))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"hiera_fast: fused {op} runs the eager PyTorch path: {reason}", RuntimeWarning,
                  stacklevel=level + 1)


def reset_warnings() -> None:
    """Warn again about fallbacks already warned about (tests)."""
    _warned.clear()
