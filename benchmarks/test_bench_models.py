"""Model level: images/s of Hiera tiny..huge at 224² (batch 64 and 256, inference, bf16 weights and inputs) and
clips/s of Hiera-B-16x224 (batch 8): our model (``eager`` is ``fused=False``) and the peers on the same weights and
inputs (transformers, the official ``hiera`` package, timm, ``hiera_optim.optimize`` on the official model) and, as
the reference users compare Hiera with, timm's ViT-B/16 at the same batch, each eager and under ``torch.compile``
(``+compile``: default mode; ``+cudagraphs``: ``mode="reduce-overhead"``; ``+max-autotune[-no-cudagraphs]``:
inductor's Triton GEMM templates); peak memory (``torch.cuda.max_memory_allocated``, weights included) for each.
Implementations: ``benchmarks/peers.py``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import first_run_or_skip, graph_memory, measure, record, smoke_requested
from benchmarks.peers import build_variant
from hiera_fast import bench

SIZES = ("tiny", "small", "base", "base_plus", "large", "huge")
BATCHES = (64, 256)
VIDEO = (("hiera_base_16x224", 8),)
# a session's time limit cuts the end of the list: the comparison with the strongest compiled peer first (timm with
# CUDA graphs, then ours, then ViT-B and our fused=False model, the kernels' own share), then the other compile modes,
# then the eager rows
IMPLS = ("timm+cudagraphs", "fused+cudagraphs", "vit+cudagraphs", "eager+cudagraphs",
         "timm+compile", "fused+compile", "eager+compile", "transformers+compile", "vit+compile",
         "timm+max-autotune-no-cudagraphs", "fused+max-autotune",
         "eager", "fused", "official", "timm", "transformers", "hiera-optim", "vit")


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
        variant = build_variant(name, impl, device, dtype, compile_backend=gpu.compile_backend)
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
