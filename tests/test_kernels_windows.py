"""Fused SAM 2 window attention (``hiera_fast.kernels.window_attention``) against the official formulation.

Interpreter lane (``TRITON_INTERPRET=1`` on the CPU; a CUDA device adds bf16): forward and backward against float64
(:func:`hiera_fast.ops.reference.window_attention_bhwc_reference`, autograd for the gradients, ``d_bias`` included)
on every windowed block geometry of SAM 2.1 tiny / small / base_plus / large at 1024² (from ``block_specs``), each
map cropped to at most 2 x 2 windows with its window size, head dim, ``q_stride`` and padding pattern kept (a side
of ``n * ws + rem`` becomes ``ws + rem``, or ``2 * ws``; the width is cut shorter than the height, so rows and
columns are not interchangeable), one or two heads, batch 1 (2 where batch offsets are tested). Plus: odd windows
that pool (padding candidates of uncropped outputs), real rows whose outputs are cropped, no bias, strided inputs,
stride-0 gradients, determinism, max-pool ties and NaNs, ``gradcheck`` in float64, the geometry rule, configs.
Inputs are bias-heavy (qkv ~ N(0, 1), bias ~ 3 N(0, 1)), so a padded token read as zero, masked, or dropped from
``d_bias`` is far outside the tolerances: fp32 <= 1e-5 relative, fp16 <= 2x eager fp16's error + a floor.
Outputs are written into NaN-poisoned buffers with a NaN tail past their end: every element written, nothing
beyond (a missing crop writes past the end).

Compile lane: every call point of ``window_attention_variants()`` is compiled for sm_80 and sm_90 in a subprocess
without the interpreter (this file is its script, as tests/test_kernels_compile.py): registers, spills == 0 (fp64,
a test dtype, and fp32 at head dim 256, not a SAM 2 head dim, are listed but not failed), shared memory under the
limit, and the fp32 dot precision read from the PTX (forward 3xTF32, backward IEEE).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

if __name__ != "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hiera_fast.kernels import window_attention as wa  # noqa: E402
from hiera_fast.kernels.bhwc_windows import check_window_geometry  # noqa: E402
from hiera_fast.ops.reference import window_attention_bhwc_reference as reference  # noqa: E402
from hiera_fast.sam2.attention import window_attention as sam2_window_attention  # noqa: E402
from hiera_fast.sam2.config import HieraDetConfig  # noqa: E402
from hiera_fast.sam2.model import window_partition, window_unpartition  # noqa: E402

from kernel_cases import low_precision_bound, max_abs, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
FP32_TOL = 1e-5
TAIL = 64  # extra NaN elements past the poisoned tail of every output buffer


# ---------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class WinCase:
    """One windowed block: ``qkv [batch, height, width, 3 * heads * head_dim]``, windows of ``window``."""

    batch: int
    height: int
    width: int
    window: int
    q_stride: int
    heads: int
    head_dim: int
    label: str = ""

    @property
    def id(self) -> str:
        return (f"{self.label}-b{self.batch}-{self.height}x{self.width}-ws{self.window}-q{self.q_stride}"
                f"-h{self.heads}x{self.head_dim}")


def _crop(side: int, window: int) -> int:
    """A side with at most two windows and the same padding: ``n * ws + rem`` -> ``ws + rem`` (or ``2 * ws``)."""
    return window + side % window if side % window else min(side, 2 * window)


def sam2_cases() -> list[WinCase]:
    """Every distinct windowed block of the SAM 2.1 presets at 1024² (tiny and small share theirs), cropped."""
    seen, cases = set(), []
    for preset in ("tiny", "small", "base_plus", "large"):
        cfg = HieraDetConfig.from_preset(f"sam2.1_hiera_{preset}")
        side = cfg.check_image_size(1024, 1024)[0]
        for spec in cfg.block_specs():
            ws, q, hd = spec.window_size, spec.q_stride or 1, spec.dim_out // spec.num_heads
            height, width = _crop(side, ws or 1), (side % ws or ws) if ws else 0  # width: one window, padded
            if ws and (height, width, ws, q, hd) not in seen:
                seen.add((height, width, ws, q, hd))
                heads = 1 if ws >= 14 else min(2, spec.num_heads)  # big windows: one head (interpreter time)
                cases.append(WinCase(1, height, width, ws, q, heads, hd, f"{preset}-blk{spec.index}-{side}"))
            side //= q
    return cases


SAM2_CASES = sam2_cases()
# beyond SAM 2 at 1024²: odd windows that pool (padding candidates of uncropped outputs; a window's last row and
# column belong to no candidate), real rows whose outputs are cropped (23 = 14 + 9 rows: row 22 pools to row 11 of
# an 11-row output), a wide non-square map, batch 2, a head dim that pads to 32
EXTRA_CASES = [
    WinCase(1, 12, 12, 7, 2, 1, 24, "odd-window-pool"),
    WinCase(1, 23, 9, 14, 2, 1, 16, "cropped-real-rows"),
    WinCase(2, 6, 10, 4, 2, 2, 20, "batch2-wide"),
    WinCase(2, 11, 7, 7, 1, 1, 64, "batch2-pad3"),
]


def make_inputs(case: WinCase, dtype: torch.dtype, *, bias_scale: float = 3.0, seed: int | None = None):
    """Bias-heavy ``(qkv, bias)`` on DEVICE: qkv ~ N(0, 1), bias ~ bias_scale * N(0, 1)."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) if seed is None else seed)
    three_c = 3 * case.heads * case.head_dim
    qkv = torch.randn(case.batch, case.height, case.width, three_c, generator=g, dtype=torch.float64)
    bias = bias_scale * torch.randn(three_c, generator=g, dtype=torch.float64)
    return qkv.to(DEVICE, dtype), bias.to(DEVICE, dtype)


def poisoned(shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(a contiguous NaN buffer of ``shape``, its storage: twice as long again, NaN, so that a store past the end
    (an uncropped output: at most the padded grid, < 3x the map here) lands in it and not in memory of others)."""
    n = 1
    for s in shape:
        n *= s
    storage = torch.full((3 * n + TAIL,), float("nan"), dtype=dtype, device=DEVICE)
    return storage[:n].view(shape), storage  # [*shape], [3n + TAIL]


def reference_lse(qkv: torch.Tensor, bias: torch.Tensor | None, heads: int, ws: int, q: int) -> torch.Tensor:
    """``[B, heads, H // q, W // q]``: log-sum-exp over each window's keys of ``q_pooled . k / sqrt(hd)``, built from
    the model's own ``window_partition`` / ``window_unpartition`` (independent of the reference's index math)."""
    B, H, W, three_c = qkv.shape
    hd = three_c // 3 // heads
    windows, padded = window_partition(qkv, ws)  # [B * nW, ws, ws, 3C], zero-padded
    if bias is not None:
        real, _ = window_partition(torch.ones(B, H, W, 1, dtype=qkv.dtype, device=qkv.device), ws)
        windows = windows + (1 - real) * bias
    q_, k = windows[..., : three_c // 3], windows[..., three_c // 3 : 2 * three_c // 3]
    if q > 1:
        q_ = F.max_pool2d(q_.permute(0, 3, 1, 2), q, q).permute(0, 2, 3, 1)  # [B * nW, wo, wo, C]
    wo = q_.shape[1]
    qh = q_.reshape(-1, wo * wo, heads, hd).transpose(1, 2)  # [B * nW, heads, wo², hd]
    kh = k.reshape(-1, ws * ws, heads, hd).transpose(1, 2)  # [B * nW, heads, ws², hd]
    lse = ((qh @ kh.transpose(-1, -2)) * hd**-0.5).logsumexp(-1)  # [B * nW, heads, wo²]
    size = (H // q, W // q)
    padded = (size[0] + (-size[0]) % wo, size[1] + (-size[1]) % wo)
    lse = window_unpartition(lse.transpose(1, 2).reshape(-1, wo, wo, heads), wo, padded, size)  # [B, H', W', heads]
    return lse.permute(0, 3, 1, 2)


def run_forward(case: WinCase, qkv: torch.Tensor, bias: torch.Tensor | None):
    """The kernel forward into poisoned buffers; asserts every element written and nothing past the end."""
    shape = (case.batch, case.height // case.q_stride, case.width // case.q_stride)
    out, out_storage = poisoned((*shape, case.heads * case.head_dim), qkv.dtype)
    lse, lse_storage = poisoned((case.batch, case.heads, *shape[1:]), torch.float64 if qkv.dtype == torch.float64
                                else torch.float32)
    res = wa.window_attention_forward(qkv, bias, case.heads, case.window, case.q_stride, return_lse=True, out=out,
                                      lse_out=lse)
    assert res[0] is out and res[1] is lse
    for name, storage in (("out", out_storage), ("lse", lse_storage)):
        n = (storage.numel() - TAIL) // 3
        assert not storage[:n].isnan().any(), f"{name}: elements left unwritten"
        assert storage[n:].isnan().all(), f"{name}: written past its end (a missing crop?)"
    return out, lse


def run_backward(case: WinCase, g: torch.Tensor, qkv: torch.Tensor, bias, out: torch.Tensor, lse: torch.Tensor):
    d_qkv, storage = poisoned(qkv.shape, qkv.dtype)
    got, d_bias = wa.window_attention_backward(g, qkv, bias, out, lse, case.heads, case.window, case.q_stride,
                                               d_qkv=d_qkv)
    assert got is d_qkv and d_bias.shape == (qkv.shape[-1],)
    assert d_bias.dtype == (torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    n = qkv.numel()
    assert not storage[:n].isnan().any(), "d_qkv: elements left unwritten"
    assert storage[n:].isnan().all(), "d_qkv: written past its end (a padded row stored?)"
    return d_qkv, d_bias


def reference_grads(qkv, bias, g, case: WinCase):
    """``(out, d_qkv, d_bias)`` of the reference by autograd in qkv's dtype (bias None: d_bias of a zero bias). On
    the CPU for float64 (the ground truth: the CPU's max-pool backward rule is the documented one)."""
    if qkv.dtype == torch.float64:
        qkv, g, bias = qkv.cpu(), g.cpu(), None if bias is None else bias.cpu()
    leaf = qkv.detach().clone().requires_grad_(True)
    b = (bias if bias is not None else torch.zeros(qkv.shape[-1], dtype=qkv.dtype, device=qkv.device))
    b = b.detach().clone().requires_grad_(True)
    out = reference(leaf, b, case.heads, case.window, case.q_stride)
    d_qkv, d_bias = torch.autograd.grad(out, (leaf, b), g.to(qkv.dtype))
    return out.detach(), d_qkv, d_bias


# ---------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("case", [SAM2_CASES[5], EXTRA_CASES[0], EXTRA_CASES[2]], ids=lambda c: c.id)
def test_reference_is_the_official_block(case: WinCase):
    """The reference equals the official block's path (``window_partition`` of the normed map, the qkv Linear on
    the zero-padded windows, the attention with its query pool, ``window_unpartition`` from the pooled size)."""
    torch.manual_seed(0)
    dim, three_c = 8, 3 * case.heads * case.head_dim
    x = torch.randn(case.batch, case.height, case.width, dim, dtype=torch.float64)
    linear = torch.nn.Linear(dim, three_c, dtype=torch.float64)
    with torch.no_grad():
        linear.bias.normal_(0.0, 3.0)
        windows, padded = window_partition(x, case.window)
        y = sam2_window_attention(linear(windows), case.heads, case.q_stride if case.q_stride > 1 else None)
        size, wo = (case.height // case.q_stride, case.width // case.q_stride), case.window // case.q_stride
        padded = (size[0] + (-size[0]) % wo, size[1] + (-size[1]) % wo)
        official = window_unpartition(y, wo, padded, size)
        ours = reference(linear(x), linear.bias, case.heads, case.window, case.q_stride)
    assert ours.shape == official.shape
    assert max_abs(ours - official) <= 1e-12 * max_abs(official)


# ---------------------------------------------------------------------------------------------- forward
def _check_forward(case: WinCase, qkv: torch.Tensor, bias: torch.Tensor | None):
    out, lse = run_forward(case, qkv, bias)
    ref = reference(qkv.double(), None if bias is None else bias.double(), case.heads, case.window, case.q_stride)
    assert out.shape == ref.shape and out.dtype == qkv.dtype and out.is_contiguous()
    if qkv.dtype in (torch.float32, torch.float64):
        tol = FP32_TOL if qkv.dtype == torch.float32 else 1e-12
        assert rel_err(out, ref) <= tol
    else:
        eager = reference(qkv, bias, case.heads, case.window, case.q_stride)
        err, bound = max_abs(out.double() - ref), low_precision_bound(eager, ref)
        assert err <= bound, f"error {err:.2e} > bound {bound:.2e} (2x eager {qkv.dtype} + 1e-3)"
    lse_ref = reference_lse(qkv.double(), None if bias is None else bias.double(), case.heads, case.window,
                            case.q_stride)
    lse_tol = 1e-12 if qkv.dtype == torch.float64 else 1e-5
    assert max_abs(lse.double() - lse_ref) <= lse_tol * max(1.0, max_abs(lse_ref))
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SAM2_CASES + EXTRA_CASES, ids=lambda c: c.id)
def test_forward(case: WinCase, dtype: torch.dtype):
    _check_forward(case, *make_inputs(case, dtype))


@pytest.mark.parametrize("case", [SAM2_CASES[4], EXTRA_CASES[0]], ids=lambda c: c.id)
def test_forward_without_bias_and_lse(case: WinCase):
    """bias None: padded tokens are zero rows. Without ``return_lse`` the launcher allocates and returns out."""
    qkv, _ = make_inputs(case, torch.float32)
    _check_forward(case, qkv, None)
    out = wa.window_attention_forward(qkv, None, case.heads, case.window, case.q_stride)
    assert isinstance(out, torch.Tensor) and out.is_contiguous()
    assert rel_err(out, reference(qkv.double(), None, case.heads, case.window, case.q_stride)) <= FP32_TOL


# ---------------------------------------------------------------------------------------------- backward
def _reference_out_lse(case: WinCase, qkv: torch.Tensor, bias: torch.Tensor | None):
    """out and lse from float64 torch (not the forward kernel), in the kernel's dtypes."""
    b64 = None if bias is None else bias.double()
    out = reference(qkv.double(), b64, case.heads, case.window, case.q_stride).to(qkv.dtype)
    lse = reference_lse(qkv.double(), b64, case.heads, case.window, case.q_stride)
    return out, lse.to(torch.float64 if qkv.dtype == torch.float64 else torch.float32)


def _check_backward(case: WinCase, qkv: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor):
    out, lse = _reference_out_lse(case, qkv, bias)
    d_qkv, d_bias = run_backward(case, g, qkv, bias, out, lse)
    _, ref_qkv, ref_bias = reference_grads(qkv.double(), None if bias is None else bias.double(), g.double(), case)
    assert d_qkv.dtype == qkv.dtype and d_qkv.is_contiguous()
    d_qkv, d_bias = d_qkv.cpu(), d_bias.cpu()
    has_pad = case.height % case.window or case.width % case.window
    assert (max_abs(ref_bias) > 0) == bool(has_pad) and (max_abs(d_bias) > 0) == bool(has_pad)
    scale_bias = max(max_abs(ref_bias), 1e-30)
    if qkv.dtype in (torch.float32, torch.float64):
        tol = FP32_TOL if qkv.dtype == torch.float32 else 1e-12
        assert rel_err(d_qkv, ref_qkv) <= tol, "d_qkv"
        assert max_abs(d_bias.double() - ref_bias) <= tol * scale_bias, "d_bias"
    else:
        _, eager_qkv, eager_bias = (t.cpu() for t in reference_grads(qkv, bias, g, case))
        err, eager_err = rel_err(d_qkv, ref_qkv), rel_err(eager_qkv, ref_qkv)
        assert err <= 2 * eager_err + 1e-4, f"d_qkv: {err:.2e} vs eager {eager_err:.2e}"
        err, eager_err = max_abs(d_bias.double() - ref_bias), max_abs(eager_bias.double() - ref_bias)
        assert err <= 2 * eager_err + 1e-4 * scale_bias, f"d_bias: {err:.2e} vs eager {eager_err:.2e}"
    return d_qkv.to(DEVICE), d_bias.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SAM2_CASES + EXTRA_CASES, ids=lambda c: c.id)
def test_backward(case: WinCase, dtype: torch.dtype):
    qkv, bias = make_inputs(case, dtype)
    g = torch.randn(case.batch, case.height // case.q_stride, case.width // case.q_stride, case.heads * case.head_dim,
                    dtype=torch.float64).to(DEVICE, dtype)
    _check_backward(case, qkv, bias, g)


@pytest.mark.parametrize("case", [EXTRA_CASES[0], SAM2_CASES[6]], ids=lambda c: c.id)
def test_backward_without_bias(case: WinCase):
    qkv, _ = make_inputs(case, torch.float32)
    g = torch.randn(case.batch, case.height // case.q_stride, case.width // case.q_stride, case.heads * case.head_dim,
                    device=DEVICE)
    _check_backward(case, qkv, None, g)


# ---------------------------------------------------------------------------------------------- layouts
def _strided(case: WinCase, dtype: torch.dtype, layout: str):
    """qkv with non-trivial strides (unit channel stride): a channel slice of a wider map at an odd offset, or
    column-major storage ``[B, W, H, 3C]`` seen as ``[B, H, W, 3C]``."""
    qkv, bias = make_inputs(case, dtype)
    B, H, W, C3 = qkv.shape
    if layout == "sliced":
        wide = torch.randn(B, H, W, C3 + 11, device=DEVICE, dtype=dtype)
        wide[..., 5 : 5 + C3] = qkv
        strided = wide[..., 5 : 5 + C3]
    else:
        strided = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous() and strided.stride(-1) == 1 and torch.equal(strided, qkv)
    return strided, bias


@pytest.mark.parametrize("case, layout", [(EXTRA_CASES[2], "sliced"), (WinCase(2, 11, 9, 7, 2, 1, 40, "split"),
                                                                     "column-major")],
                         ids=lambda v: v.id if isinstance(v, WinCase) else v)
def test_strided_inputs_stride0_grads_deterministic(case: WinCase, layout: str):
    """Strided qkv in both directions, a stride-0 ``grad_out`` (``y.sum().backward()``) and a non-contiguous
    ``out``; the backward twice gives bitwise-equal d_qkv and d_bias (no atomics)."""
    qkv, bias = _strided(case, torch.float32, layout)
    out, lse = _check_forward(case, qkv, bias)
    g = torch.ones((), device=DEVICE).expand_as(out)
    out_nc = out.transpose(1, 2).contiguous().transpose(1, 2)
    d1, b1 = _check_backward(case, qkv, bias, g)
    d2, b2 = wa.window_attention_backward(g, qkv, bias, out_nc, lse, case.heads, case.window, case.q_stride)
    d3, b3 = wa.window_attention_backward(g, qkv, bias, out_nc, lse, case.heads, case.window, case.q_stride)
    assert torch.equal(d2, d3) and torch.equal(b2, b3), "two backward runs differ"
    assert rel_err(d2, d1) <= FP32_TOL and rel_err(b2, b1) <= FP32_TOL  # kernel out/lse vs torch's


def test_empty_batch():
    case = dataclasses.replace(EXTRA_CASES[0], batch=0)
    qkv, bias = make_inputs(case, torch.float32)
    out, lse = wa.window_attention_forward(qkv, bias, 1, 7, 2, return_lse=True)
    assert out.shape == (0, 6, 6, 24) and lse.shape == (0, 1, 6, 6)
    d_qkv, d_bias = wa.window_attention_backward(out, qkv, bias, out, lse, 1, 7, 2)
    assert d_qkv.shape == qkv.shape and torch.equal(d_bias, torch.zeros(72, device=DEVICE))


# ---------------------------------------------------------------------------------------------- max-pool rule
@pytest.mark.parametrize("variant", ["window", "split"])
def test_ties_go_to_the_lowest_candidate_like_max_pool2d(variant: str):
    """Integer q makes exact ties among a pooled query's four candidates: F.max_pool2d's CPU backward gives the
    gradient to the lowest index (row-major), so does the kernel; padding candidates (= b_q) tie too."""
    case = WinCase(1, 6, 6, 4, 2, 1, 16, "ties") if variant == "window" else WinCase(1, 11, 11, 7, 2, 1, 24, "ties")
    assert wa.window_attention_backward_config(case.head_dim, case.window, 2, torch.float32)["variant"] == variant
    qkv, bias = make_inputs(case, torch.float32)
    C = case.heads * case.head_dim
    qkv[..., :C] = torch.randint(-1, 2, qkv[..., :C].shape, device=DEVICE).float()
    bias[:C] = torch.randint(0, 2, (C,), device=DEVICE).float()
    g = torch.randn(case.batch, case.height // 2, case.width // 2, C, device=DEVICE)
    d_qkv, _ = _check_backward(case, qkv, bias, g)
    # cell (0, 0) of window 0: candidates (0,0), (0,1), (1,0), (1,1)
    cand = qkv[0, :2, :2, :C].reshape(4, C)  # [candidate (row-major), C]
    dq = d_qkv[0, :2, :2, :C].reshape(4, C)  # [candidate, C]
    first = (cand == cand.max(0).values).float().argmax(0)  # lowest index holding the max
    got = (dq != 0).float().argmax(0)  # the candidate that received the gradient
    assert (dq != 0).sum(0).le(1).all() and (got == first)[(dq != 0).any(0)].all()
    assert ((cand == cand.max(0).values).sum(0) > 1).any(), "no ties drawn"


@pytest.mark.parametrize("variant", ["window", "split"])
def test_nan_candidate_rule_matches_max_pool2d(variant: str):
    """Two NaN candidates in one cell: F.max_pool2d's CPU backward sends the gradient to the last NaN (its rule is
    ``v > max or isnan(v)``, checked on torch first); the kernel gives d_qkv torch's NaN pattern and values. One
    window per program here: in a pack of windows a NaN also reaches the pack's other windows (module docstring)."""
    case = WinCase(1, 6, 6, 4, 2, 1, 24, "nan") if variant == "window" else WinCase(1, 11, 11, 7, 2, 1, 24, "nan")
    cfg = wa.window_attention_backward_config(case.head_dim, case.window, 2, torch.float32)
    assert cfg["variant"] == variant and cfg["windows_per_program"] == 1
    qkv, bias = make_inputs(case, torch.float32)
    qkv[0, 0, 0, 3] = qkv[0, 1, 0, 3] = float("nan")  # candidates 0 and 2 of cell (0, 0), channel 3
    probe = qkv[0, :2, :2, 3].reshape(1, 1, 2, 2).cpu().double().requires_grad_(True)  # [N, C, 2, 2]: the cell
    F.max_pool2d(probe, 2, 2).sum().backward()
    assert probe.grad.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]  # the last NaN gets it
    g = torch.randn(1, case.height // 2, case.width // 2, 24, device=DEVICE)
    out, lse = _reference_out_lse(case, qkv, bias)
    d_qkv, _ = wa.window_attention_backward(g, qkv, bias, out, lse, 1, case.window, 2)
    _, ref_qkv, _ = reference_grads(qkv.double(), bias.double(), g.double(), case)
    d_qkv = d_qkv.cpu()
    assert torch.equal(d_qkv.isnan(), ref_qkv.isnan()) and d_qkv.isnan().any()
    ok = ~ref_qkv.isnan()
    assert max_abs(d_qkv.double()[ok] - ref_qkv[ok]) <= FP32_TOL * max_abs(ref_qkv[ok])


# ---------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("case, variant, fast", [
    (WinCase(1, 3, 2, 4, 2, 1, 4, "gc-pool-pad"), "window", False),
    (WinCase(1, 5, 6, 4, 1, 2, 8, "gc-pad"), "window", True),
    (WinCase(1, 11, 9, 7, 2, 1, 24, "gc-split-pool-pad"), "split", True),
], ids=lambda v: v.id if isinstance(v, WinCase) else str(v))
def test_gradcheck_float64(case: WinCase, variant: str, fast: bool):
    """Forward and backward kernels in float64 as one autograd Function of (qkv, bias): gradcheck checks d_qkv and
    d_bias against finite differences of the forward kernel."""
    assert wa.window_attention_backward_config(case.head_dim, case.window, case.q_stride,
                                               torch.float64)["variant"] == variant

    class WindowAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv, bias):
            out, lse = wa.window_attention_forward(qkv, bias, case.heads, case.window, case.q_stride, return_lse=True)
            ctx.save_for_backward(qkv, bias, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            qkv, bias, out, lse = ctx.saved_tensors
            return wa.window_attention_backward(grad_out, qkv, bias, out, lse, case.heads, case.window,
                                                case.q_stride)

    qkv, bias = make_inputs(case, torch.float64, bias_scale=1.0)
    qkv.requires_grad_(True)
    bias.requires_grad_(True)
    assert torch.autograd.gradcheck(WindowAttention.apply, (qkv, bias), eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=fast)


# ---------------------------------------------------------------------------------------------- geometry, configs
def test_geometry_rule_is_the_official_one():
    """``check_window_geometry`` accepts exactly the sizes where the official unpartition puts the pooled windows
    back in place (the reference then runs), and the launcher rejects the others."""
    for n in range(1, 40):
        for ws, q in ((14, 2), (7, 2), (8, 2), (4, 2), (7, 1)):
            ok = -(-n // ws) == -(-(n // q) // (ws // q))
            try:
                check_window_geometry(n, 8, ws, q)
                accepted = True
            except ValueError:
                accepted = False
            assert accepted == (ok and -(-8 // ws) == -(-(8 // q) // (ws // q)))
    qkv = torch.zeros(1, 15, 14, 3 * 16, device=DEVICE)  # 15 rows: 2 windows of 14, but 7 pooled rows: 1 of 7
    with pytest.raises(ValueError, match="window_unpartition"):
        wa.window_attention_forward(qkv, None, 1, 14, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_configs_are_valid(dtype: torch.dtype):
    """Every config over SAM 2's windows and odd ones, head dims 1..256: power-of-two tiles >= 16 that cover the
    head dim; a pack's keys fit one tile; its pooled queries one query tile; SAM 2's small windows packed in fp16."""
    for ws, q in [(8, 1), (8, 2), (4, 1), (4, 2), (14, 1), (14, 2), (7, 1), (7, 2), (16, 1), (16, 2), (1, 1), (3, 2)]:
        T, T_out = ws * ws, (ws // q) ** 2
        for hd in (1, 8, 24, 56, 64, 72, 96, 112, 128, 200, 256):
            fwd = wa.window_attention_forward_config(hd, ws, q, dtype)
            for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
                assert fwd[k] & (fwd[k] - 1) == 0 and fwd[k] >= 16
            wp = fwd["windows_per_program"]
            assert fwd["BLOCK_D"] >= hd and fwd["PACKED"] == (wp > 1) and fwd["num_warps"] in (4, 8)
            assert fwd["ONE_KV_BLOCK"] == (wp * T <= fwd["BLOCK_N"]) and (not fwd["PACKED"] or fwd["ONE_KV_BLOCK"])
            assert not fwd["PACKED"] or wp * T_out <= fwd["BLOCK_M"]
            bwd = wa.window_attention_backward_config(hd, ws, q, dtype)
            for launch in bwd["launches"].values():
                assert launch["BLOCK_D"] >= hd and min(launch["BLOCK_M"], launch["BLOCK_N"]) >= 16
            if bwd["variant"] == "window":
                pack = bwd["windows_per_program"]
                assert pack * T <= bwd["launches"]["window"]["BLOCK_N"]
                assert pack * T_out <= bwd["launches"]["window"]["BLOCK_M"]
    if dtype in (torch.float16, torch.bfloat16):
        assert wa.window_attention_forward_config(96, 4, 1, dtype)["windows_per_program"] == 4  # 64 q x 64 kv
        assert wa.window_attention_forward_config(96, 4, 2, dtype)["BLOCK_M"] == 16  # 4 windows: 16 pooled queries
        assert wa.window_attention_backward_config(96, 4, 2, dtype)["windows_per_program"] == 4
        assert wa.window_attention_forward_config(96, 8, 1, dtype)["BLOCK_M"] == 64  # stage 1: wgmma-sized


# ---------------------------------------------------------------------------------------------- compile lane
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")
_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _meta_plan(v: dict) -> list[tuple]:
    """The launcher's own launch list for a variant's call point, from meta tensors."""
    dtype, heads, hd, q = v["dtype"], v["num_heads"], v["head_dim"], v["q_stride"]
    B, H, W = 2, v["height"], v["width"]
    qkv = torch.empty(B, H, W, 3 * heads * hd, dtype=dtype, device="meta")
    out = torch.empty(B, H // q, W // q, heads * hd, dtype=dtype, device="meta")
    lse = torch.empty(B, heads, H // q, W // q, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                      device="meta")
    bias = torch.empty(3 * heads * hd, dtype=dtype, device="meta")
    if v["direction"] == "forward":
        return wa.window_attention_forward_plan(qkv, bias, out, lse, heads, v["window_size"], q, v["store_lse"])
    return wa.window_attention_backward_plan(out, qkv, bias, out, lse, torch.empty_like(qkv), heads,
                                             v["window_size"], q)[0]


def _signature(fn, args, launch) -> tuple[dict, dict, dict]:
    """The JIT's specialisation of an argument list: tensors (16-byte aligned, as torch allocates) and ints
    divisible by 16 get ``tt.divisibility`` 16; ints are i32 (i64 beyond 32 bits); triton 3.8 does not specialise
    ints equal to 1."""
    sig, attrs = {}, {}
    for i, (name, arg) in enumerate(zip(fn.arg_names, args)):
        if isinstance(arg, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + _TRITON_TYPE[arg.dtype], [["tt.divisibility", 16]]
        else:
            sig[name] = "i32" if -(2**31) <= arg < 2**31 else "i64"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {k: v for k, v in launch.items() if k not in _OPTIONS}
    sig.update({k: "constexpr" for k in consts})
    return sig, consts, attrs


def _compile_one(index: int) -> dict:
    """Compile item ``index`` of :func:`_compile_items` (rebuilt here: meta tensors do not cross processes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from test_kernels_compile import _res_usage, fp32_dot_precision

    label, name, args, launch, cc = _compile_items()[index]
    fn = wa.KERNELS[name]
    sig, consts, attrs = _signature(fn, args, launch)
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", cc, 32), options={k: launch[k] for k in _OPTIONS if k in launch})
    res, ptx = _res_usage(kernel.asm["cubin"]), kernel.asm["ptx"]
    return {"kernel": name, "variant": label, "cc": cc, "regs": res["REG"], "spill": res["STACK"] + res["LOCAL"],
            "smem": kernel.metadata.shared, "fp32_dot": fp32_dot_precision(ptx),
            "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")}


def _compile_items() -> list[tuple]:
    items = []
    for v in wa.window_attention_variants():
        for name, _, args, launch in _meta_plan(v):
            label = (f"{_TRITON_TYPE[v['dtype']]} ws{v['window_size']} q{v['q_stride']} hd{v['head_dim']}/"
                     f"{launch['BLOCK_D']} M{launch['BLOCK_M']} N{launch['BLOCK_N']} w{launch['num_warps']}"
                     + (" 1blk" if launch.get("ONE_KV_BLOCK") else " loop" if name == "forward" else "")
                     + (" packed" if launch.get("PACKED") else "")
                     + (" pad" if launch.get("HAS_PAD") else "") + (" lse" if launch.get("STORE_LSE") else ""))
            items += [(label, name, args, launch, cc) for cc in SMEM_LIMIT]
    return items


def _compile_worker() -> list[dict]:
    """Compile every variant for sm_80 and sm_90 on two processes; runs without TRITON_INTERPRET."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:
        return list(pool.map(_compile_one, range(len(_compile_items())), chunksize=4))


def _table(rows: list[dict]) -> str:
    head = f"{'kernel':8} {'variant':62} {'cc':>3} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':8} fp32 dot"
    return "\n".join([head] + [f"{r['kernel']:8} {r['variant']:62} {r['cc']:>3} {r['regs']:>4} {r['spill']:>5} "
                               f"{r['smem']:>7} {r['mma']:8} {r['fp32_dot']}" for r in rows])


def test_compile_lane_every_variant_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + _table(rows))
    assert {v["direction"] for v in wa.window_attention_variants()} == {"forward", "backward"}
    assert {r["kernel"] for r in rows} == set(wa.KERNELS)
    # fp64 (a test dtype) and fp32 beyond head dim 128 (not a SAM 2 head dim; FMA / 3xTF32 dots on 256-wide tiles)
    # spill a few hundred bytes: listed, not failed
    tolerated = [r for r in rows if r["variant"].startswith("fp64") or r["variant"].startswith("fp32 ")
                 and "/256 " in r["variant"]]
    print("spills tolerated:\n" + _table([r for r in tolerated if r["spill"] > 0]))
    bad = [r for r in rows if (r["spill"] > 0 and r not in tolerated) or r["smem"] > SMEM_LIMIT[r["cc"]]]
    assert not bad, "spills or too much shared memory:\n" + _table(bad)
    fp32 = [r for r in rows if r["variant"].startswith("fp32")]
    want = {"forward": "3xtf32", "window": "fma", "dq": "fma", "dkdv": "fma"}
    wrong = [r for r in fp32 if r["fp32_dot"] != want[r["kernel"]]]
    assert fp32 and not wrong, "fp32 dots: forward 3xTF32, backward IEEE:\n" + _table(wrong)
    assert any(r["mma"] == "wgmma" for r in rows if r["cc"] == 90 and r["kernel"] == "forward")


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "the compile lane needs the real compiler"
    print(json.dumps(_compile_worker()))
