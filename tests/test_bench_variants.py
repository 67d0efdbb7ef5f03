"""The benchmark implementations (``hiera_fast.bench`` for ours, ``benchmarks/peers.py`` for the peers): the
torch.compile mode each ``base+mode`` asks for, the CUDA-graph step marker before every call (without it a CUDA-graph
replay may overwrite the last step's outputs), hiera-optim's static buffers refreshed outside the graphs, and the
rows' bookkeeping (interrupted or failed cases, recompiles, GPU timing, the profile's host accounting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import peers
from benchmarks.attention_calls import bandwidth, peak_bandwidth
from hiera_fast import bench, ops


@pytest.mark.skipif(ops.fused_backend("cpu")[0] == "eager", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize("impl, mode, marks_steps", [
    ("fused+compile", "default", False), ("fused+cudagraphs", "reduce-overhead", True),
    ("eager+cudagraphs", "reduce-overhead", True), ("fused+max-autotune", "max-autotune", True),
    ("timm+compile", "default", False), ("timm+max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", False),
    ("transformers+compile", "default", False), ("vit+cudagraphs", "reduce-overhead", True)])
def test_compiled_variants(monkeypatch, impl, mode, marks_steps):
    compiled, steps = [], []

    def fake_compile(model, mode=None, **kwargs):
        compiled.append((model, mode))

        def call(x=None, **kwargs):
            x = kwargs.get("pixel_values", x)
            return types.SimpleNamespace(logits=torch.full((x.shape[0], 1000), 2.0), loss=torch.tensor(5.0))

        return lambda *args, **kwargs: (call(*args, **kwargs) if not isinstance(model, torch.nn.Module) or
                                        hasattr(model, "config") else torch.full((args[0].shape[0], 1000), 2.0))

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    variant = peers.build_variant("hiera_tiny_224", impl, "cpu", torch.float32)
    assert len(compiled) == 1 and compiled[0][0] is variant.model and compiled[0][1] == mode
    assert bench.is_compiled(impl) and bench.uses_cuda_graphs(impl) == marks_steps
    if impl.startswith("fused"):
        assert variant.model.fused
    x = torch.zeros(2, 3, 8, 8)
    assert torch.equal(variant.forward(x), torch.full((2, 1000), 2.0))
    variant.loss(x)
    assert len(steps) == (2 if marks_steps else 0)
    if impl.split("+")[0] in ("fused", "eager"):
        mae = peers.build_variant("mae_hiera_tiny_224", impl, "cpu", torch.float32)
        assert mae.forward(x).item() == 5.0 and compiled[-1][1] == mode


def test_every_impl_builds_or_says_why():
    with pytest.raises(ValueError, match="unknown compile mode"):
        bench.build_variant("hiera_tiny_224", "fused+jit", "cpu")
    with pytest.raises(ValueError, match="unknown implementation"):
        peers.build_variant("hiera_tiny_224", "flash", "cpu")
    with pytest.raises(ValueError, match="ours are eager / fused"):
        bench.build_variant("hiera_tiny_224", "timm", "cpu")  # the library holds ours only
    with pytest.raises(bench.Unavailable, match="timm's Hiera has image classifiers only"):
        peers.build_variant("mae_hiera_tiny_224", "timm+compile", "cpu")
    with pytest.raises(bench.Unavailable, match="224"):
        peers.build_variant("hiera_base_16x224", "vit", "cpu")


def test_hiera_optim_graph_safe_refreshes_its_masks_outside_the_graphs(monkeypatch):
    """hiera-optim's best mode (graph_safe=True under reduce-overhead) gets its static mask buffers, refreshed before
    each step (outside any captured graph), and passed to every call."""
    hiera_optim = pytest.importorskip("hiera_optim", reason="hiera-optim is not installed (pip install hiera-optim)")
    calls, refreshes, optimized = [], [], []

    class FakeInputs:
        def __init__(self, model, batch_size, **kwargs):
            self.mask, self.keep_idx = torch.ones(batch_size, 4, dtype=torch.bool), torch.zeros(batch_size, 2)

        def refresh_mask(self):
            refreshes.append(1)

    monkeypatch.setattr(hiera_optim, "optimize", lambda model, **kw: optimized.append(kw))
    monkeypatch.setattr(hiera_optim, "MAEStepInputs", FakeInputs)
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: lambda x, **kw: calls.append((mode, kw)) or [
        torch.tensor(1.0)])
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    variant = peers.build_variant("mae_hiera_tiny_224", "hiera-optim+cudagraphs", "cpu", None, train=True)
    assert optimized == [{"verbose": False, "graph_safe": True}]
    x = torch.zeros(2, 3, 224, 224)
    variant.loss(x)
    variant.before_step()
    assert refreshes == [1] and calls[0][0] == "reduce-overhead"
    assert set(calls[0][1]) == {"mask_ratio", "mask", "keep_idx"}


@pytest.mark.parametrize("name, tbps", [("NVIDIA H200", 4.3), ("NVIDIA H100 80GB HBM3", 3.0), ("NVIDIA A100", 3.0),
                                        ("NVIDIA GH200 480GB", 3.0)])
def test_peak_bandwidth_follows_the_gpu(monkeypatch, name, tbps):
    """% of peak is against the GPU that ran (an H200 has ~1.4x an H100's bandwidth), H100's for unknown ones."""
    monkeypatch.setattr(bench, "device_name", lambda device: name)
    assert peak_bandwidth("cuda") == tbps * 1e12
    row = bandwidth(tbps * 1e12 / 2 * 1e-3, 1.0, peak_bandwidth("cuda"))  # half the peak for 1 ms
    assert row["pct_of_peak"] == pytest.approx(50.0) and row["peak_tbps"] == tbps


_INTERRUPTED_SUITE = """
import pytest


def test_finished(benchmark):
    benchmark.pedantic(lambda: None, rounds=2)
    benchmark.extra_info["median_ms"] = 1.0


def test_failed_after_timing(benchmark):  # a check after the rounds (measure's recompile check) fails the row
    benchmark.pedantic(lambda: None, rounds=2)
    pytest.fail("the rounds recompiled")


def test_cut_after_timing(benchmark):  # SIGINT after pytest-benchmark's rounds: a half-filled row
    benchmark.pedantic(lambda: None, rounds=2)
    benchmark.extra_info["median_ms"] = 2.0
    raise KeyboardInterrupt


def test_never_reached(benchmark):
    benchmark.pedantic(lambda: None, rounds=1)
"""


@pytest.mark.parametrize("cut_inside_pedantic", [False, True])
def test_interrupted_case_is_left_out_of_the_json(tmp_path, cut_inside_pedantic):
    """gpu_session.sh cuts a step with SIGINT (a KeyboardInterrupt in the running case). The finished rows must still
    be written, and the interrupted one left out: cut after pytest-benchmark's rounds it would be saved with half its
    numbers (reported under the wrong timer); cut inside them it has no data and pytest-benchmark failed to write
    the JSON at all. A case failed after its rounds is left out too (pytest-benchmark saved it with the times its
    check rejected). Runs benchmarks/conftest.py's hook in a real pytest session."""
    suite = _INTERRUPTED_SUITE
    if cut_inside_pedantic:
        suite = suite.replace("benchmark.pedantic(lambda: None, rounds=2)\n    benchmark.extra_info[\"median_ms\"] = 2.0",
                              "benchmark.pedantic(_interrupt, rounds=2)") + (
            "\n\ndef _interrupt():\n    raise KeyboardInterrupt\n")
    (tmp_path / "test_cut.py").write_text(suite)
    out = tmp_path / "rows.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_cut.py"), "-p", "benchmarks.conftest",
                           "-p", "no:cacheprovider", "-q", f"--benchmark-json={out}", "--rootdir", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert out.exists(), proc.stdout + proc.stderr
    names = [row["name"] for row in json.loads(out.read_text())["benchmarks"]]
    assert names == ["test_finished"]


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

    monkeypatch.setattr(common, "time_ms", lambda fn, device, grad_to_none=None: 1.0)
    monkeypatch.setattr(common, "time_graph_ms", time_graph_ms)
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels reach CUDA here: nothing stops the session")
@pytest.mark.parametrize("install_ok", [True, False])
def test_gpu_session_stops_when_the_fused_kernels_cannot_run(tmp_path, install_ok):
    """benchmarks/gpu_session.sh on a machine where fused=True would not reach the Triton kernels on CUDA (here: no
    CUDA), or where the install failed, stops before the measured steps instead of spending the device's minutes on
    cases that all skip. ``pip`` is stubbed (the package is installed already); everything else runs for real."""
    root = Path(__file__).resolve().parents[1]
    python = tmp_path / "python"
    fail_install = "" if install_ok else '*" -e ."*) exit 1 ;; '  # the project's install fails, the peers' wheels not
    python.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then case "$*" in {fail_install}*) exit 0 ;; esac; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SMOKE", "STEPS")}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=240, env={**env, "PYTHON": str(python), "BUDGET": "200"})
    log = (out / "session.log").read_text()
    assert proc.returncode == 101, proc.stdout + proc.stderr
    if install_ok:
        assert "fused=True on cuda: eager" in log and "=== stopping: fused=True would not run" in log
    else:
        assert "=== stopping: the install failed" in log and "fused-backend" not in log
    assert "gpu-tests" not in log and sorted(p.name for p in out.iterdir()) == ["session.log"]


def test_do_bench_rows_run_one_pedantic_round_and_report_one_timer(monkeypatch):
    """On CUDA an op row's time is do_bench's: pytest-benchmark's rounds there were thrown away (10 more runs per case
    in a time-limited session), and their minimum was recorded next to do_bench's median as if one timer gave both."""
    from benchmarks import common
    from benchmarks.common import measure

    class FakeBenchmark:
        def __init__(self):
            self.extra_info, self.calls = {}, []

        def pedantic(self, target, rounds, warmup_rounds, iterations):
            self.calls.append((rounds, warmup_rounds))
            for _ in range(rounds + warmup_rounds):
                target()

    monkeypatch.setattr(bench, "synchronize", lambda device: None)
    monkeypatch.setattr(common, "time_ms", lambda fn, device, grad_to_none=None: 0.25)
    row = FakeBenchmark()
    assert measure(row, lambda: None, torch.device("cuda"), rounds=10, warmup_rounds=2, do_bench=True,
                   memory=False) == 0.25
    assert row.calls == [(1, 1)] and "min_ms" not in row.extra_info
    assert row.extra_info["median_ms"] == 0.25 and row.extra_info["timer"] == "triton.testing.do_bench median"
    cpu_row = FakeBenchmark()
    measure(cpu_row, lambda: None, torch.device("cpu"), rounds=3, warmup_rounds=1, do_bench=True, memory=False)
    assert cpu_row.calls == [(3, 1)] and cpu_row.extra_info["min_ms"] <= cpu_row.extra_info["median_ms"]
    assert cpu_row.extra_info["timer"] == "median of 3 synchronized rounds"


_calls = {"n": 0}


def _counts_its_calls(x):  # traced, it reads the count as a constant: every call fails the last trace's guard
    _calls["n"] += 1
    return x + 1


@pytest.mark.parametrize("retraces", [False, True])
def test_row_fails_when_its_rounds_recompile(retraces):
    """A compiled variant whose guards fail on every call times recompiles (and, past dynamo's recompile limit, an
    uncompiled model): the row fails instead of reporting those times. One that traced once is timed."""
    from benchmarks.common import measure

    class FakeBenchmark:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, target, rounds, warmup_rounds, iterations):
            for _ in range(rounds + warmup_rounds):
                target()

    torch._dynamo.reset()
    compiled = torch.compile(_counts_its_calls if retraces else (lambda x: x + 1), backend="eager")
    x = torch.ones(3)
    compiled(x)  # the first trace, as first_run_or_skip does before a row is timed
    row = FakeBenchmark()
    run = lambda: measure(row, lambda: compiled(x), torch.device("cpu"), rounds=3, memory=False)  # noqa: E731
    if retraces:
        with pytest.raises(pytest.fail.Exception, match="traced 3 new graph"):
            run()
    else:
        assert run() >= 0 and row.extra_info["timer"] == "median of 3 synchronized rounds"


def test_profile_train_counts_host_time_and_restores_ops():
    """benchmarks/profile_train's host accounting: with ``--mock-kernels`` a fused MAE step runs the real wrappers on
    the CPU, every attention call and backward is counted once and every kernel launch reaches the mock (none runs
    the eager path or the interpreter); ``hiera_fast.ops`` is itself again afterwards."""
    from benchmarks import profile_train

    from helpers import tiny_mae_config
    from hiera_fast import model as H
    from hiera_fast.ops import routing

    places = [(profile_train._owner(m, c), name) for spots in profile_train.TIMED_OPS.values() for m, c, name in spots]
    before = [getattr(owner, name) for owner, name in places]
    kernels = (routing.attention_fwd, routing.attention_bwd, routing.max_pool, routing.device_backend)
    mae = H.HieraForPreTraining(tiny_mae_config(), fused=True)
    blocks = sum(isinstance(m, H.HieraMaskUnitAttention) for m in mae.modules())
    layers = [m for m in mae.modules() if isinstance(m, H.HieraLayer)]
    pool_calls = sum(layer.dim != layer.dim_out for layer in layers)  # a stride-1 one returns its input: no kernel
    pools = sum(layer.dim != layer.dim_out and layer.query_stride > 1 for layer in layers)
    assert pool_calls > pools > 0
    x = torch.randn(2, 3, *mae.config.image_size)
    totals: dict = {}
    ops.kernel_launches.clear()
    with profile_train.mocked_kernels(), profile_train.timed_ops(totals):
        mae(x).loss.backward()
    labels = list(profile_train.TIMED_OPS)
    assert {label: calls for label, (calls, _) in totals.items()} == {
        labels[0]: blocks, labels[1]: pool_calls, labels[2]: blocks, labels[3]: pools, labels[4]: 2 * blocks + 2 * pools}
    assert ops.kernel_launches["mask_unit_attention_fwd"] == blocks
    assert all(seconds > 0 for _, seconds in totals.values())
    assert [getattr(owner, name) for owner, name in places] == before
    assert (routing.attention_fwd, routing.attention_bwd, routing.max_pool, routing.device_backend) == kernels


def test_compiled_peer_rows_run_in_the_smoke_suite(tmp_path):
    """The compiled peers' rows (timm / transformers / ViT-B / hiera-optim's graph-safe mode, our fused=False model)
    run end to end in the model and training suites at toy sizes on this device (``--bench-smoke``: on a CPU dynamo
    traces them with its "eager" backend) and land in the JSON."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "smoke.json"
    rows = "timm+cudagraphs or vit+compile or transformers+compile or eager+cudagraphs or hiera-optim+cudagraphs"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--bench-smoke",
                           "benchmarks/test_bench_models.py", "benchmarks/test_bench_train.py", "-k", rows,
                           f"--benchmark-json={out}"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    impls = {b["extra_info"]["impl"] for b in json.loads(out.read_text())["benchmarks"]}
    expected = {"timm+cudagraphs", "vit+compile", "transformers+compile", "eager+cudagraphs"}
    if peers.importlib.util.find_spec("hiera_optim") is not None:
        expected.add("hiera-optim+cudagraphs")
    assert expected <= impls, (impls, proc.stdout[-2000:])


@pytest.mark.parametrize("name, kind", [
    ("_mask_unit_attn_fwd_kernel", "attention"), ("flash_fwd_kernel", "attention"), ("fmha_cutlassF_bf16", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"), ("triton_tem_fused_addmm_0", "gemm"), ("aten::addmm", "gemm"),
    ("cutlass_80_tensorop_bf16_s16816gemm", "gemm"), ("triton_poi_fused_add_gelu_1", "norm/elementwise"),
    ("triton_red_fused_native_layer_norm_2", "norm/elementwise"), ("multi_tensor_apply_kernel", "optimizer"),
    ("cudnn::conv2d_fprop", "conv"), ("aten::copy_", "copy"), ("unknown_kernel_x", "other")])
def test_profile_kinds_from_kernel_names(name, kind):
    from benchmarks.profile_gpu import kind_of

    assert kind_of(name) == kind


def test_profile_runs_on_a_cpu(tmp_path, capsys):
    """benchmarks/profile_gpu's code path on a CPU (CPU self time by aten op, an eager run split by stage): the
    markdown table beside the roofline and the file it writes."""
    from benchmarks import profile_gpu

    assert profile_gpu.main(["--model", "hiera_tiny_224", "--batch", "1", "--impl", "eager", "--device", "cpu",
                             "--steps", "1", "--out", str(tmp_path), "--no-plot"]) == 0
    text = (tmp_path / "profile.md").read_text()
    assert "| gemm |" in text and "roofline floor" in text and "forward by stage" in text and "| stage3 |" in text
