"""Forward kernels against the eager spec (``hiera_fast.ops.reference``) computed in float64.

On a machine without CUDA the kernels run under Triton's interpreter (fp32/fp16 only: it is wrong for bf16), which
must be switched on before the kernel module is imported. Every launch writes into NaN-poisoned buffers, so an
element the kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hiera_fast.kernels.attention_fwd import attention_forward_config, mask_unit_attention_forward  # noqa: E402
from hiera_fast.kernels.max_pool import unrolled_max_pool_backward, unrolled_max_pool_forward  # noqa: E402
from hiera_fast.kernels.unrolled_layout import softmax_stats_dtype  # noqa: E402
from hiera_fast.ops.reference import (  # noqa: E402
    mask_unit_attention_eager,
    mask_unit_attention_official,
    unrolled_max_pool_eager,
)

from kernel_cases import (  # noqa: E402
    ATTENTION_CASES,
    MAX_POOL_CASES,
    VIDEO_CASES,
    VIDEO_CASES_GPU,
    AttnCase,
    low_precision_bound,
    make_qkv,
    max_abs,
    poisoned_like,
    reference_lse,
    rel_err,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
FP32_REL_TOL = 1e-5


def _run(case: AttnCase, qkv: torch.Tensor):
    """Launch into poisoned out / lse buffers; return both."""
    n_out = case.num_tokens // case.q_stride
    out = poisoned_like((case.batch, n_out, case.channels), qkv.dtype, DEVICE)
    lse = poisoned_like((case.batch, case.num_heads, n_out), softmax_stats_dtype(qkv.dtype), DEVICE)
    res = mask_unit_attention_forward(qkv, case.num_heads, case.q_stride, case.num_windows, return_lse=True,
                                      out=out, lse_out=lse)
    assert res[0] is out and res[1] is lse
    return out, lse


def _check(case: AttnCase, qkv: torch.Tensor):
    out, lse = _run(case, qkv)
    args = (case.num_heads, case.q_stride, case.num_windows)
    ref = mask_unit_attention_official(qkv.double(), *args)
    assert out.shape == ref.shape and out.dtype == qkv.dtype and out.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any(), "kernel left elements unwritten"
    if qkv.dtype in (torch.float32, torch.float64):
        tol = FP32_REL_TOL if qkv.dtype == torch.float32 else 1e-12
        assert rel_err(out, ref) <= tol
    else:
        eager = mask_unit_attention_eager(qkv, *args)
        err, bound = max_abs(out.double() - ref), low_precision_bound(eager, ref)
        assert err <= bound, f"error {err:.2e} > bound {bound:.2e} (2x eager {qkv.dtype} + 1e-3)"
    lse_ref = reference_lse(qkv.double(), *args)
    lse_tol = 1e-12 if qkv.dtype == torch.float64 else 1e-5  # fp64 qkv: an fp64 lse, for fp64-accurate gradients
    assert max_abs(lse.double() - lse_ref) <= lse_tol * max(1.0, max_abs(lse_ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c.id)
def test_attention_forward(case: AttnCase, dtype: torch.dtype):
    _check(case, make_qkv(case, dtype, seed=zlib.crc32(case.id.encode()), device=DEVICE))


@pytest.mark.parametrize("case", VIDEO_CASES + (VIDEO_CASES_GPU if DEVICE == "cuda" else []), ids=lambda c: c.id)
def test_attention_forward_video_global(case: AttnCase):
    _check(case, make_qkv(case, torch.float16, seed=7, device=DEVICE))


@pytest.mark.parametrize("layout", ["sliced", "token-major"])
@pytest.mark.parametrize("case", [ATTENTION_CASES[1], ATTENTION_CASES[2], ATTENTION_CASES[5]], ids=lambda c: c.id)
def test_attention_forward_reads_strided_qkv(case: AttnCase, layout: str):
    case = dataclasses.replace(case, batch=2)
    qkv = make_qkv(case, torch.float32, seed=3, layout=layout, device=DEVICE)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    _check(case, qkv)


@pytest.mark.parametrize("case", [ATTENTION_CASES[3], ATTENTION_CASES[6]], ids=lambda c: c.id)
def test_attention_forward_float64(case: AttnCase):
    _check(case, make_qkv(case, torch.float64, seed=11, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [ATTENTION_CASES[11], ATTENTION_CASES[17]], ids=lambda c: c.id)
def test_attention_forward_scores_far_below_zero(case: AttnCase, dtype: torch.dtype):
    """Window 0's queries and keys point apart with magnitudes ~1e15, so every score of its rows is below -1e30
    (fp32 and fp64 hold that): the softmax is still defined, and the online softmax's running max must start at
    -inf, not at a finite sentinel (a -1e30 start gave an all-zero output). odd-12tok packs two windows per program
    over two 16-key blocks in fp32, so a row also meets a block holding none of its keys; global-qstride9 is one
    window, all extreme."""
    qkv = make_qkv(case, dtype, seed=5, device=DEVICE)
    C = case.channels
    rows = qkv.view(case.batch, -1, case.num_windows, 3 * C)[:, :, 0]  # window 0's tokens (row t * nw + 0)
    rows[..., :C] = 1e15 * (1 + rows[..., :C].abs())
    rows[..., C : 2 * C] = -1e15 * (1 + rows[..., C : 2 * C].abs())
    lse_window0 = reference_lse(qkv.double(), case.num_heads, case.q_stride, case.num_windows)[:, :, ::case.num_windows]
    assert (lse_window0 < -1e30).all()  # log-sum-exp >= every score of the row
    _check(case, qkv)


def test_attention_forward_without_lse_allocates_output():
    case = ATTENTION_CASES[3]
    qkv = make_qkv(case, torch.float32, seed=5, device=DEVICE)
    out = mask_unit_attention_forward(qkv, case.num_heads, case.q_stride, case.num_windows)
    ref = mask_unit_attention_official(qkv.double(), case.num_heads, case.q_stride, case.num_windows)
    assert isinstance(out, torch.Tensor) and out.is_contiguous()
    assert rel_err(out, ref) <= FP32_REL_TOL


def test_host_grid_helpers_equal_tritons():
    """The launchers' plain-Python ``cdiv`` / ``next_power_of_2`` (cheaper per launch) give Triton's values."""
    import triton

    from hiera_fast.kernels.unrolled_layout import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 70000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 400) for b in range(1, 130))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_forward_config_is_valid(dtype: torch.dtype):
    """Cheap: every config the launcher can pick has dot-sized, power-of-two tiles that cover the head dim."""
    geoms = [(64, 1, 49), (64, 4, 49), (16, 1, 49), (16, 4, 49), (196, 1, 1), (196, 4, 1), (49, 1, 1), (1568, 1, 1),
             (1568, 4, 1), (12, 1, 7), (8, 8, 19), (1, 1, 1), (128, 2, 4), (64, 8, 3), (18, 3, 4), (54, 9, 1)]
    for (T, s, nw), head_dim in itertools.product(geoms, [1, 8, 24, 40, 56, 64, 72, 96, 112, 128, 200, 256]):
        cfg = attention_forward_config(head_dim, T, s, nw, dtype)
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "Q_CANDIDATES"):
            assert cfg[k] & (cfg[k] - 1) == 0 and cfg[k] >= (16 if k != "Q_CANDIDATES" else s)  # tl.arange's rule
        assert cfg["BLOCK_D"] >= head_dim and 1 <= cfg["windows_per_program"] <= nw
        if T > 64:  # global attention and big windows loop over key blocks
            assert not cfg["ONE_KV_BLOCK"]
        elif dtype in (torch.float16, torch.bfloat16) and (T, s) in ((64, 1), (64, 4), (16, 1), (16, 4)):
            assert cfg["ONE_KV_BLOCK"]  # the module docstring: the zoo's windowed geometries run without a loop
        assert cfg["num_warps"] in (4, 8)


def test_forward_config_packs_small_windows():
    """docs/DESIGN.md (kernel notes): 16/16 and 4/16 windows are packed into one tile with a block-diagonal mask."""
    assert attention_forward_config(96, 16, 1, 49, torch.bfloat16)["windows_per_program"] == 4  # 64 q x 64 kv
    cfg = attention_forward_config(96, 16, 4, 49, torch.bfloat16)  # 4/16: 4 windows -> 16 q x 64 kv
    assert cfg["windows_per_program"] == 4 and cfg["BLOCK_M"] == 16 and cfg["ONE_KV_BLOCK"]
    assert attention_forward_config(96, 64, 1, 49, torch.bfloat16)["BLOCK_M"] == 64  # stage 1: 64-row (wgmma) tile


# ---- max-pool ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B,N,C,stride", MAX_POOL_CASES)
def test_max_pool_forward(B: int, N: int, C: int, stride: int, dtype: torch.dtype):
    x = torch.randn(B, N, C + 3, device=DEVICE, dtype=dtype)[..., 3:]  # strided view
    out = unrolled_max_pool_forward(x, stride)
    assert out.shape == (B, N // stride, C) and out.is_contiguous()
    assert torch.equal(out, unrolled_max_pool_eager(x, stride))


def test_max_pool_forward_propagates_nan():
    x = torch.randn(2, 16, 32, device=DEVICE)
    x[1, 9, 5] = float("nan")  # candidate j = 2 of row 1 (stride 4, 4 rows out)
    out = unrolled_max_pool_forward(x, 4)
    assert out[1, 1, 5].isnan() and out.isnan().sum() == 1


def _expected_grad(x: torch.Tensor, grad_out: torch.Tensor, stride: int) -> torch.Tensor:
    """Scatter grad_out to the winner: first NaN, else the lowest j holding the maximum (``argmax`` picks the first)."""
    B, N, C = x.shape
    xv = x.double().reshape(B, stride, N // stride, C)
    key = torch.where(xv.isnan(), torch.full_like(xv, float("inf")), xv)
    win = key.argmax(dim=1, keepdim=True)  # first occurrence of the maximum
    grad = torch.zeros_like(xv).scatter_(1, win, grad_out.double().unsqueeze(1))
    return grad.reshape(B, N, C)


@pytest.mark.parametrize("grad_layout", ["contiguous", "expanded", "transposed"])
@pytest.mark.parametrize("B,N,C,stride", MAX_POOL_CASES)
def test_max_pool_backward(B: int, N: int, C: int, stride: int, grad_layout: str):
    x = torch.randn(B, N, C, device=DEVICE, dtype=torch.float32)
    if grad_layout == "contiguous":
        g = torch.randn(B, N // stride, C, device=DEVICE)
    elif grad_layout == "expanded":  # what y.sum().backward() hands over: all strides 0
        g = torch.ones((), device=DEVICE).expand(B, N // stride, C)
    else:
        g = torch.randn(C, N // stride, B, device=DEVICE).permute(2, 1, 0)
    grad = unrolled_max_pool_backward(g, x, stride)
    xr = x.clone().requires_grad_()
    unrolled_max_pool_eager(xr, stride).backward(g) if stride > 1 else xr.backward(g)
    assert grad.shape == x.shape and grad.is_contiguous()
    torch.testing.assert_close(grad, xr.grad, rtol=0, atol=0)  # tie-free data: the eager gradient exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("stride", [2, 4, 8])
def test_max_pool_backward_tie_rule(stride: int, dtype: torch.dtype):
    """Ties (values from {-1, 0, 1}) and a NaN: the gradient goes to the first NaN, else the lowest j."""
    x = torch.randint(-1, 2, (3, 8 * stride, 40), device=DEVICE).to(dtype)
    x[0, 3 + 8 * (stride - 1), 7] = float("nan")  # last candidate of (row 3, channel 7) is NaN: it wins
    g = torch.randn(3, 8, 40, device=DEVICE, dtype=dtype)
    grad = unrolled_max_pool_backward(g, x, stride)
    torch.testing.assert_close(grad.double(), _expected_grad(x, g, stride), rtol=0, atol=0)
    assert (grad != 0).sum() == (g != 0).sum()  # exactly one candidate receives each gradient
