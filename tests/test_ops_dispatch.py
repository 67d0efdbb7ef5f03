"""How ``fused=True`` dispatches: shapes past the kernels' limits run the eager path with a warning (never a Triton
error or a wrong answer), every Triton launch runs on the tensors' own CUDA device, the backend follows how the
kernels were defined (not the current environment), autocast gives the same dtypes fused or not, and empty or
degenerate shapes get an empty result or a clear error."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hiera_fast import ops
from hiera_fast.ops import reference, routing

needs_triton = pytest.mark.skipif(ops.fused_backend("cpu")[0] == "eager" and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@pytest.fixture
def fresh_warnings():
    routing.reset_warnings()
    yield
    routing.reset_warnings()


def _grad_vs_float64(qkv: torch.Tensor, heads: int, q_stride: int, window_size: int, windowed: bool,
                     global_attention: str | None = None):
    """(fused output, fused d_qkv, float64 reference output, float64 reference d_qkv)."""
    nw = ops.check_qkv(qkv, heads, q_stride, window_size, windowed)
    x = qkv.clone().requires_grad_(True)
    out = ops.mask_unit_attention(x, heads, q_stride, window_size, windowed, fused=True,
                                  global_attention=global_attention)
    grad = torch.randn_like(out)
    (d_x,) = torch.autograd.grad(out, x, grad)
    ref_in = qkv.double().requires_grad_(True)
    ref = reference.mask_unit_attention_official(ref_in, heads, q_stride, nw)
    (d_ref,) = torch.autograd.grad(ref, ref_in, grad.double())
    return out, d_x, ref, d_ref


def _assert_fp32_close(out, d_x, ref, d_ref):
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (d_x.double() - d_ref).abs().max().item() <= 1e-5 * d_ref.abs().max().item()


@needs_triton
@pytest.mark.parametrize("hd", [ops.MAX_FUSED_HEAD_DIM, ops.MAX_FUSED_HEAD_DIM + 64], ids=["largest", "past-limit"])
def test_head_dim_limit(hd, device, fresh_warnings):
    """Up to the limit the kernels run; past it the eager path runs (forward and backward, PyTorch's autograd) with
    one warning."""
    fused = hd <= ops.MAX_FUSED_HEAD_DIM
    heads = 2
    qkv = torch.randn(2, 16 * 2, 3 * heads * hd, device=device)
    before = ops.kernel_launches.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _grad_vs_float64(qkv, heads, 2, 8, True)
    launched = ops.kernel_launches - before
    fallbacks = [w for w in caught if f"head_dim {hd} > 256" in str(w.message)]
    assert len(fallbacks) == (0 if fused else 1)  # one per call site and reason
    assert all(issubclass(w.category, RuntimeWarning) for w in fallbacks)
    assert launched["mask_unit_attention_fwd"] == launched["mask_unit_attention_bwd"] == (1 if fused else 0)
    _assert_fp32_close(*results)


@needs_triton
def test_batch_past_grid_limit_runs_eager_with_warning(device, fresh_warnings):
    B = routing.MAX_GRID_AXIS + 1  # [65536, 4, 6]: small in memory, one past the kernels' grid
    qkv = torch.randn(B, 4, 6, device=device)
    before = ops.kernel_launches.copy()
    with pytest.warns(RuntimeWarning, match=f"batch {B} > 65535"):
        results = _grad_vs_float64(qkv, 1, 2, 0, False)
        pooled = ops.unrolled_max_pool(qkv, 2, fused=True)
    launched = ops.kernel_launches - before
    assert sum(launched.values()) == 0
    _assert_fp32_close(*results)
    assert torch.equal(pooled, reference.unrolled_max_pool_eager(qkv, 2))


@pytest.mark.parametrize("how", ["bf16-tensor", "autocast"])
def test_bfloat16_on_cpu_runs_eager_with_warning(how, fresh_warnings):
    """Triton's interpreter computes bfloat16 wrongly (garbage of ~1e8): on the CPU, bf16 inputs (or bf16 autocast)
    take the eager path, forward and backward, with a warning per op naming the reason, and get eager's results."""
    if ops.fused_backend("cpu")[0] != "triton-interpreter":
        pytest.skip("the CPU runs the eager path anyway (no interpreter)")
    qkv = torch.randn(2, 32, 3 * 2 * 8)
    if how == "bf16-tensor":
        qkv, cast = qkv.bfloat16(), contextlib.nullcontext
    else:
        cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    before = ops.kernel_launches.copy()
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fused in (True, False):
            x = qkv.clone().requires_grad_(True)
            with cast():
                out = ops.mask_unit_attention(x, 2, 2, 4, True, fused=fused)
                pooled = ops.unrolled_max_pool(x, 2, fused=fused)
            (d_x,) = torch.autograd.grad((out.float().square().sum() + pooled.float().sum()), x)
            results[fused] = out, pooled, d_x
    launched = ops.kernel_launches - before
    reasons = [str(w.message) for w in caught if "bfloat16 on the CPU" in str(w.message)]
    if how == "bf16-tensor":  # attention and max-pool: a warning each, no launch
        assert sum(launched.values()) == 0 and len(reasons) == 2, (launched, reasons)
    else:  # autocast casts the attention's input only: the max-pool keeps fp32 and runs its kernels
        assert launched == {"unrolled_max_pool_fwd": 1, "unrolled_max_pool_bwd": 1} and len(reasons) == 1, reasons
    (out, pooled, d_x), (ref, ref_pooled, ref_d_x) = results[True], results[False]
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref) and torch.equal(pooled, ref_pooled)
    assert (d_x.float() - ref_d_x.float()).abs().max() <= 2e-2 * ref_d_x.float().abs().max()  # analytic vs autograd


def test_shape_limits_accept_every_zoo_shape():
    # Hiera-H-16x224, batch 256: the largest attention input of the zoo (stage 1, 25088 tokens x 3 * 256 channels)
    assert routing.call_limit(torch.empty(256, 25088, 768, device="meta")) is None
    assert routing.attention_call_limit(torch.empty(256, 25088, 768, device="meta"), 1, 392) is None
    assert "2**31" in routing.call_limit(torch.empty(1, 2**21, 1024, device="meta"))


def test_head_dim_limit_is_in_the_route(monkeypatch):
    monkeypatch.setattr(routing, "device_backend", lambda device: ("triton", "faked"))
    assert routing.attention_route(True, torch.device("cuda"), torch.float16, 256, False).kind == "kernel"
    route = routing.attention_route(True, torch.device("cuda"), torch.float16, 257, False)
    assert route == ("eager", "head_dim 257 > 256, the largest the Triton kernels take")


def test_shape_limits_see_strides_and_the_backward_grid():
    """A small tensor whose rows are far apart (a column slice of a very wide one) needs offsets past 32 bits; the
    backward kernels put heads * windows on a grid axis (at most 65535)."""
    wide_rows = torch.empty_strided((2, 2, 48), (2**32, 2**31, 1), device="meta")
    assert "2**31" in routing.call_limit(wide_rows)
    assert "2**31" in routing.attention_call_limit(wide_rows, 1, 1)
    expanded = torch.empty(2, 1, 48, device="meta").expand(2, 2**26, 48)  # stride 0, but d_x is written whole
    assert "2**31" in routing.call_limit(expanded)
    assert routing.call_limit(torch.empty(2, 1, 48, device="meta").expand(2, 2**20, 48)) is None
    assert "65535" in routing.attention_call_limit(torch.empty(1, 4 * 65536, 48, device="meta"), 4, 65536)


@needs_triton
def test_backward_copies_a_grad_out_with_huge_row_stride(device, monkeypatch):
    """grad_out is read with 32-bit offsets inside a batch element: one that spans more (a strided view) is copied
    first. Shrinking the limit shows it on a small tensor (the forward's own limit check is lifted for it)."""
    monkeypatch.setattr(routing, "MAX_ROW_OFFSET", 1000)  # qkv [1, 32, 48] spans 1536 >= 1000
    monkeypatch.setattr(routing, "attention_call_limit", lambda qkv, heads, windows: None)
    launched_with = []
    real = routing.attention_bwd.mask_unit_attention_backward

    def spy(grad_out, *args):
        launched_with.append(grad_out.stride())
        return real(grad_out, *args)

    monkeypatch.setattr(routing.attention_bwd, "mask_unit_attention_backward", spy)
    qkv = torch.randn(1, 32, 48, device=device)
    grad = torch.randn(1, 16, 4000, device=device)[:, :, :16]  # rows 4000 apart: spans 60016 elements
    x = qkv.clone().requires_grad_(True)
    out = ops.mask_unit_attention(x, 1, 2, 8, True, fused=True)
    (d_x,) = torch.autograd.grad(out, x, grad)
    ref_in = qkv.double().requires_grad_(True)
    ref = reference.mask_unit_attention_official(ref_in, 1, 2, 2)
    (d_ref,) = torch.autograd.grad(ref, ref_in, grad.double())
    assert launched_with == [(256, 16, 1)]  # the contiguous copy reached the kernel
    _assert_fp32_close(out, d_x, ref, d_ref)


def test_launch_runs_on_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the *current* device: every kernel body enters a guard for its tensor's device."""
    entered = []

    @contextlib.contextmanager
    def fake_device_guard(device):
        entered.append(torch.device(device))
        yield

    class FakeTensor:  # what the bodies read of a CUDA tensor on GPU 1
        device, shape, dtype = torch.device("cuda", 1), (1, 8, 4), torch.float32

        def stride(self, dim=None):
            return (32, 4, 1) if dim is None else (32, 4, 1)[dim]

    class FakeKernels:
        @staticmethod
        def unrolled_max_pool_forward(x, stride):
            assert entered, "launched outside the device guard"
            return "launched"

    monkeypatch.setattr(torch.cuda, "device", fake_device_guard)
    monkeypatch.setattr(routing, "max_pool", FakeKernels)
    monkeypatch.setattr(routing, "kernel_launches", collections.Counter())
    assert ops.pool._pool_forward_kernel(FakeTensor(), 2) == "launched"
    assert entered == [torch.device("cuda", 1)] and routing.kernel_launches["unrolled_max_pool_fwd"] == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fused_on_second_gpu_while_first_is_current():
    torch.cuda.set_device(0)
    qkv = torch.randn(2, 64 * 4, 3 * 2 * 32, device="cuda:1")
    out, d_x, ref, d_ref = _grad_vs_float64(qkv, 2, 4, 16, True)
    assert out.device == d_x.device == torch.device("cuda", 1)
    _assert_fp32_close(out, d_x, ref, d_ref)


# ---------------------------------------------------------------------------------------------- backend choice
def test_backend_follows_how_the_kernels_were_defined():
    """TRITON_INTERPRET set *after* the kernels were imported cannot make them run on the CPU: the fused op must
    take the eager path with a warning that says why, not crash inside Triton."""
    script = """
import os, warnings, torch
from hiera_fast import ops
from hiera_fast.ops import reference, routing
print(ops.kernels_interpreted(), ops.fused_backend("cpu")[0])  # defined at import, without the interpreter
os.environ["TRITON_INTERPRET"] = "1"
backend, reason = ops.fused_backend("cpu")
print(ops.kernels_interpreted(), backend, "was set after" in reason)
qkv = torch.randn(1, 32, 48)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = ops.mask_unit_attention(qkv, 1, 2, 8, True, fused=True)
print(torch.allclose(out, reference.mask_unit_attention_eager(qkv, 1, 2, 2)), len(caught))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "eager", "False", "eager", "True", "True", "1"]


def test_gpus_older_than_ampere_take_the_eager_path(monkeypatch):
    """A CUDA GPU below compute capability 8.0 gets the eager path with a reason naming the GPU and both
    capabilities; 8.0 and newer get the kernels. The choice is per device (two GPUs may differ), cached per device."""
    capability = {0: (7, 5), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU{torch.device(device).index}")
    monkeypatch.setattr(routing, "kernels_interpreted", lambda: False)  # as on a GPU machine
    if routing.KERNELS_MISSING:
        pytest.skip("hiera_fast.kernels is not importable here")
    backend, reason = ops.fused_backend("cuda:0")
    assert backend == "eager"
    assert "GPU0" in reason and "7.5" in reason and "8.0" in reason
    assert ops.fused_backend("cuda:1") == ("triton", "CUDA tensor: the Triton kernels run on the GPU")
    capability[0] = (8, 0)
    assert ops.fused_backend("cuda:0")[0] == "triton"
    routing.clear_routes()
    try:
        capability[0] = (7, 0)
        assert routing.device_backend(torch.device("cuda", 0))[0] == "eager"
        assert routing.device_backend(torch.device("cuda", 1))[0] == "triton"
        capability[0] = (9, 0)
        assert routing.device_backend(torch.device("cuda", 0))[0] == "eager"  # decided once per device
    finally:
        routing.clear_routes()  # the monkeypatched answers must not outlive the test


@pytest.mark.parametrize("device, version, reason", [
    ("cpu", "3.6.0", "Triton 3.6.0's interpreter cannot run the kernels (loops with computed bounds); it needs "
                     "triton >= 3.7"),
    ("cpu", "3.5.1", "Triton 3.5.1's interpreter cannot run the kernels (loops with computed bounds); it needs "
                     "triton >= 3.7"),
    ("cpu", "3.7.1", None), ("cpu", "3.8.0", None), ("cpu", "3.10.0+git1234", None), ("cpu", "4.0.0", None),
    ("cuda:0", "3.1.0", "Triton 3.1.0 is older than 3.3"), ("cuda:0", "3.2.0", "Triton 3.2.0 is older than 3.3"),
    ("cuda:0", "3.3.1", None), ("cuda:0", "3.6.0", None), ("cuda:0", "3.8.0", None)])
def test_backend_needs_a_triton_that_runs_the_kernels(monkeypatch, device, version, reason):
    """Triton 3.6's interpreter fails inside the kernels (a TypeError from loops with computed bounds), and Triton 3.1
    (torch 2.5's) aborts the process inside its compiler on our forward kernel: below MIN_INTERPRETER_TRITON on a
    CPU, or MIN_TRITON on a CUDA GPU, the device gets the eager path and a reason naming the version."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(routing, "kernels_interpreted", lambda: device == "cpu")  # the interpreter lane, or a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if routing.KERNELS_MISSING:
        pytest.skip("hiera_fast.kernels is not importable here")
    backend, why = ops.fused_backend(device)
    if reason is None:
        assert backend == ("triton-interpreter" if device == "cpu" else "triton")
    else:
        assert backend == "eager" and reason in why


@pytest.mark.parametrize("version, dtype, device_type, falls_back", [
    ("3.4.0", torch.float64, "cuda", True), ("3.3.1", torch.float64, "cuda", True),
    ("3.5.1", torch.float64, "cuda", False), ("3.4.0", torch.float32, "cuda", False),
    ("3.4.0", torch.float64, "cpu", False)])
def test_float64_attention_on_cuda_needs_triton_3_5(monkeypatch, version, dtype, device_type, falls_back):
    """Triton 3.3/3.4 fail to compile the attention kernels' float64 ``tl.dot`` ("Unsupported lhs dtype fp64"):
    float64 attention on CUDA with them runs the eager path (with the reason), every other dtype the kernels."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(routing, "device_backend", lambda device: ("triton", "faked"))  # a GPU (or the interpreter)
    route = routing.attention_route(True, torch.device(device_type), dtype, 64, False)
    assert (route.kind == "eager") == falls_back, route
    if falls_back:
        assert f"Triton {version}" in route.reason and "triton >= 3.5" in route.reason


def test_fused_backend_for_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(routing, "kernels_interpreted", lambda: False)
    if routing.KERNELS_MISSING:
        pytest.skip("hiera_fast.kernels is not importable here")
    assert ops.fused_backend("cuda") == ("eager", "no CUDA device is available")


# ---------------------------------------------------------------------------------------------- autocast
@needs_triton
def test_autocast_gives_the_same_dtype_fused_or_not(device):
    """Under autocast the op runs in the autocast dtype, as SDPA does, whichever path runs; gradients come back in
    the input's dtype. (fp16: the interpreter cannot compute bf16.)"""
    qkv = torch.randn(2, 64, 3 * 2 * 16, device=device)
    outs, grads = {}, {}
    for fused in (False, True):
        x = qkv.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.float16):
            out = ops.mask_unit_attention(x, 2, 4, 4, True, fused=fused)
        out.float().square().sum().backward()
        outs[fused], grads[fused] = out, x.grad
    assert outs[True].dtype == outs[False].dtype == torch.float16
    assert grads[True].dtype == grads[False].dtype == torch.float32
    assert (outs[True].float() - outs[False].float()).abs().max().item() <= 2e-3
    scale = grads[False].abs().max().item()
    assert (grads[True] - grads[False]).abs().max().item() <= 1e-2 * scale


def test_autocast_on_the_eager_fallback_backward_inside_autocast(fresh_warnings, forced_eager):
    """The fused op's eager fallback (here: forced) computes in the autocast dtype, as fused=False does, and its
    backward inside the autocast region gives the input's dtype (it used to mix fp32 and bf16 there and fail)."""
    qkv = torch.randn(2, 64, 3 * 2 * 16)
    x = qkv.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="forced by the test"):
        out = ops.mask_unit_attention(x, 2, 4, 4, True, fused=True)
        (d_x,) = torch.autograd.grad(out.float().sum(), x)
    assert out.dtype == torch.bfloat16 and d_x.dtype == torch.float32
    ref_in = qkv.bfloat16().double().requires_grad_(True)  # the same rounding of the input, then float64
    (d_ref,) = torch.autograd.grad(reference.mask_unit_attention_official(ref_in, 2, 4, 4).sum(), ref_in)
    assert (d_x.double() - d_ref).abs().max().item() <= 3e-2 * d_ref.abs().max().item()


@needs_triton
def test_autocast_compiled_dtype_matches_eager(device):
    """The fake implementation (what torch.compile traces) must promise the dtype the op returns under autocast."""
    qkv = torch.randn(2, 64, 3 * 2 * 16, device=device)

    def f(x):
        with torch.autocast(device, dtype=torch.float16):
            return ops.mask_unit_attention(x, 2, 4, 4, True, fused=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(qkv)
    eager = f(qkv)
    assert compiled.dtype == eager.dtype == torch.float16
    assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------- empty and degenerate
@pytest.mark.parametrize("fused", [False, True])
def test_empty_batch_gives_empty_results(fused):
    qkv = torch.randn(0, 64, 48, requires_grad=True)
    out = ops.mask_unit_attention(qkv, 2, 4, 4, True, fused=fused)
    assert out.shape == (0, 16, 16)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
    assert ops.unrolled_max_pool(torch.randn(0, 8, 4), 2, fused=fused).shape == (0, 4, 4)
    assert ops.unrolled_max_pool(torch.randn(3, 0, 4), 2, fused=fused).shape == (3, 0, 4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 0, 48), 1, 1, 16, True), "at least one token"),
    ((torch.randn(2, 0, 48), 1, 1, 0, False), "at least one token"),
    ((torch.randn(2, 64, 0), 1, 1, 16, True), "dim > 0"),
    ((torch.randn(2, 64, 48), 1, 1, True, True), "window_size"),
])
def test_degenerate_attention_inputs_raise(fused, args, match):
    with pytest.raises(ValueError, match=match):
        ops.mask_unit_attention(*args, fused=fused)


@pytest.mark.parametrize("name, value", [("use_mask_unit_attn", "False"), ("use_mask_unit_attn", None),
                                         ("use_mask_unit_attn", 2), ("fused", "False"), ("fused", None)])
def test_flags_must_be_bools(name, value):
    """The string "False" is truthy: read by truthiness it would run windowed attention, or the kernels. Flags take
    bools (0 / 1 too, as configs may hold), anything else is a TypeError naming the argument."""
    args = {"use_mask_unit_attn": True, "fused": False, name: value}
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        ops.mask_unit_attention(torch.randn(1, 16, 48), 2, 2, 4, args["use_mask_unit_attn"], fused=args["fused"])
    if name == "fused":
        with pytest.raises(TypeError, match="fused must be a bool"):
            ops.unrolled_max_pool(torch.randn(1, 16, 8), 2, fused=value)
    x = torch.randn(1, 16, 48)
    assert torch.equal(ops.mask_unit_attention(x, 2, 2, 4, 1), ops.mask_unit_attention(x, 2, 2, 4, True))


# ---------------------------------------------------------------------------------------------- global attention
@needs_triton
@pytest.mark.parametrize("q_stride", [1, 4])
def test_global_attention_sdpa_matches_float64(device, q_stride):
    """Global attention routed to SDPA (reading qkv through views, the query pooled by the fused max-pool): output
    and d_qkv match float64 autograd of the official formula; no attention kernel runs."""
    qkv = torch.randn(3, 64, 3 * 2 * 16, device=device)
    before = ops.kernel_launches.copy()
    out, d_x, ref, d_ref = _grad_vs_float64(qkv, 2, q_stride, 0, False, global_attention="sdpa")
    launched = ops.kernel_launches - before
    assert launched["global_attention_sdpa"] == 1 and launched["mask_unit_attention_fwd"] == 0
    assert launched["unrolled_max_pool_fwd"] == (q_stride > 1) and launched["unrolled_max_pool_bwd"] == (q_stride > 1)
    _assert_fp32_close(out, d_x, ref, d_ref)
    assert out.shape == (3, 64 // q_stride, 32) and d_x.shape == qkv.shape


@pytest.mark.parametrize("q_stride", [1, 4])
def test_global_attention_sdpa_empty_batch(q_stride):
    """A batch of 0 on the SDPA route gives an empty result and gradient without calling SDPA (whose CUDA kernels
    reject a batch of 0 in some torch versions)."""
    x = torch.randn(0, 64, 3 * 2 * 16, requires_grad=True)
    out = ops.mask_unit_attention(x, 2, q_stride, 0, False, fused=True, global_attention="sdpa")
    assert out.shape == (0, 64 // q_stride, 32) and out.is_contiguous()
    out.sum().backward()
    assert x.grad.shape == x.shape


@needs_triton
@pytest.mark.default_global_attention
def test_global_attention_choices(device):
    """A global call's route: an op's own choice ("sdpa" on any device, "triton" our kernels) wins over the default;
    the default "sdpa" applies on CUDA only (the CPU lane runs the kernels); set_global_attention changes the default
    and returns the previous one."""
    qkv = torch.randn(2, 64, 3 * 2 * 16, device=device)
    assert routing.default_global_attention() == "sdpa"
    for choice, expected in (("triton", {"mask_unit_attention_fwd": 1, "mask_unit_attention_bwd": 1}),
                             ("sdpa", {"global_attention_sdpa": 1, "unrolled_max_pool_fwd": 1,
                                       "unrolled_max_pool_bwd": 1})):
        before = ops.kernel_launches.copy()
        out, d_x, ref, d_ref = _grad_vs_float64(qkv, 2, 4, 0, False, global_attention=choice)
        assert ops.kernel_launches - before == expected, choice
        _assert_fp32_close(out, d_x, ref, d_ref)
    assert ops.runs_sdpa(1, "cuda:0") and not ops.runs_sdpa(1, "cpu") and not ops.runs_sdpa(2, "cuda:0")
    assert ops.runs_sdpa(1, "cpu", global_attention="sdpa") and not ops.runs_sdpa(1, "cuda:0", "triton")
    previous = ops.set_global_attention("triton")
    try:
        assert previous == "sdpa" and not ops.runs_sdpa(1, "cuda:0")
        with ops.global_attention("sdpa"):
            assert ops.runs_sdpa(1, "cuda:0")
        assert not ops.runs_sdpa(1, "cuda:0")
    finally:
        assert ops.set_global_attention(previous) == "triton"


@pytest.mark.parametrize("bad", ["flash", "", None, "SDPA"])
def test_set_global_attention_rejects_unknown_backends(bad):
    before = routing.default_global_attention()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_global_attention(bad)
    assert routing.default_global_attention() == before
    if bad is not None:
        with pytest.raises(ValueError, match="global_attention must be None or one of"):
            ops.MaskUnitAttention(2, 1, 0, False, fused=True, global_attention=bad)


@needs_triton
def test_global_attention_sdpa_under_compile(device):
    """The SDPA route traces without graph breaks, gives the eager route's output and gradient, and later calls reuse
    the graph: tracing it once must not leave a guard that the next call fails (it counted its calls in
    ``kernel_launches`` while traced, so dynamo guarded on the count and recompiled on every call, until its
    recompile limit sent the frame to eager, CUDA graphs and all). Its calls count outside ``torch.compile`` only."""
    from torch._dynamo.utils import counters

    def f(x):
        return ops.mask_unit_attention(x, 2, 4, 0, False, fused=True, global_attention="sdpa")

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    graphs, compiled_launches = counters["stats"]["unique_graphs"], collections.Counter()
    for call in range(3):
        qkv = torch.randn(2, 64, 3 * 2 * 16, device=device)
        x, ref_x = qkv.clone().requires_grad_(True), qkv.clone().requires_grad_(True)
        grad = torch.randn(2, 16, 32, device=device)
        before = ops.kernel_launches.copy()
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            out = compiled(x)
        (d_x,) = torch.autograd.grad(out, x, grad)
        compiled_launches += ops.kernel_launches - before
        before = ops.kernel_launches.copy()
        ref = f(ref_x)
        (d_ref,) = torch.autograd.grad(ref, ref_x, grad)
        assert (ops.kernel_launches - before)["global_attention_sdpa"] == 1  # the eager call counts
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6) and torch.allclose(d_x, d_ref, rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert compiled_launches == collections.Counter(unrolled_max_pool_fwd=3, unrolled_max_pool_bwd=3)


def test_fallback_warning_points_at_the_callers_line(fresh_warnings, forced_eager):
    """The eager-fallback warning names the user's file and line, not hiera_fast's or torch's."""
    qkv = torch.randn(2, 64, 3 * 2 * 16)
    with pytest.warns(RuntimeWarning, match="forced by the test") as record:
        line = sys._getframe().f_lineno + 1
        ops.mask_unit_attention(qkv, 2, 4, 4, True, fused=True)
    assert record[0].filename == __file__ and record[0].lineno == line


# ---------------------------------------------------------------------------------------------- eager fast path
class _Passthrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that changes nothing: with it active the fused ops take their custom-op route."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@needs_triton
def test_eager_fast_path_equals_the_custom_op(device):
    """Plain eager calls run the kernel bodies directly (no dispatcher cost); under a dispatch mode (as under
    torch.compile, export or fake tensors) the same autograd Function calls them through the custom ops: bitwise the
    same outputs and gradients."""
    qkv = torch.randn(2, 64, 3 * 2 * 16, device=device)
    grad = torch.randn(2, 16, 32, device=device)
    results = []
    for mode in (contextlib.nullcontext, _Passthrough):
        x = qkv.clone().requires_grad_(True)
        before = ops.kernel_launches.copy()
        with mode():
            out = ops.mask_unit_attention(x, 2, 4, 4, True, fused=True)
            assert type(out.grad_fn).__name__ == "_AttentionFunctionBackward"
            (d_x,) = torch.autograd.grad(out, x, grad)
            p = qkv[..., :32].clone().requires_grad_(True)
            pooled = ops.unrolled_max_pool(p, 4, fused=True)
            assert type(pooled.grad_fn).__name__ == "_PoolFunctionBackward"
            (d_p,) = torch.autograd.grad(pooled, p, torch.ones_like(pooled))
        assert ops.kernel_launches - before == {"mask_unit_attention_fwd": 1, "mask_unit_attention_bwd": 1,
                                                "unrolled_max_pool_fwd": 1, "unrolled_max_pool_bwd": 1}
        results.append((out, d_x, pooled, d_p))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[0][3], reference.unrolled_max_pool_backward_eager(torch.ones(2, 16, 32, device=device),
                                                                                 qkv[..., :32], 4))


@needs_triton
def test_fake_tensors_go_through_the_custom_ops(device):
    """Under a FakeTensorMode (shape inference, memory estimators) the fused ops must not launch kernels on fake
    tensors: they take the custom ops, whose fake implementations give the shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    before = ops.kernel_launches.copy()
    with FakeTensorMode() as mode:
        qkv = mode.from_tensor(torch.randn(2, 64, 3 * 2 * 16, device=device)).requires_grad_(True)
        out = ops.mask_unit_attention(qkv, 2, 4, 4, True, fused=True)
        pooled = ops.unrolled_max_pool(qkv[..., :32], 4, fused=True)
        out.sum().backward()
    assert out.shape == (2, 16, 32) and pooled.shape == (2, 16, 32) and qkv.grad.shape == qkv.shape
    assert ops.kernel_launches == before


@needs_triton
@pytest.mark.parametrize("op", ["attention", "pool"])
def test_double_backward_raises(device, op):
    """The fused backward has no derivative of its own: a gradient penalty through it must fail loudly (documented),
    never give a silently wrong second derivative."""
    x = torch.randn(2, 64, 3 * 2 * 16, device=device, requires_grad=True)
    out = (ops.mask_unit_attention(x, 2, 4, 4, True, fused=True) if op == "attention"
           else ops.unrolled_max_pool(x, 4, fused=True))
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.square().sum().backward()


# ---------------------------------------------------------------------------------------------- tracing and torch.func
def _tiny_fused_classifier():
    import hiera_fast as H
    from helpers import randomize_, tiny_image_config

    model = randomize_(H.HieraForImageClassification(tiny_image_config(depths=(1, 1, 1, 1))), std=0.05).eval()
    fused = H.HieraForImageClassification(model.config, fused=True).eval()
    fused.load_state_dict(model.state_dict())
    return model, fused


class _Logits(torch.nn.Module):
    """A model's logits as a plain tensor: what ``torch.jit.trace`` can return."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


@needs_triton
def test_jit_trace_records_the_custom_ops(device):
    """``torch.jit.trace`` sees the shapes as traced values: the fused ops go through ``torch.library`` (not the
    launchers, which need ints), so the trace records them and follows a new input (it failed in the launcher's
    grid math before). On the test device: CPU tensors on a GPU machine run the eager path (no interpreter there)."""
    eager, fused = (m.to(device) for m in _tiny_fused_classifier())
    x1, x2 = torch.randn(2, 3, 64, 64, device=device), torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        traced = torch.jit.trace(_Logits(fused), x1, check_trace=False)
        before = ops.kernel_launches.copy()
        got = traced(x2)
        launched = ops.kernel_launches - before
        ref = eager(x2).logits
    assert launched["mask_unit_attention_fwd"] > 0 and launched["unrolled_max_pool_fwd"] > 0
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_torch_func_transforms_run_eager_with_warning(fresh_warnings):
    """``torch.func.grad`` and ``vmap`` (per-sample gradients) over a fused model: the ops have no functorch rules,
    so they run the eager path with one warning per op, and the results are eager's (both failed with torch-internal
    errors before)."""
    from torch.func import functional_call, grad, vmap

    eager, fused = _tiny_fused_classifier()
    params = {k: v.detach() for k, v in eager.named_parameters()}
    x, labels = torch.randn(3, 3, 64, 64), torch.tensor([1, 4, 6])

    def loss(model):
        return lambda p, xb, yb: functional_call(model, p, (xb,), {"labels": yb}).loss

    def per_sample(model):
        return vmap(grad(loss(model)), in_dims=(None, 0, 0))(params, x[:, None], labels[:, None])

    before = ops.kernel_launches.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_batch = per_sample(fused), grad(loss(fused))(params, x, labels)
    assert sum((ops.kernel_launches - before).values()) == 0
    reasons = sorted(str(w.message).split(":")[1] for w in caught if "torch.func transform" in str(w.message))
    assert reasons == [" fused mask_unit_attention runs the eager PyTorch path", " fused unrolled_max_pool runs the "
                       "eager PyTorch path"], reasons
    ref, ref_batch = per_sample(eager), grad(loss(eager))(params, x, labels)
    for name in params:
        assert got[name].shape == (3, *params[name].shape)
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-7), name
        assert torch.allclose(got_batch[name], ref_batch[name], rtol=1e-5, atol=1e-7), name
