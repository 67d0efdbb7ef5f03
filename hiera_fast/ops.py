"""The public ops: mask-unit attention with query pooling, and the unrolled max-pool.

Each op takes ``fused=``. ``fused=False`` runs the eager PyTorch reference (:mod:`hiera_fast.reference`);
``fused=True`` runs a ``torch.library`` custom op (so ``torch.compile`` sees one opaque node with a fake
implementation and a registered autograd formula) whose body picks a backend from the tensor's device:

- CUDA tensor → the Triton kernels (on GPUs of compute capability 8.0 or newer; older ones take the eager path);
- CPU tensor with ``TRITON_INTERPRET=1`` set before Triton kernels were defined → the same kernels under
  Triton's interpreter (slow; this is how the kernels are tested without a GPU; bfloat16 runs the eager path there);
- anything else → the eager reference, with one warning saying why.

Shapes past the kernels' limits (:func:`_kernel_input_limit`) and calls under ``torch.func`` transforms run the eager
path too, with a warning.

Global attention (one window) on CUDA is the exception: it runs PyTorch's SDPA on views of qkv by default, which is
faster there than our kernel (:func:`set_global_attention`).

In plain eager mode (no ``torch.compile`` or ``torch.jit.trace``, no tensor subclass or dispatch mode) the same
bodies run under a ``torch.autograd.Function`` instead, which skips the dispatcher's host cost; results are
identical.

:func:`fused_backend` says which one a device gets. ``kernel_launches`` counts the Triton launches per op (and the
SDPA-routed global calls, as ``global_attention_sdpa``, outside ``torch.compile`` only: :func:`_count`), so tests can
prove which path ran. The backward runs the Triton backward kernels where they exist, and otherwise the analytic
eager backward of :mod:`hiera_fast.reference` (stated per op below).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import math
import os
import re
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import reference

__all__ = ["mask_unit_attention", "unrolled_max_pool", "fused_backend", "kernel_launches", "check_qkv",
           "global_attention_sdpa", "set_global_attention", "global_attention", "runs_sdpa", "window_count"]

kernel_launches: collections.Counter = collections.Counter()
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[tuple[str, str]] = set()  # (op, reason) pairs already warned about


# ---------------------------------------------------------------------------------------------- backend choice
_KERNEL_MODULES = ("attention_fwd", "attention_bwd", "max_pool")


@functools.lru_cache(maxsize=None)
def _kernel_modules() -> dict | None:
    """Import every ``hiera_fast.kernels`` module at once (so all are defined under the same ``TRITON_INTERPRET``);
    None if Triton or a module is not available."""
    try:
        return {name: importlib.import_module(f"hiera_fast.kernels.{name}") for name in _KERNEL_MODULES}
    except ImportError:
        return None


def _kernel_module(name: str):
    modules = _kernel_modules()
    return None if modules is None else modules[name]


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_interpreted() -> bool | None:
    """Whether the kernels, once imported, were *defined* under Triton's interpreter (``@triton.jit`` reads
    ``TRITON_INTERPRET`` when it decorates, so this, not the current environment, decides where they can run); None
    if no kernel module is imported yet. Does not import anything."""
    for name in _KERNEL_MODULES:
        module = sys.modules.get(f"hiera_fast.kernels.{name}")
        for value in vars(module).values() if module is not None else ():
            kind = type(value).__name__
            if kind in ("InterpretedFunction", "JITFunction"):
                return kind == "InterpretedFunction"
    return None


def fused_backend(device: torch.device | str) -> tuple[str, str]:
    """``(backend, reason)`` that ``fused=True`` uses for tensors on ``device``: "triton", "triton-interpreter" or
    "eager". Imports the kernels if they are not imported yet (with the current ``TRITON_INTERPRET``). A CUDA GPU
    needs compute capability :data:`MIN_CUDA_CAPABILITY` (8.0, Ampere) or newer and Triton :data:`MIN_TRITON` or
    newer, the CPU's interpreter Triton :data:`MIN_INTERPRETER_TRITON`; short of those the device gets "eager"."""
    device = torch.device(device)
    if _kernel_modules() is None:
        return "eager", "Triton (or the hiera_fast.kernels modules) could not be imported"
    interpreted = kernels_interpreted()
    if device.type == "cuda":
        if interpreted:
            return "eager", ("the kernels were defined under TRITON_INTERPRET=1 (Triton's interpreter), which cannot "
                             "launch them on CUDA: unset it before hiera_fast's kernels are imported")
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
                         f"{when} hiera_fast's kernels were imported")
    return "eager", f"no Triton kernels for device type {device.type!r}"


MIN_CUDA_CAPABILITY = (8, 0)
MIN_TRITON = (3, 3)
MIN_FP64_TRITON = (3, 5)  # float64 tl.dot: 3.3 and 3.4 fail to compile the attention kernels in fp64
MIN_INTERPRETER_TRITON = (3, 7)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _triton_too_old(minimum: tuple[int, int]) -> str | None:
    """The installed Triton's version string when it is older than ``minimum`` (major, minor), else None (also when
    Triton is not installed: the callers' other checks cover that)."""
    try:
        import triton
    except ImportError:
        return None

    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    return triton.__version__ if version < minimum else None


def _compiler_limit() -> str | None:
    """Why this Triton cannot build the kernels for a GPU (older than :data:`MIN_TRITON`), or None.

    The compile lane's tooling, run with each Triton on 2026-11-27: 3.5.1 through 3.8 build every variant for
    sm_80 and sm_90; 3.3.1 and 3.4.0 every fp16/bf16/fp32 variant, not fp64 ("Unsupported lhs dtype fp64" in
    ``tl.dot``: :data:`MIN_FP64_TRITON`); 3.1 aborts the process inside its compiler on the forward kernel (an
    assertion in its layout conversion) and fails the bfloat16 backward. Triton 3.2 was not checked."""
    old = _triton_too_old(MIN_TRITON)
    if old is None:
        return None
    return (f"Triton {old} is older than {_dotted(MIN_TRITON)}, the oldest that builds the kernels "
            f"(older ones fail or abort inside their compiler); upgrade triton (and torch) to use them")


def _interpreter_limit() -> str | None:
    """Why Triton's interpreter cannot run the kernels (a Triton older than :data:`MIN_INTERPRETER_TRITON`), or None.

    Triton 3.6's interpreter fails on loops whose bounds the kernel computes ("only 0-dimensional arrays can be
    converted to Python scalars"); 3.7.1 and 3.8 run the test suite's kernel cases. Compiled for a GPU, Triton
    :data:`MIN_TRITON` and newer build the kernels: this is about the CPU interpreter only."""
    old = _triton_too_old(MIN_INTERPRETER_TRITON)
    if old is None:
        return None
    return (f"Triton {old}'s interpreter cannot run the kernels (loops with computed bounds); it needs "
            f"triton >= {_dotted(MIN_INTERPRETER_TRITON)} (compiled for a CUDA GPU, triton >= {_dotted(MIN_TRITON)} "
            f"is fine)")


def _cuda_capability_limit(device: torch.device) -> str | None:
    """Why the kernels should not run on this CUDA device (a GPU older than Ampere), or None.

    Triton (3.8) builds them for sm_70/sm_75 too, but without tensor cores (no ``mma`` in the PTX) and with 2.8-8.6 KB
    of register spills per thread in the windowed kernels (the compile lane's tooling, run for those targets). SDPA
    uses the tensor cores there, so the eager path is the better bet; not measured, and the kernels were never run
    on such a GPU."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= MIN_CUDA_CAPABILITY:
        return None
    need = _dotted(MIN_CUDA_CAPABILITY)
    return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; the Triton kernels need "
            f"{need} or newer (Ampere, Ada, Hopper, Blackwell): Triton builds them for older GPUs without tensor "
            f"cores, where PyTorch's SDPA is the better choice")


@functools.lru_cache(maxsize=None)
def _backend_for(device: torch.device) -> tuple[str, str]:
    return fused_backend(device)  # fixed per device once the kernels are imported: cached


def _use_triton(device: torch.device, op: str, unsupported: str | None = None) -> bool:
    """Whether ``op`` runs the Triton kernels on ``device``; ``unsupported`` is a shape the kernels do not take (see
    :func:`_kernel_input_limit`). Warns once per op and reason when it falls back to the eager path."""
    backend, reason = _backend_for(device)  # cached: this runs on every fused call
    if backend != "eager" and unsupported:
        backend, reason = "eager", unsupported
    if backend == "eager":
        _warn_eager_once(op, reason)
    return backend != "eager"


def _warn_eager_once(op: str, reason: str) -> None:
    """The fallback warning, once per op and reason."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        _warn_at_caller(f"hiera_fast: fused {op} runs the eager PyTorch path: {reason}")


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


def _warn_at_caller(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside hiera_fast and torch (the user's line), not to torch's
    custom-op machinery that runs the op's body."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level + 1)


MAX_FUSED_HEAD_DIM = 256
_MAX_GRID_AXIS = 65535  # CUDA's limit on grid axes y and z, where the kernels put the batch (and heads * windows)
_MAX_ROW_OFFSET = 2**31  # offsets inside one batch element are 32-bit in the kernels


def _batch_element_extent(t: torch.Tensor) -> int:
    """Elements that 32-bit offsets inside one batch element of ``t [B, ...]`` must reach: through its strides, and
    in the contiguous outputs / gradients of its shape that the kernels write."""
    shape = t.shape[1:]
    element = math.prod(shape)
    if element == 0 or t.shape[0] == 0:
        return 0
    return max(1 + sum((n - 1) * abs(st) for n, st in zip(shape, t.stride()[1:])), element)


def _kernel_input_limit(x: torch.Tensor, head_dim: int | None = None) -> str | None:
    """Why the kernels cannot take ``x [B, N, C]`` (batch past the grid limit, a batch element past 32-bit offsets,
    ``head_dim`` past :data:`MAX_FUSED_HEAD_DIM`, bfloat16 on the CPU), or None. Valid for every model-zoo shape;
    beyond it the fused ops run the eager path rather than fail inside Triton or return a wrong answer."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return ("bfloat16 on the CPU: Triton's interpreter computes bfloat16 wrongly (the kernels run bfloat16 on a "
                "GPU)")
    B, N, C = x.shape
    if head_dim is not None and head_dim > MAX_FUSED_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_FUSED_HEAD_DIM}, the largest the Triton kernels take"
    if B > _MAX_GRID_AXIS:
        return f"batch {B} > {_MAX_GRID_AXIS}, the largest one kernel launch takes"
    extent = _batch_element_extent(x)
    if extent >= _MAX_ROW_OFFSET:
        return (f"one batch element spans {extent} >= 2**31 elements through its strides (32-bit offsets inside a "
                f"batch element)")
    return None


# ---------------------------------------------------------------------------------------------- input checks
def check_qkv(qkv: torch.Tensor, num_heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """Validate the attention op's arguments; returns the number of windows. Raises TypeError/ValueError."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, N, 3 * dim] (rank 3), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    use_mask_unit_attn = _check_flag("use_mask_unit_attn", use_mask_unit_attn)
    for name, value in (("num_heads", num_heads), ("q_stride", q_stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    B, N, three_c = qkv.shape
    if three_c == 0 or three_c % 3 or (three_c // 3) % num_heads:
        raise ValueError(f"qkv's last dim ({three_c}) must be 3 * dim with dim > 0 divisible by num_heads "
                         f"({num_heads})")
    if N == 0:
        raise ValueError(f"qkv must hold at least one token, got shape {tuple(qkv.shape)}")
    if use_mask_unit_attn:
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError(f"window_size must be a positive int for mask-unit attention, got {window_size!r}")
        if N % (q_stride * window_size):
            raise ValueError(f"qkv's token count N={N} must be divisible by q_stride * window_size = "
                             f"{q_stride} * {window_size}")
    elif N % q_stride:
        raise ValueError(f"qkv's token count N={N} must be divisible by q_stride={q_stride}")
    return window_count(N, q_stride, window_size, use_mask_unit_attn)


def _check_flag(name: str, value) -> bool:
    """A bool argument: ``True`` / ``False`` (or 0 / 1, or a numpy bool, as configs may hold); anything else, a
    string like ``"False"`` or None included, is a TypeError rather than read by truthiness."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def window_count(tokens: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """Windows of an attention call over ``tokens`` (run-time) tokens: ``tokens // (q_stride * window_size)`` for
    mask-unit attention, else 1 (global). No checks: :func:`check_qkv` validates and returns this."""
    return tokens // (q_stride * window_size) if use_mask_unit_attn else 1


def _check_pool(x: torch.Tensor, stride: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C] (rank 3), got shape {tuple(x.shape)}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if x.shape[1] % stride:
        raise ValueError(f"x's token count N={x.shape[1]} must be divisible by stride={stride}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")


def _count(op: str) -> None:
    """Count a call of ``op`` in :data:`kernel_launches`, except while ``torch.compile`` traces it: dynamo would read
    the counter as a constant of the graph and guard on its value, so the next call would fail the guard and
    recompile, every call, until dynamo's recompile limit, after which the frame runs uncompiled (no CUDA graphs).
    The custom ops' bodies (the Triton launches) run untraced, also inside compiled graphs, and count there; the
    SDPA-routed global calls are traced code, so a compiled graph's ones are not counted."""
    if not torch.compiler.is_compiling():
        kernel_launches[op] += 1


def _launch(op: str, module: str, launcher: str, device: torch.device, *args, **kwargs):
    """Call ``hiera_fast.kernels.<module>.<launcher>(*args, **kwargs)`` on ``device`` and count it in
    :data:`kernel_launches` under ``op``.

    Triton launches on the *current* CUDA device, not on the tensors' device: without the guard a tensor on
    ``cuda:1`` while ``cuda:0`` is current would be read by a kernel running on the wrong GPU."""
    _count(op)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        return getattr(_kernel_module(module), launcher)(*args, **kwargs)


_AUTOCAST_DEVICES = ("cuda", "cpu")


def _autocast_input(qkv: torch.Tensor) -> torch.Tensor:
    """Under ``torch.autocast`` the attention runs in the autocast dtype, as SDPA does there (fp32 / fp16 / bf16 inputs
    are cast; fp64 is not). Casting before the max-pool is exact: rounding is monotonic, so it commutes with max."""
    device_type = qkv.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type) and qkv.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        if qkv.dtype != dtype:
            return qkv.to(dtype)
    return qkv


def _no_autocast(device: torch.device):
    """The custom ops' bodies compute in their inputs' dtype (what the fake impls promise), autocast or not."""
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels read any batch/row strides but need a unit stride on the channel dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------- attention op
def _attention_forward_impl(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int,
                            with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, N // q_stride, C], lse)``.

    With ``with_lse`` (training) ``lse`` is ``[B, heads, N // q_stride]`` float32 (float64 for float64 qkv) for the
    backward kernel; the eager backend fills it with zeros (its backward recomputes instead; zeros, not uninitialised
    memory, so the op's outputs are deterministic, as ``opcheck`` and compiled graphs expect). Without it (inference)
    ``lse`` is empty. The shapes never depend on the backend, so a compiled graph (and inductor's on-disk cache)
    stays valid whichever backend runs it."""
    if _use_triton(qkv.device, "mask_unit_attention", _attention_input_limit(qkv, num_heads, num_windows)):
        result = _launch("mask_unit_attention_fwd", "attention_fwd", "mask_unit_attention_forward", qkv.device,
                         _unit_last_stride(qkv), num_heads, q_stride, num_windows, return_lse=with_lse)
        return result if with_lse else (result, _lse_like(qkv, num_heads, q_stride, False))
    with _no_autocast(qkv.device):
        out = reference.mask_unit_attention_eager(qkv, num_heads, q_stride, num_windows)
    return out, _lse_like(qkv, num_heads, q_stride, with_lse).zero_()


_attention_fwd = torch.library.custom_op("hiera_fast::mask_unit_attention_fwd", mutates_args=())(
    _attention_forward_impl)


def _float64_dot_limit(dtype: torch.dtype, device_type: str) -> str | None:
    """Why the attention kernels cannot take float64 here (CUDA with a Triton older than :data:`MIN_FP64_TRITON`),
    or None. The interpreter runs float64 with any Triton it runs at all."""
    if dtype != torch.float64 or device_type != "cuda":
        return None
    old = _triton_too_old(MIN_FP64_TRITON)
    if old is None:
        return None
    return (f"float64 on CUDA needs triton >= {_dotted(MIN_FP64_TRITON)} (Triton {old} cannot compile the "
            f"attention kernels' float64 dot)")


def _attention_input_limit(qkv: torch.Tensor, num_heads: int, num_windows: int) -> str | None:
    """The forward and the backward fall back together (the eager forward leaves no lse for the kernel)."""
    if num_heads * num_windows > _MAX_GRID_AXIS:
        return (f"num_heads * windows = {num_heads} * {num_windows} > {_MAX_GRID_AXIS}, the backward kernels' grid "
                f"limit")
    return _float64_dot_limit(qkv.dtype, qkv.device.type) or _kernel_input_limit(qkv, qkv.shape[-1] // (3 * num_heads))


def _lse_like(qkv: torch.Tensor, num_heads: int, q_stride: int, with_lse: bool) -> torch.Tensor:
    """The forward's lse buffer: ``[B, heads, N // q_stride]`` (``[0]`` without ``with_lse``), float64 for float64
    qkv, else float32 (``hiera_fast.kernels.unrolled_layout.softmax_stats_dtype``, which the kernels allocate)."""
    B, N, _ = qkv.shape
    dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return qkv.new_empty((B, num_heads, N // q_stride) if with_lse else (0,), dtype=dtype)


@_attention_fwd.register_fake
def _attention_fwd_fake(qkv, num_heads, q_stride, num_windows, with_lse=True):
    B, N, three_c = qkv.shape
    return qkv.new_empty(B, N // q_stride, three_c // 3), _lse_like(qkv, num_heads, q_stride, with_lse)


def _attention_backward_impl(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """``d_qkv [B, N, 3C]`` in qkv's unrolled layout: the Triton backward kernel where available, else the analytic
    eager backward (:func:`hiera_fast.reference.mask_unit_attention_backward_eager`)."""
    unsupported = _attention_input_limit(qkv, num_heads, num_windows)  # the forward's choice, so its lse is there
    if _kernel_module("attention_bwd") is not None and _use_triton(qkv.device, "mask_unit_attention backward",
                                                                  unsupported):
        if _batch_element_extent(grad_out) >= _MAX_ROW_OFFSET:  # a strided view of a huge tensor: 32-bit offsets
            grad_out = grad_out.contiguous()
        return _launch("mask_unit_attention_bwd", "attention_bwd", "mask_unit_attention_backward", qkv.device,
                       grad_out, _unit_last_stride(qkv), out, lse, num_heads, q_stride, num_windows)
    with _no_autocast(qkv.device):
        return reference.mask_unit_attention_backward_eager(grad_out, qkv, num_heads, q_stride, num_windows)


_attention_bwd = torch.library.custom_op("hiera_fast::mask_unit_attention_bwd", mutates_args=())(
    _attention_backward_impl)


@_attention_bwd.register_fake
def _attention_bwd_fake(grad_out, qkv, out, lse, num_heads, q_stride, num_windows):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _attention_setup_context(ctx, inputs, output):
    qkv, num_heads, q_stride, num_windows, _ = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_heads, q_stride, num_windows)


def _attention_backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_bwd(grad_out, qkv, out, lse, *ctx.args), None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


class _AttentionFunction(torch.autograd.Function):
    """Eager mode's autograd node for the fused attention: the custom ops' bodies without ``torch.library``'s
    dispatch, which costs ~190 µs of host time per forward + backward (measured on CPU), while eager-mode training
    of Hiera-B at batch 128 is host-bound on an H200 (``benchmarks/results/2026-11-27-h200``). Same results:
    both paths run :func:`_attention_forward_impl` / :func:`_attention_backward_impl`. No double backward."""

    @staticmethod
    def forward(ctx, qkv, num_heads, q_stride, num_windows):
        out, lse = _attention_forward_impl(qkv, num_heads, q_stride, num_windows, True)
        ctx.save_for_backward(qkv, out, lse)
        ctx.args = (num_heads, q_stride, num_windows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        return _attention_backward_impl(grad_out, qkv, out, lse, *ctx.args), None, None, None


def _plain_eager(t: torch.Tensor) -> bool:
    """Whether a call can skip ``torch.library``'s dispatch: eager mode (not traced by ``torch.compile`` / export /
    ``torch.jit.trace``), a plain tensor (no subclass such as FakeTensor or DTensor) and no dispatch mode (e.g. a
    FakeTensorMode) active. Everything else goes through the custom ops, whose fake implementations and autograd
    formulas those need. (``torch.func`` transforms never get here: :func:`_under_torch_func` sends them to the eager
    path first.)"""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling() and not torch._C._is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0)


def _under_torch_func(op: str) -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, jacrev, ...) is active. The custom ops have no rules for
    them (``torch.library``'s autograd formula is not a functorch-ready ``autograd.Function``, and their wrapped
    tensors have no storage for a kernel to read), so the fused ops run the eager path there: per-sample gradients
    and friends stay right, at eager speed. Warns once per op."""
    if not torch._C._are_functorch_transforms_active():
        return False
    _warn_eager_once(op, "a torch.func transform (grad, vmap, jvp, ...) is active; the fused ops have no rules for "
                         "them")
    return True


def mask_unit_attention(
    qkv: torch.Tensor,
    num_heads: int,
    q_stride: int,
    window_size: int,
    use_mask_unit_attn: bool,
    fused: bool = False,
) -> torch.Tensor:
    """Mask-unit (or global) attention with query max-pooling, on the qkv Linear's output.

    Args:
        qkv: ``[B, N, 3 * dim]``, channels ``(3, heads, head_dim)``, tokens in Hiera's unrolled order.
        num_heads: attention heads.
        q_stride: flattened query pooling stride (1 = no pooling).
        window_size: flattened mask-unit size *after* pooling (as the official ``MaskUnitAttention``).
        use_mask_unit_attn: windowed attention over ``N // (q_stride * window_size)`` windows, else global.
        fused: run the Triton kernels (see the module docstring for the backend choice); global attention on CUDA
            runs :func:`global_attention_sdpa` unless :func:`set_global_attention` says ``"triton"``.

    Returns:
        ``[B, N // q_stride, dim]`` in unrolled order (row ``r * num_windows + w``), before the output projection,
        in qkv's dtype; under ``torch.autocast`` in the autocast dtype (as SDPA), fused or not.
    """
    num_windows = check_qkv(qkv, num_heads, q_stride, window_size, use_mask_unit_attn)
    qkv = _autocast_input(qkv)
    if not _check_flag("fused", fused) or _under_torch_func("mask_unit_attention"):
        return reference.mask_unit_attention_eager(qkv, num_heads, q_stride, num_windows)
    if runs_sdpa(num_windows, qkv.device):
        return global_attention_sdpa(qkv, num_heads, q_stride)
    with_lse = torch.is_grad_enabled() and qkv.requires_grad  # the backward kernel needs it; inference does not
    if not _plain_eager(qkv):
        return _attention_fwd(qkv, num_heads, q_stride, num_windows, with_lse)[0]
    if with_lse:
        return _AttentionFunction.apply(qkv, num_heads, q_stride, num_windows)
    return _attention_forward_impl(qkv, num_heads, q_stride, num_windows, False)[0]


# ---------------------------------------------------------------------------------------------- global attention
GLOBAL_ATTENTION_BACKENDS = ("sdpa", "triton")
_global_attention = "sdpa"


def set_global_attention(backend: str) -> str:
    """Choose what ``fused=True`` runs for *global* attention (one window: Hiera's last two stages) on CUDA; returns
    the previous choice. Mask-unit attention always runs the Triton kernels.

    - ``"sdpa"`` (default): :func:`global_attention_sdpa`, PyTorch's FlashAttention / cuDNN kernels reading qkv in
      place, with the query pooled by the fused max-pool. Measured on an H200 (bf16,
      ``benchmarks/results/2026-11-27-h200``), this runs Hiera-B's global calls (head dim 96, 196 to 1568 keys)
      1.15-4.4x faster than our Triton global kernel, forward and forward+backward; only at 49 tokens (stage 4 at
      224², about 3 % of the attention time) is our kernel faster, by 1.1-1.3x (SDPA there costs about 0.4 %).
      Global attention has no windows to gather, so the fusion has little to win there.
    - ``"triton"``: our Triton kernels for global attention too (the split backward of ``kernels/attention_bwd``).

    CPU tensors (the interpreter lane, the eager fallback) do not change. Read when a call runs; a compiled model
    traced with one choice guards on it and retraces on its next call after a change."""
    global _global_attention
    if backend not in GLOBAL_ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {GLOBAL_ATTENTION_BACKENDS}, got {backend!r}")
    previous, _global_attention = _global_attention, backend
    return previous


@contextlib.contextmanager
def global_attention(backend: str):
    """:func:`set_global_attention` for the duration of a ``with`` block (the previous choice comes back after)."""
    previous = set_global_attention(backend)
    try:
        yield
    finally:
        set_global_attention(previous)


def _global_attention_runs_sdpa(device: torch.device) -> bool:
    return _global_attention == "sdpa" and device.type == "cuda"


def runs_sdpa(num_windows: int, device: torch.device) -> bool:
    """Whether ``fused=True`` runs an attention call of ``num_windows`` windows (the run-time count: an MAE that keeps
    one mask unit has one) on ``device`` by :func:`global_attention_sdpa` rather than our kernels."""
    return num_windows == 1 and _global_attention_runs_sdpa(torch.device(device))


def global_attention_sdpa(qkv: torch.Tensor, num_heads: int, q_stride: int) -> torch.Tensor:
    """Global attention with query max-pooling by SDPA on strided views of ``qkv [B, N, 3C]`` (no copies of K and V;
    the pooled query is the fused max-pool's contiguous output) → ``[B, N // q_stride, C]``. Autograd is PyTorch's:
    the backward stacks dq, dk, dv into ``d_qkv`` once (the ``unbind``). Same contract as
    :func:`mask_unit_attention` with one window. Counted in :data:`kernel_launches` outside ``torch.compile``."""
    _count("global_attention_sdpa")
    qkv = _unit_last_stride(qkv)  # SDPA's fused kernels need unit-stride head dims (else its slow math path)
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    if B == 0:  # an empty result still tied to qkv's autograd (SDPA's CUDA kernels reject a batch of 0 in some torch)
        return qkv[:, : N // q_stride, :C].clone()
    q, k, v = qkv.view(B, N, 3, num_heads, head_dim).unbind(2)  # each [B, N, H, hd], unit stride on hd
    if q_stride > 1:
        q = unrolled_max_pool(q.reshape(B, N, C), q_stride, fused=True).view(B, N // q_stride, num_heads, head_dim)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, N', hd]
    return out.transpose(1, 2).reshape(B, N // q_stride, C)


# ---------------------------------------------------------------------------------------------- max-pool op
def _pool_forward_impl(x: torch.Tensor, stride: int) -> torch.Tensor:
    if _use_triton(x.device, "unrolled_max_pool", _kernel_input_limit(x)):
        return _launch("unrolled_max_pool_fwd", "max_pool", "unrolled_max_pool_forward", x.device,
                       _unit_last_stride(x), stride)
    return reference.unrolled_max_pool_eager(x, stride)


_pool_fwd = torch.library.custom_op("hiera_fast::unrolled_max_pool_fwd", mutates_args=())(_pool_forward_impl)


@_pool_fwd.register_fake
def _pool_fwd_fake(x, stride):
    return x.new_empty(x.shape[0], x.shape[1] // stride, x.shape[2])


def _pool_backward_impl(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Gradient routed to the winning candidate (lowest index among ties)."""
    if _use_triton(x.device, "unrolled_max_pool backward", _kernel_input_limit(x)):
        return _launch("unrolled_max_pool_bwd", "max_pool", "unrolled_max_pool_backward", x.device,
                       grad_out, _unit_last_stride(x), stride)
    return reference.unrolled_max_pool_backward_eager(grad_out, x, stride)


_pool_bwd = torch.library.custom_op("hiera_fast::unrolled_max_pool_bwd", mutates_args=())(_pool_backward_impl)


@_pool_bwd.register_fake
def _pool_bwd_fake(grad_out, x, stride):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _pool_setup_context(ctx, inputs, output):
    x, stride = inputs
    ctx.save_for_backward(x)
    ctx.stride = stride


def _pool_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _pool_bwd(grad_out, x, ctx.stride), None


_pool_fwd.register_autograd(_pool_backward, setup_context=_pool_setup_context)


class _PoolFunction(torch.autograd.Function):
    """Eager mode's autograd node for the fused max-pool (see :class:`_AttentionFunction`)."""

    @staticmethod
    def forward(ctx, x, stride):
        ctx.save_for_backward(x)
        ctx.stride = stride
        return _pool_forward_impl(x, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return _pool_backward_impl(grad_out, x, ctx.stride), None


def unrolled_max_pool(x: torch.Tensor, stride: int, fused: bool = False) -> torch.Tensor:
    """Max-pool over the leading unroll level: ``[B, N, C]`` → ``[B, N // stride, C]`` (the pooled residual).

    Equal to ``x.view(B, stride, N // stride, C).max(1).values``; the gradient goes to the winning element.
    """
    _check_pool(x, stride)
    fused = _check_flag("fused", fused)
    if stride == 1:
        return x
    if not fused or _under_torch_func("unrolled_max_pool"):
        return reference.unrolled_max_pool_eager(x, stride)
    if not _plain_eager(x):
        return _pool_fwd(x, stride)
    if torch.is_grad_enabled() and x.requires_grad:
        return _PoolFunction.apply(x, stride)
    return _pool_forward_impl(x, stride)
