"""CPU cases, so ``pytest benchmarks/`` measures something on any machine (about a minute on 2 cores):

- model: Hiera-T at 224², batch 1, fp32 inference: our eager model vs transformers vs the official ``hiera``
  package vs timm, on the same weights and input;
- op: every attention call of Hiera-B at 224², batch 2, fp32 forward: our eager 4-D SDPA vs the official 5-D form.

These say nothing about the GPU kernels (the fused path needs CUDA); they show the peers' relative cost on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import measure, record
from benchmarks.impls import official_5d
from benchmarks.attention_calls import attention_geometries, bandwidth
from benchmarks.peers import build_variant
from hiera_fast import bench, ops

CPU = torch.device("cpu")
MODEL, MODEL_BATCH = "hiera_tiny_224", 1
OP_MODEL, OP_BATCH = "hiera_base_224", 2


@pytest.mark.parametrize("impl", ["eager", "transformers", "official", "timm"])
def test_cpu_model(benchmark, impl):
    config = bench.preset_config(MODEL)
    benchmark.group = f"cpu model {MODEL} b{MODEL_BATCH} fp32"
    try:
        variant = build_variant(MODEL, impl, CPU, torch.float32)
    except bench.Unavailable as err:
        pytest.skip(str(err))
    x = bench.make_input(config, MODEL_BATCH, CPU)
    step = bench.inference_step(variant, x)
    record(benchmark, None, suite="cpu-model", model=MODEL, case=f"{MODEL} b{MODEL_BATCH}", impl=impl,
           dtype=torch.float32, batch=MODEL_BATCH, shape=list(x.shape), mode="inference", unit=bench.item_unit(config))
    ms = measure(benchmark, step, CPU, rounds=3, warmup_rounds=1, memory=False)
    benchmark.extra_info["items_per_s"] = MODEL_BATCH / (ms * 1e-3)


@pytest.mark.parametrize("impl", ["eager", "official-5d"])
@pytest.mark.parametrize("geometry", attention_geometries(OP_MODEL), ids=lambda g: g.id)
def test_cpu_op(benchmark, geometry, impl):
    g = geometry
    benchmark.group = f"cpu op {OP_MODEL} b{OP_BATCH} fp32 fwd"
    if impl == "eager":
        def attention(qkv):
            return ops.mask_unit_attention(qkv, g.num_heads, g.q_stride, g.window_size, g.use_mask_unit_attn)
    else:
        def attention(qkv):
            return official_5d(qkv, g.num_heads, g.q_stride, g.num_windows)
    qkv = torch.randn(g.qkv_shape(OP_BATCH), generator=torch.Generator().manual_seed(0))

    def fn():
        with torch.no_grad():
            return attention(qkv)

    record(benchmark, None, suite="cpu-op", model=OP_MODEL, case=f"{OP_MODEL} {g.label}", impl=impl,
           dtype=torch.float32, batch=OP_BATCH, shape=list(qkv.shape), geometry=g.label, calls=g.calls,
           **{"pass": "fwd"})
    ms = measure(benchmark, fn, CPU, rounds=5, warmup_rounds=1, memory=False)
    moved = g.bytes_moved(OP_BATCH, torch.float32)
    benchmark.extra_info.update(bytes=moved, **bandwidth(moved, ms))
