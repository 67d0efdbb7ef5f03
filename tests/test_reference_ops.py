"""The eager 4-D SDPA form of the op against the official 5-D formulation (float64), values and gradients."""

from __future__ import annotations

import pytest
import torch

from hiera_fast import ops
from hiera_fast.ops import reference

# (B, tokens per window T, windows, q_stride, heads, head_dim): Hiera-B's per-block geometries, batch scaled down
GEOMETRIES = [
    (2, 64, 49, 1, 1, 96), (1, 64, 49, 4, 2, 96), (3, 16, 49, 1, 2, 56), (1, 16, 49, 4, 4, 72),
    (2, 196, 1, 1, 4, 64), (1, 196, 1, 4, 8, 96), (2, 49, 1, 1, 8, 96), (1, 16, 7, 4, 2, 32), (1, 64, 19, 8, 1, 40),
]


@pytest.mark.parametrize("B, T, nw, s, heads, hd", GEOMETRIES)
def test_eager_matches_official_5d(B, T, nw, s, heads, hd):
    qkv = torch.randn(B, T * nw, 3 * heads * hd, dtype=torch.float64, requires_grad=True)
    ref = reference.mask_unit_attention_official(qkv, heads, s, nw)
    got = reference.mask_unit_attention_eager(qkv, heads, s, nw)
    assert got.shape == (B, T // s * nw, heads * hd)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    (d_ref,) = torch.autograd.grad(ref, qkv, g)
    (d_got,) = torch.autograd.grad(got, qkv, g)
    torch.testing.assert_close(d_got, d_ref, rtol=1e-10, atol=1e-10)


def test_op_window_count_follows_the_official_rule():
    qkv = torch.randn(2, 3136, 3 * 96, dtype=torch.float64)
    out = ops.mask_unit_attention(qkv, 1, 4, 16, True)  # stage-2 pooling block: 49 windows of 64 -> 16
    torch.testing.assert_close(out, reference.mask_unit_attention_official(qkv, 1, 4, 49))
    out = ops.mask_unit_attention(qkv[:, :196], 1, 1, 1, False)  # global: one window
    torch.testing.assert_close(out, reference.mask_unit_attention_official(qkv[:, :196], 1, 1, 1))


def test_unrolled_max_pool_is_the_official_do_pool():
    x = torch.randn(3, 64, 8, dtype=torch.float64)
    expected = x.view(3, 4, 16, 8).max(dim=1).values
    torch.testing.assert_close(ops.unrolled_max_pool(x, 4), expected, rtol=0, atol=0)
    assert ops.unrolled_max_pool(x, 1) is x


def test_eager_gradcheck():
    qkv = torch.randn(1, 16 * 2, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.mask_unit_attention(t, 2, 4, 4, True), (qkv,))


@pytest.mark.parametrize("B, T, nw, s, heads, hd", GEOMETRIES)
def test_analytic_backward_matches_autograd(B, T, nw, s, heads, hd):
    qkv = torch.randn(B, T * nw, 3 * heads * hd, dtype=torch.float64, requires_grad=True)
    ref = reference.mask_unit_attention_official(qkv, heads, s, nw)
    g = torch.randn_like(ref)
    (d_ref,) = torch.autograd.grad(ref, qkv, g)
    got = reference.mask_unit_attention_backward_eager(g, qkv.detach(), heads, s, nw)
    torch.testing.assert_close(got, d_ref, rtol=1e-10, atol=1e-10)


def test_analytic_max_pool_backward_matches_autograd():
    x = torch.randn(2, 32, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 8, 5, dtype=torch.float64).expand(2, 8, 5)
    (ref,) = torch.autograd.grad(x.view(2, 4, 8, 5).max(dim=1).values, x, g)
    torch.testing.assert_close(reference.unrolled_max_pool_backward_eager(g, x.detach(), 4), ref, rtol=0, atol=0)
