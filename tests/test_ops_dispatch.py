"""How ``fused=True`` dispatches: shapes past the kernels' limits run the eager path with a warning (never a Triton
error or a wrong answer), and every Triton launch runs on the tensors' own CUDA device."""

from __future__ import annotations

import collections
import contextlib
import warnings

import pytest
import torch

from hiera_fast import ops, reference

needs_triton = pytest.mark.skipif(ops.fused_backend("cpu")[0] == "eager" and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())


def _grad_vs_float64(qkv: torch.Tensor, heads: int, q_stride: int, window_size: int, windowed: bool):
    """(fused output, fused d_qkv, float64 reference output, float64 reference d_qkv)."""
    nw = ops.check_qkv(qkv, heads, q_stride, window_size, windowed)
    x = qkv.clone().requires_grad_(True)
    out = ops.mask_unit_attention(x, heads, q_stride, window_size, windowed, fused=True)
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
    """Up to the limit the kernels run; past it the eager path runs (forward and backward) with one warning."""
    fused = hd <= ops.MAX_FUSED_HEAD_DIM
    heads = 2
    qkv = torch.randn(2, 16 * 2, 3 * heads * hd, device=device)
    before = ops.kernel_launches.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _grad_vs_float64(qkv, heads, 2, 8, True)
    launched = ops.kernel_launches - before
    fallbacks = [w for w in caught if f"head_dim {hd} > 256" in str(w.message)]
    assert len(fallbacks) == (0 if fused else 2)  # one per op: forward and backward
    assert all(issubclass(w.category, RuntimeWarning) for w in fallbacks)
    assert launched["mask_unit_attention_fwd"] == launched["mask_unit_attention_bwd"] == (1 if fused else 0)
    _assert_fp32_close(*results)


@needs_triton
def test_batch_past_grid_limit_runs_eager_with_warning(device, fresh_warnings):
    B = ops._MAX_GRID_BATCH + 1  # [65536, 4, 6]: small in memory, one past the kernels' grid
    qkv = torch.randn(B, 4, 6, device=device)
    before = ops.kernel_launches.copy()
    with pytest.warns(RuntimeWarning, match=f"batch {B} > 65535"):
        results = _grad_vs_float64(qkv, 1, 2, 0, False)
        pooled = ops.unrolled_max_pool(qkv, 2, fused=True)
    launched = ops.kernel_launches - before
    assert sum(launched.values()) == 0
    _assert_fp32_close(*results)
    assert torch.equal(pooled, reference.unrolled_max_pool_eager(qkv, 2))


def test_shape_limits_accept_every_zoo_shape():
    # Hiera-H-16x224, batch 256: the largest attention input of the zoo (stage 1, 25088 tokens x 3 * 256 channels)
    assert ops._kernel_shape_limit(torch.empty(256, 25088, 768, device="meta"), 64) is None
    assert "2**31" in ops._kernel_shape_limit(torch.empty(1, 2**21, 1024, device="meta"))


def test_launch_runs_on_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the *current* device: the launch must be wrapped in a guard for the tensor's device."""
    entered = []

    @contextlib.contextmanager
    def fake_device_guard(device):
        entered.append(torch.device(device))
        yield

    class FakeKernels:
        @staticmethod
        def launcher(x):
            assert entered, "launched outside the device guard"
            return x + 1

    monkeypatch.setattr(torch.cuda, "device", fake_device_guard)
    monkeypatch.setattr(ops, "_kernel_module", lambda name: FakeKernels)
    monkeypatch.setattr(ops, "kernel_launches", collections.Counter())
    assert ops._launch("test_op", "any", "launcher", torch.device("cuda", 1), 41) == 42
    assert entered == [torch.device("cuda", 1)] and ops.kernel_launches["test_op"] == 1
    assert ops._launch("test_op", "any", "launcher", torch.device("cpu"), 1) == 2  # no guard on a CPU
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fused_on_second_gpu_while_first_is_current():
    torch.cuda.set_device(0)
    qkv = torch.randn(2, 64 * 4, 3 * 2 * 32, device="cuda:1")
    out, d_x, ref, d_ref = _grad_vs_float64(qkv, 2, 4, 16, True)
    assert out.device == d_x.device == torch.device("cuda", 1)
    _assert_fp32_close(out, d_x, ref, d_ref)
