"""Model level: images/s of Hiera tiny..huge at 224² (batch 64 and 256, inference, bf16 weights and inputs) and
clips/s of Hiera-B-16x224 (batch 8): our model eager, ``fused=True``, ``fused=True`` + ``torch.compile``, and the
peers on the same weights and inputs (transformers, the official ``hiera`` package, timm, and
``hiera_optim.optimize`` on the official model where it is installed); peak memory
(``torch.cuda.max_memory_allocated``, weights included) for each.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import first_run_or_skip, graph_memory, measure, record, smoke_requested
from hiera_fast import bench

SIZES = ("tiny", "small", "base", "base_plus", "large", "huge")
BATCHES = (64, 256)
VIDEO = (("hiera_base_16x224", 8),)
# baselines first, compiled variants last: a session's time limit cuts the end of the list, and a row without its
# baseline has no ratio (the same order as test_bench_train.py)
IMPLS = ("eager", "official", "fused", "hiera-optim", "transformers", "timm", "fused+cudagraphs", "fused+compile")
assert sorted(IMPLS) == sorted(bench.MODEL_IMPLS + bench.PEER_IMPLS)


def _cases(smoke: bool) -> list:
    models = [("hiera_tiny_224", 1)] if smoke else [(f"hiera_{s}_224", b) for s in SIZES for b in BATCHES] + list(VIDEO)
    # model-major order: the shared reference weights are built once per model
    return [pytest.param(name, batch, impl, id=f"{name}-b{batch}-{impl}") for name, batch in models for impl in IMPLS]


def pytest_generate_tests(metafunc):
    if {"name", "batch", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("name", "batch", "impl"), _cases(smoke_requested(metafunc.config)))


def test_inference(benchmark, gpu, name, batch, impl):
    device = gpu.device
    dtype = torch.bfloat16 if gpu.cuda else torch.float32
    if not gpu.cuda and impl.startswith("fused"):
        pytest.skip("smoke run on a CPU: the interpreter is far too slow for a 224² model (`hiera-fast check` covers "
                    "fused models there)")
    config = bench.preset_config(name)
    benchmark.group = f"model {bench.item_unit(config)} b{batch} {bench.dtype_name(dtype)}"
    try:
        variant = bench.build_variant(name, impl, device, dtype)
    except bench.Unavailable as err:
        pytest.skip(str(err))
    x = bench.make_input(config, batch, device, dtype)
    step = bench.inference_step(variant, x)
    first_peak = first_run_or_skip(step, impl, batch, device)  # compile + warm-up before timing
    record(benchmark, gpu, suite="model", model=name, case=f"{name} b{batch}", impl=impl, dtype=dtype, batch=batch,
           shape=list(x.shape), mode="inference", unit=bench.item_unit(config), note=variant.note)
    ms = measure(benchmark, step, device, rounds=2 if gpu.smoke else 10, warmup_rounds=0 if gpu.smoke else 3)
    benchmark.extra_info["items_per_s"] = batch / (ms * 1e-3)
    graph_memory(benchmark, impl, first_peak)
    del variant, step, x
    bench.free_memory()
