"""Training: one MAE step (forward + backward + fused AdamW) of Hiera-B at 224², batch 128, bf16 autocast: our model
(``eager`` is ``fused=False``) eager and compiled (``+cudagraphs``: ``mode="reduce-overhead"``), the official
``MaskedAutoencoderHiera``, ``hiera_optim.optimize`` on it (``hiera-optim+cudagraphs``: its best documented setting,
``graph_safe=True`` with its static mask buffers, under reduce-overhead) and transformers' ``HieraForPreTraining``,
same weights; and ``vit+cudagraphs``, a *supervised* ViT-B/16 classification step at the same batch (timm has no MAE
ViT: the reference row users compare Hiera with, not the same task). Peak memory (weights, AdamW state and
activations). Implementations: ``benchmarks/peers.py``."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import first_run_or_skip, graph_memory, measure, record, smoke_requested
from benchmarks.peers import build_variant
from hiera_fast import bench

CASES = (("mae_hiera_base_224", 128),)
# a time-limited run (gpu_session.sh) loses the last cases: the strongest compiled peer first (hiera-optim's best
# mode), then ours with CUDA graphs, our fused=False model compiled alike (the kernels' own share) and the ViT-B
# reference, then the eager rows
IMPLS = ("hiera-optim+cudagraphs", "fused+cudagraphs", "eager+cudagraphs", "vit+cudagraphs", "official", "eager",
         "hiera-optim", "fused", "fused+compile", "transformers", "transformers+compile", "fused+max-autotune")


def pytest_generate_tests(metafunc):
    if {"name", "batch", "impl"} <= set(metafunc.fixturenames):
        cases = (("mae_hiera_tiny_224", 1),) if smoke_requested(metafunc.config) else CASES
        metafunc.parametrize(("name", "batch", "impl"),
                             [pytest.param(n, b, i, id=f"{n}-b{b}-{i}") for n, b in cases for i in IMPLS])


def test_mae_train_step(benchmark, gpu, name, batch, impl):
    device = gpu.device
    dtype = torch.bfloat16 if gpu.cuda else torch.float32  # autocast dtype; the weights stay fp32
    if not gpu.cuda and impl.startswith("fused"):
        pytest.skip("smoke run on a CPU: the interpreter is far too slow for a 224² model")
    config = bench.preset_config(name)
    benchmark.group = f"train {name} b{batch} {bench.dtype_name(dtype)} autocast"
    try:
        variant = build_variant(name, impl, device, None, train=True, compile_backend=gpu.compile_backend)
    except bench.Unavailable as err:
        pytest.skip(str(err))
    x = bench.make_input(config, batch, device)
    step = bench.train_step(variant, x, dtype)
    first_peak = first_run_or_skip(step, impl, batch, device)  # compile + warm-up before timing
    mode = f"train (forward + backward + AdamW{', autocast' if gpu.cuda else ''})"
    record(benchmark, gpu, suite="train", model=name, case=f"{name} b{batch} MAE step", impl=impl, dtype=dtype,
           batch=batch, shape=list(x.shape), mode=mode,
           unit=bench.item_unit(config), note=variant.note)
    ms = measure(benchmark, step, device, rounds=2 if gpu.smoke else 10, warmup_rounds=0 if gpu.smoke else 3)
    benchmark.extra_info["items_per_s"] = batch / (ms * 1e-3)
    graph_memory(benchmark, impl, first_peak)
    del variant, step, x
    bench.free_memory()
