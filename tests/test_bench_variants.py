"""``hiera_fast.bench.build_variant``'s compiled variants: the torch.compile mode each one asks for, and the CUDA-graph
step marker before every call (without it a CUDA-graph replay may overwrite the last step's outputs)."""

from __future__ import annotations

import types

import pytest
import torch

from hiera_fast import bench, ops


@pytest.mark.skipif(ops.fused_backend("cpu")[0] == "eager", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize("impl, mode, marks_steps", [("fused+compile", "default", False),
                                                     ("fused+cudagraphs", "reduce-overhead", True)])
def test_compiled_variants(monkeypatch, impl, mode, marks_steps):
    compiled, steps = [], []

    def fake_compile(model, mode=None, **kwargs):
        compiled.append((model, mode))
        return lambda x: types.SimpleNamespace(logits=torch.full((x.shape[0], 1000), 2.0), loss=torch.tensor(5.0))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    variant = bench.build_variant("hiera_tiny_224", impl, "cpu", torch.float32)
    assert len(compiled) == 1 and compiled[0][0] is variant.model and compiled[0][1] == mode
    assert variant.model.fused
    x = torch.zeros(2, 3, 8, 8)
    assert torch.equal(variant.forward(x), torch.full((2, 1000), 2.0))
    variant.loss(x)
    assert len(steps) == (2 if marks_steps else 0)
    mae = bench.build_variant("mae_hiera_tiny_224", impl, "cpu", torch.float32)
    assert mae.forward(x).item() == 5.0 and compiled[-1][1] == mode


def test_every_model_impl_builds_or_says_why():
    assert set(bench.COMPILE_MODES) <= set(bench.MODEL_IMPLS)
    with pytest.raises(ValueError, match="unknown implementation"):
        bench.build_variant("hiera_tiny_224", "fused+jit", "cpu")


@pytest.mark.parametrize("name, tbps", [("NVIDIA H200", 4.3), ("NVIDIA H100 80GB HBM3", 3.0), ("NVIDIA A100", 3.0)])
def test_peak_bandwidth_follows_the_gpu(monkeypatch, name, tbps):
    """% of peak is against the GPU that ran (an H200 has ~1.4x an H100's bandwidth), H100's for unknown ones."""
    monkeypatch.setattr(bench, "device_name", lambda device: name)
    assert bench.peak_bandwidth("cuda") == tbps * 1e12
    row = bench.bandwidth(tbps * 1e12 / 2 * 1e-3, 1.0, bench.peak_bandwidth("cuda"))  # half the peak for 1 ms
    assert row["pct_of_peak"] == pytest.approx(50.0) and row["peak_tbps"] == tbps


def test_interrupted_measurement_marks_the_row_failed():
    """SIGINT (a step's time limit) inside pytest-benchmark's timing loop leaves a row without data, which made it fail
    writing the whole JSON; the row is marked as an error so only the finished rows are written."""
    from benchmarks.common import measure

    class InterruptedBenchmark:
        has_error, extra_info = False, {}

        def pedantic(self, *args, **kwargs):
            raise KeyboardInterrupt

    benchmark = InterruptedBenchmark()
    with pytest.raises(KeyboardInterrupt):
        measure(benchmark, lambda: None, torch.device("cpu"), rounds=1)
    assert benchmark.has_error


@pytest.mark.parametrize("impl, fails", [("fused+cudagraphs", True), ("fused+compile", False), ("eager", False)])
def test_cuda_graph_row_fails_when_inductor_skips_graphs(impl, fails):
    """Inductor falls back to running without CUDA graphs silently (it only bumps a counter): a "fused+cudagraphs"
    row must not time that under its label."""
    from torch._dynamo.utils import counters

    from benchmarks.common import first_run_or_skip

    def step_that_skips_graphs():
        counters["inductor"]["cudagraph_skips"] += 1  # what inductor does when it skips

    if fails:
        with pytest.raises(pytest.fail.Exception, match="skipped CUDA graphs 1 time"):
            first_run_or_skip(step_that_skips_graphs, impl, 1, torch.device("cpu"))
    else:
        assert first_run_or_skip(step_that_skips_graphs, impl, 1, torch.device("cpu")) is None
    assert first_run_or_skip(lambda: None, "fused+cudagraphs", 1, torch.device("cpu")) is None  # no skip: passes


def test_graph_timing_records_the_root_cause_and_stops_after_a_failed_capture(monkeypatch):
    """``measure(..., graph=key)`` on CUDA: the GPU time of a capturable call as ``graph_ms``; for a call that cannot
    be captured, the first error of the chain (a failed capture re-raises torch's end-of-capture error, the real one
    is its context) as ``graph_error``, and later cases of the same key skip the capture (each failed one leaks its
    memory pool) while other keys still capture. (CUDA is faked: the timers are replaced.)"""
    from benchmarks import common

    class FakeBenchmark:
        has_error = False

        def __init__(self):
            self.extra_info = {}

        def pedantic(self, target, rounds, warmup_rounds, iterations):
            for _ in range(rounds + warmup_rounds):
                target()

    captures = []

    def time_graph_ms(fn, device, grad_to_none=None):
        captures.append(fn)
        if fn is failing:
            try:
                raise ValueError("the real cause")
            except ValueError:
                raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
        return 0.25

    def failing():
        return None

    def capturable():
        return None

    monkeypatch.setattr(common.bench, "time_ms", lambda fn, device, grad_to_none=None: 1.0)
    monkeypatch.setattr(common.bench, "time_graph_ms", time_graph_ms)
    monkeypatch.setattr(common.bench, "synchronize", lambda device: None)
    monkeypatch.setattr(common, "_GRAPH_FAILED", {})
    cuda = torch.device("cuda")
    rows = []
    for fn, key in ((capturable, "fused fwd"), (failing, "official-5d fwd"), (failing, "official-5d fwd"),
                    (capturable, "official-5d fwd+bwd")):
        row = FakeBenchmark()
        assert common.measure(row, fn, cuda, rounds=1, do_bench=True, memory=False, graph=key) == 1.0
        rows.append(row.extra_info)
    assert rows[0]["graph_ms"] == 0.25 and "graph_error" not in rows[0]
    assert rows[1]["graph_error"] == "ValueError: the real cause" and "graph_ms" not in rows[1]
    assert rows[2]["graph_error"].startswith("not captured: an earlier official-5d fwd case failed (ValueError")
    assert rows[3]["graph_ms"] == 0.25
    assert captures == [capturable, failing, capturable]  # the third case did not try to capture
