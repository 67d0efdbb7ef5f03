"""Op level: every distinct attention call of Hiera-B (224²) and Hiera-B-16x224, forward and forward + backward,
fp16 and bf16, four implementations on the same qkv:

- ``fused``        ``hiera_fast.ops.mask_unit_attention(..., fused=True)``: the Triton kernels for mask-unit
                   attention; for global attention on CUDA, SDPA on views of qkv (``ops.global_attention_sdpa``);
- ``triton-global`` global attention only: our Triton kernel (``ops.set_global_attention("triton")``);
- ``eager``        ``fused=False``: SDPA on contiguous 4-D windows (our eager reference);
- ``official-5d``  the official ``MaskUnitAttention`` as written (5-D SDPA, so PyTorch's math path): the baseline;
- ``flex``         ``torch.nn.attention.flex_attention`` on the unrolled tokens with the block mask
                   ``q_idx % nw == kv_idx % nw`` (pooled query rows are ``r * nw + w`` too), compiled.

Batches start at 256 images / 8 clips and double until one forward call moves >= 200 MB (past the 50 MB L2).
``median_ms`` is ``triton.testing.do_bench``'s median: each call launched from Python after an L2 flush, so where the
host takes longer to launch a call than the GPU takes to run it, that is host time. ``graph_ms`` is the GPU time
alone (``triton.testing.do_bench_cudagraph``: the calls captured in one CUDA graph and replayed back to back, L2 not
flushed), the number that says how fast the kernels are; ``graph_error`` says why a call could not be captured.
``gb_per_s`` / ``pct_of_peak`` (of ``median_ms``) and ``graph_gb_per_s`` / ``graph_pct_of_peak`` use the
minimum-traffic bytes model of :mod:`hiera_fast.bench` against the GPU's measured copy bandwidth
(``benchmarks.attention_calls.peak_bandwidth``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import measure, record, smoke_requested
from benchmarks.impls import flex, flex_module, official_5d
from benchmarks.attention_calls import AttentionGeometry, attention_geometries, bandwidth, batch_past_l2, peak_bandwidth
from hiera_fast import bench, ops
from hiera_fast.config import HieraConfig

MODELS = {"hiera_base_224": (256, 1024), "hiera_base_16x224": (8, 64)}  # (base batch, cap)
SMOKE_MODELS = {"hiera_base_224": dict(image_size=(64, 64), depths=(1, 2, 2, 1)),
                "hiera_base_16x224": dict(image_size=(4, 64, 64), depths=(1, 2, 2, 1))}
IMPLS = ("fused", "triton-global", "eager", "official-5d", "flex")
PASSES = ("fwd", "fwd+bwd")


def _impl(name: str, geometry: AttentionGeometry, device: torch.device):
    g = geometry
    if name == "fused":
        backend, reason = ops.fused_backend(device)
        if backend == "eager":
            pytest.skip(f"fused=True would run the eager path here: {reason}")
        return lambda qkv: ops.mask_unit_attention(qkv, g.num_heads, g.q_stride, g.window_size,
                                                   g.use_mask_unit_attn, fused=True)
    if name == "triton-global":
        if g.use_mask_unit_attn:
            pytest.skip("mask-unit attention: fused=True runs this kernel (the fused column)")
        backend, reason = ops.fused_backend(device)
        if backend == "eager":
            pytest.skip(f"the Triton kernels do not run here: {reason}")

        def triton_global(qkv):
            with ops.global_attention("triton"):
                return ops.mask_unit_attention(qkv, g.num_heads, g.q_stride, g.window_size, False, fused=True)

        return triton_global
    if name == "eager":
        return lambda qkv: ops.mask_unit_attention(qkv, g.num_heads, g.q_stride, g.window_size,
                                                   g.use_mask_unit_attn, fused=False)
    if name == "official-5d":
        return lambda qkv: official_5d(qkv, g.num_heads, g.q_stride, g.num_windows)
    if name == "flex":
        if device.type != "cuda":
            pytest.skip("FlexAttention is benchmarked on CUDA only")
        try:
            flex_module()
        except ImportError as err:
            pytest.skip(f"this torch has no FlexAttention: {err}")
        return lambda qkv: flex(qkv, g.num_heads, g.q_stride, g.num_windows)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------- parametrization
def _cases(smoke: bool) -> list:
    cases = []
    for model, (base, cap) in MODELS.items():
        config = HieraConfig.from_preset(model, **(SMOKE_MODELS[model] if smoke else {}))
        for g in attention_geometries(config):
            short = model.removeprefix("hiera_")
            cases.append(pytest.param((model, g, 1 if smoke else base, 2 if smoke else cap), id=f"{short}-{g.id}"))
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        smoke = smoke_requested(metafunc.config)
        metafunc.parametrize("case", _cases(smoke))
        dtypes = ("fp32",) if smoke and not torch.cuda.is_available() else ("fp16", "bf16")
        metafunc.parametrize("dtype", dtypes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES, ids=["fwd", "fwdbwd"])
def test_attention(benchmark, gpu, case, pass_, dtype, impl):
    model, g, base, cap = case
    dtype = bench.parse_dtype(dtype)
    device = gpu.device
    batch = base if gpu.smoke else batch_past_l2(g, base, dtype, cap)
    fn_impl = _impl(impl, g, device)
    benchmark.group = f"op {model} {bench.dtype_name(dtype)} {pass_}"
    backward = pass_ == "fwd+bwd"
    qkv = torch.randn(g.qkv_shape(batch), device=device, dtype=dtype, requires_grad=backward)
    if backward:
        d_out = torch.randn(batch, g.tokens_out, g.dim, device=device, dtype=dtype)

        def fn():
            fn_impl(qkv).backward(d_out)
    else:
        def fn():
            with torch.no_grad():
                return fn_impl(qkv)

    launches = sum(ops.kernel_launches.values())
    try:
        fn()  # compiles flex; proves the case runs before it is timed
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of memory at batch {batch}")
    except Exception as err:  # a peer that cannot run this shape here is a skip with its reason, not a crash
        if impl != "flex":
            raise
        pytest.skip(f"FlexAttention failed on this shape: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if impl in ("fused", "triton-global"):
        assert sum(ops.kernel_launches.values()) > launches, "the fused case did not run the fused path"
    record(benchmark, gpu, suite="op", model=model, case=f"{model} {g.label}", impl=impl, dtype=dtype, batch=batch,
           shape=list(g.qkv_shape(batch)), geometry=g.label, where=g.where, calls=g.calls, num_windows=g.num_windows,
           q_per_window=g.q_per_window, kv_per_window=g.kv_per_window, num_heads=g.num_heads, head_dim=g.head_dim,
           q_stride=g.q_stride, **{"pass": pass_})
    ms = measure(benchmark, fn, device, rounds=1 if gpu.smoke else 10, warmup_rounds=0 if gpu.smoke else 2,
                 do_bench=True, grad_to_none=[qkv] if backward else None, graph=f"{impl} {pass_}")
    moved = g.bytes_moved(batch, dtype, backward)
    peak = peak_bandwidth(device)
    benchmark.extra_info.update(bytes=moved, tflops=g.flops(batch, backward) / (ms * 1e-3) / 1e12,
                                floor_ms=moved / peak * 1e3, **bandwidth(moved, ms, peak))
    graph_ms = benchmark.extra_info.get("graph_ms")
    if graph_ms:
        benchmark.extra_info.update({f"graph_{k}": v for k, v in bandwidth(moved, graph_ms, peak).items()})
