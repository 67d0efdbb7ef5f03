"""SAM 2's Hiera trunk with ``fused=True`` and the ``hiera_fast.ops.WindowAttention`` op it runs (CPU lane: the
kernels under Triton's interpreter).

The fused trunk against the float64 eager trunk (the official formulation: :mod:`tests.test_sam2_reference` shows
it equals the four peers): every output level and every gradient (the pixels', every parameter's, the qkv biases'
included: a padded token's q, k, v are its rows) within twice the fp32 eager trunk's own error (plus a floor), the
window kernels launched once per windowed block forward and backward. Geometries where padded tokens matter: stages
3 and 4 padded (8 -> 14, 4 -> 7), and five stages whose last pooling block pools an odd 3x3 map in a padded window.
Bias-heavy weights (qkv biases and position embeddings ~ N(0, 1)).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hiera_fast import ops
from hiera_fast.ops import reference, routing
from hiera_fast.sam2 import HieraDetConfig, HieraDetModel

from helpers import sam2_bias_heavy_ as bias_heavy_

SMALL = dict(embed_dim=16, num_heads=1, stages=(1, 2, 3, 2), global_att_blocks=(4,),
             window_pos_embed_bkg_spatial_size=(7, 7))  # window_spec (8, 4, 14, 7); block 4 global
FIVE = {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1, 1), "q_pool": 4, "window_spec": (8, 4, 4, 4, 2),
        "global_att_blocks": (), "window_pos_embed_bkg_spatial_size": (7, 7)}
GEOMETRIES = {"padded-128": (SMALL, 128, 7), "five-stages-96": (FIVE, 96, 5)}  # (config, side, windowed blocks)

pytestmark = pytest.mark.skipif(routing.fused_backend("cpu")[0] == "eager",
                                reason="the CPU lane needs the kernels defined under TRITON_INTERPRET=1")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _run(model, x):
    """Output levels and the gradients of the pixels and every parameter, for a loss that weights every level."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    outs = model(x)
    sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs).backward()
    names = ["pixels"] + [n.removeprefix("_orig_mod.") for n, _ in model.named_parameters()]
    return [o.detach() for o in outs], dict(zip(names, [x.grad] + [p.grad for p in model.parameters()], strict=True))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_fused_trunk_matches_float64_forward_and_backward(geometry):
    kwargs, side, windowed = GEOMETRIES[geometry]
    model = bias_heavy_(HieraDetModel(HieraDetConfig(**kwargs))).eval()
    x = torch.randn(2, 3, side, side)
    ref_out, ref_grads = _run(model.double(), x.double())
    eager_out, eager_grads = _run(model.float(), x)
    model.fused = True
    before = ops.kernel_launches.copy()
    out, grads = _run(model, x)
    launched = ops.kernel_launches - before
    assert (launched["window_attention_fwd"], launched["window_attention_bwd"]) == (windowed, windowed)
    assert all(route.kind == "kernel" for routes in model.fused_routes().values() for route in routes.values())
    for i, (a, e, r) in enumerate(zip(out, eager_out, ref_out, strict=True)):
        assert rel(a, r) <= 2 * rel(e, r) + 1e-6, f"level {i}: fused {rel(a, r):.2e}, eager {rel(e, r):.2e}"
    assert any(n.endswith("attn.qkv.bias") for n in grads)
    for name in ref_grads:
        a, e, r = grads[name], eager_grads[name], ref_grads[name]
        assert rel(a, r) <= 2 * rel(e, r) + 1e-6, f"grad {name}: fused {rel(a, r):.2e}, eager {rel(e, r):.2e}"


def test_fused_trunk_fp16_within_twice_eager_error():
    """fp16 weights and pixels, forward: the fused trunk's error against float64 at most twice the fp16 eager
    trunk's (plus a floor)."""
    model = bias_heavy_(HieraDetModel(HieraDetConfig(**SMALL))).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = model.double()(x.double())
        eager = model.half()(x.half())
        model.fused = True
        fused = model(x.half())
    for i, (a, e, r) in enumerate(zip(fused, eager, ref, strict=True)):
        assert a.dtype == torch.float16 and rel(a, r) <= 2 * rel(e, r) + 1e-3, f"level {i}"


def test_fused_flag_and_routes():
    model = HieraDetModel(HieraDetConfig(**SMALL), fused=True)
    assert model.fused and all(b.attn.fused for b in model.blocks)
    assert "fused=True" in repr(model.blocks[0].attn)
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128))
    routes = model.fused_routes()
    assert len(routes) == 7 and "blocks.4.attn" not in routes  # block 4 is global: SDPA on views
    model.fused = False
    assert not model.fused and model.fused_routes() == {name: {} for name in routes}
    with pytest.raises(TypeError, match="fused must be a bool"):
        model.fused = "yes"


def test_export_holds_the_window_kernels():
    model = bias_heavy_(HieraDetModel(HieraDetConfig(**SMALL), fused=True)).eval()
    x = torch.randn(1, 3, 128, 128)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "hiera_fast.window_attention_fwd.default" in targets
    with torch.no_grad():
        for a, b in zip(exported.module()(x), model(x), strict=True):
            assert rel(a, b) <= 1e-6


def test_compiled_fused_trunk_trains_like_eager():
    """``torch.compile`` (aot_eager: the custom ops in the graph, run by the interpreter) of the fused trunk: outputs
    and every gradient equal the fused eager ones."""
    model = bias_heavy_(HieraDetModel(HieraDetConfig(**FIVE), fused=True)).train()
    x = torch.randn(1, 3, 96, 96)
    out, grads = _run(model, x)
    c_out, c_grads = _run(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    for a, b in zip(c_out, out, strict=True):
        assert rel(a, b) <= 1e-6
    for name in grads:
        assert rel(c_grads[name], grads[name]) <= 1e-6, name


# ------------------------------------------------------------------------------------------------ the op
def test_op_routes_bf16_and_big_strides_to_eager_with_one_warning():
    routing.reset_warnings()
    qkv, bias = torch.randn(1, 8, 8, 48, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    op = ops.WindowAttention(2, 8, 2, fused=True)
    with pytest.warns(RuntimeWarning, match="bfloat16 on the CPU"):
        out = op(qkv, bias)
    assert torch.equal(out, reference.window_attention_bhwc_reference(qkv, bias, 2, 8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op(qkv, bias)  # once per reason
    with pytest.warns(RuntimeWarning, match="q_stride 3 > 2"):
        ops.WindowAttention(2, 6, 3, fused=True)(torch.randn(1, 12, 12, 48), None)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 8, 1), {}, ValueError, "num_heads must be a positive int"),
    ((2, 4, 8), {}, ValueError, r"q_stride \(8\) must be at most window_size \(4\)"),
    ((2, 8, 1), {"fused": "True"}, TypeError, "fused must be a bool"),
])
def test_op_argument_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.WindowAttention(*args, **kwargs)


@pytest.mark.parametrize("qkv, bias, error, match", [
    (torch.randn(2, 64, 48), None, ValueError, r"\[B, H, W, 3 \* C\] \(rank 4, BHWC\)"),
    (torch.randn(1, 8, 8, 47), None, ValueError, "must be 3 \\* C"),
    (torch.randint(0, 3, (1, 8, 8, 48)), None, TypeError, "qkv must be float16"),
    (torch.randn(1, 14, 14, 48), None, ValueError, "window_unpartition cannot put them back"),
    (torch.randn(1, 8, 8, 48), torch.randn(16), ValueError, r"bias must be \[3 \* C\] = \[48\]"),
    (torch.randn(1, 8, 8, 48), [0.0] * 48, TypeError, "bias must be a torch.Tensor or None"),
])
def test_op_input_errors(qkv, bias, error, match):
    op = ops.WindowAttention(2, 7 if qkv.shape[1] == 14 else 8, 2, fused=True)
    with pytest.raises(error, match=match):
        op(qkv, bias)


def test_op_gradient_reaches_the_bias_only_through_padding():
    """Without padding the bias gets no gradient from the op (its padded rows are none); with padding, the float64
    reference's."""
    bias = torch.randn(48, dtype=torch.float64, requires_grad=True)
    op = ops.WindowAttention(2, 4, 2, fused=True)
    for side, expect_zero in ((8, True), (10, False)):
        qkv = torch.randn(2, side, side, 48, dtype=torch.float64, requires_grad=True)
        (d_bias,) = torch.autograd.grad(op(qkv, bias).sum(), bias)
        (ref,) = torch.autograd.grad(reference.window_attention_bhwc_reference(qkv, bias, 2, 4, 2).sum(), bias)
        assert torch.allclose(d_bias, ref, atol=1e-10) and (d_bias.abs().max() == 0) == expect_zero
