"""Argument checks of the public ops: a clear TypeError / ValueError naming the argument, never a reshape error or a
Triton stack trace. Static arguments (heads, strides, flags) are checked once, where an op is built; a call checks
only its tensor."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_flag(name: str, value) -> bool:
    """A bool argument: ``True`` / ``False`` (or 0 / 1, or a numpy bool, as configs may hold); anything else, a
    string like ``"False"`` or None included, is a TypeError rather than read by truthiness."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_attention_args(num_heads, q_stride, window_size, use_mask_unit_attn) -> tuple[int, int, int, bool]:
    """The static arguments of mask-unit attention, checked; ``window_size`` only matters (and must be a positive int)
    for mask-unit attention."""
    use_mask_unit_attn = check_flag("use_mask_unit_attn", use_mask_unit_attn)
    num_heads, q_stride = check_positive_int("num_heads", num_heads), check_positive_int("q_stride", q_stride)
    if use_mask_unit_attn:
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError(f"window_size must be a positive int for mask-unit attention, got {window_size!r}")
    return num_heads, q_stride, window_size, use_mask_unit_attn


def window_count(tokens: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """Windows of an attention call over ``tokens`` (run-time) tokens: ``tokens // (q_stride * window_size)`` for
    mask-unit attention, else 1 (global). No checks: :func:`check_qkv` validates and returns this."""
    return tokens // (q_stride * window_size) if use_mask_unit_attn else 1


def check_qkv_tensor(qkv, num_heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """One call's ``qkv [B, N, 3 * dim]`` against checked static arguments; returns the number of windows."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, N, 3 * dim] (rank 3), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    B, N, three_c = qkv.shape
    if three_c == 0 or three_c % 3 or (three_c // 3) % num_heads:
        raise ValueError(f"qkv's last dim ({three_c}) must be 3 * dim with dim > 0 divisible by num_heads "
                         f"({num_heads})")
    if N == 0:
        raise ValueError(f"qkv must hold at least one token, got shape {tuple(qkv.shape)}")
    if use_mask_unit_attn:
        if N % (q_stride * window_size):
            raise ValueError(f"qkv's token count N={N} must be divisible by q_stride * window_size = "
                             f"{q_stride} * {window_size}")
        return N // (q_stride * window_size)
    if N % q_stride:
        raise ValueError(f"qkv's token count N={N} must be divisible by q_stride={q_stride}")
    return 1


def check_qkv(qkv, num_heads: int, q_stride: int, window_size: int, use_mask_unit_attn: bool) -> int:
    """Validate the attention op's arguments (static and tensor); returns the number of windows."""
    return check_qkv_tensor(qkv, *check_attention_args(num_heads, q_stride, window_size, use_mask_unit_attn))


def check_pool_input(x, stride) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C] (rank 3), got shape {tuple(x.shape)}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if x.shape[1] % stride:
        raise ValueError(f"x's token count N={x.shape[1]} must be divisible by stride={stride}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")


def check_window_args(num_heads, window_size, q_stride) -> tuple[int, int, int]:
    """The static arguments of SAM 2's windowed attention: positive ints, ``q_stride <= window_size``."""
    num_heads, window_size = check_positive_int("num_heads", num_heads), check_positive_int("window_size", window_size)
    q_stride = check_positive_int("q_stride", q_stride)
    if q_stride > window_size:
        raise ValueError(f"q_stride ({q_stride}) must be at most window_size ({window_size})")
    return num_heads, window_size, q_stride


def window_geometry_problem(height: int, width: int, window_size: int, q_stride: int) -> str | None:
    """Why the official SAM 2 block cannot run windows of ``window_size`` with query stride ``q_stride`` on a
    ``height x width`` map, or None. Per side, the pooled map cut into windows of ``ws // q_stride`` must hold as many
    windows as the map cut into windows of ``ws`` (``window_unpartition`` re-reads the pooled windows on the grid
    padded from the pooled size); the kernels' launcher checks the same rule
    (``hiera_fast.kernels.bhwc_windows.check_window_geometry``)."""
    wo = window_size // q_stride
    for n, side in ((height, "height"), (width, "width")):
        if n < q_stride:
            return f"its {side} of {n} tokens is smaller than q_stride={q_stride}"
        if -(-n // window_size) != -(-(n // q_stride) // wo):
            return (f"a {side} of {n} tokens gives {-(-n // window_size)} windows of {window_size} but its pooled "
                    f"{n // q_stride} gives {-(-(n // q_stride) // wo)} of {wo}: the official window_unpartition "
                    f"cannot put them back")
    return None


def check_window_qkv(qkv, bias, num_heads: int, window_size: int, q_stride: int) -> None:
    """One call's ``qkv [B, H, W, 3C]`` and ``bias [3C]`` (or None) against checked static arguments."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be [B, H, W, 3 * C] (rank 4, BHWC), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    B, H, W, three_c = qkv.shape
    if three_c == 0 or three_c % 3 or (three_c // 3) % num_heads:
        raise ValueError(f"qkv's last dim ({three_c}) must be 3 * C with C > 0 divisible by num_heads ({num_heads})")
    problem = window_geometry_problem(H, W, window_size, q_stride)
    if problem:
        raise ValueError(f"qkv's {H}x{W} map cannot take windows of {window_size} with q_stride {q_stride}: {problem}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (three_c,):
            raise ValueError(f"bias must be [3 * C] = [{three_c}] (the qkv Linear's bias), got shape "
                             f"{tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != qkv.device:
            raise ValueError(f"bias is on {bias.device} but qkv on {qkv.device}")
