"""The ``hiera-fast`` command and the benchmark report.

``check`` and ``info`` run in a subprocess whose environment has no ``TRITON_INTERPRET``, so the command's own handling
of it (set before the kernels are imported) is what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiera_fast import bench, check, cli, ops

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "hiera_fast", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_no_arguments_prints_help():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert "usage: hiera-fast" in proc.stdout and "check" in proc.stdout and "bench" in proc.stdout


def test_info():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch {torch.__version__}" in out and "triton" in out
    assert "fused=True on" in out and "kernels: hiera_fast.kernels imported" in out
    if not CUDA:
        assert "fused=True on cpu: eager" in out  # no TRITON_INTERPRET in this environment
        assert "TRITON_INTERPRET=1" in out and "interpreter" in out


def test_check_runs_the_kernels_and_passes():
    args = ["check", "--heads", "cls", "--batch", "1"] + ([] if CUDA else ["--dtype", "fp32"])
    proc = _run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "output fused/eager" in out and "worst grad f/e" in out
    assert "PASS" in out and "FAIL" not in out
    if not CUDA:
        assert "backend: triton-interpreter" in out and "scaled down" in out


@pytest.mark.skipif(ops.fused_backend("cuda" if CUDA else "cpu")[0] == "eager",
                    reason="the kernels cannot run here at all (check stops before its table)")
def test_check_fails_when_fused_falls_back(forced_eager, capsys):
    """A fused model that silently runs the eager path must FAIL (exit 1), from the launch counts."""
    code = cli.main(["check", "--heads", "cls", "--batch", "1", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "did not run for every block" in out and "FAIL" in out


@pytest.mark.skipif(CUDA, reason="the CPU interpreter's version limit")
def test_check_stops_with_the_reason_when_the_kernels_cannot_run(monkeypatch, capsys):
    """An interpreter too old for the kernels: ``check`` says why at once and exits 1, not an InterpreterError."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    code = cli.main(["check", "--heads", "cls", "--batch", "1", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "backend: eager" in out and "FAIL: nothing to check" in out and "triton >= 3.7" in out


def test_judge_rule():
    base = {"dtype": torch.float32, "eager_out": 1e-6, "fused_out": 1e-6,
            "eager_grads": {"w": 1e-6}, "fused_grads": {"w": 1e-6}, "fallbacks": [],
            "launches": {"mask_unit_attention_fwd": 2}, "expected": {"mask_unit_attention_fwd": 2}}
    assert check._judge(dict(base))["ok"]
    assert not check._judge({**base, "fused_out": 1e-3})["ok"]
    assert not check._judge({**base, "fused_grads": {"w": float("nan")}})["ok"]
    assert not check._judge({**base, "launches": {"mask_unit_attention_fwd": 0}})["ok"]


@pytest.mark.skipif(CUDA, reason="the CPU table (eager only)")
def test_bench_cpu_table():
    proc = _run("bench", "--model", "hiera_tiny_224", "--batch", "1", "--iters", "1", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "variant" in out and "images/s" in out and "\neager " in out
    assert "fused numbers need CUDA" in out and "float32" in out


def test_bench_json(capsys):
    args = ["bench", "--model", "hiera_tiny_224", "--batch", "1", "--iters", "1", "--warmup", "0", "--json",
            "--no-progress"] + (["--dtype", "fp32"] if CUDA else [])
    assert cli.main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    eager = next(r for r in rows if r["variant"] == "eager")
    for key in ("ms_per_iter", "items_per_s", "batch", "dtype", "device", "torch", "triton", "date", "shape"):
        assert key in eager, key
    assert eager["batch"] == 1 and eager["shape"] == [1, 3, 224, 224] and eager["items_per_s"] > 0


BAD = [
    (["bench", "--model", "hiera_bse_224"], "unknown model"),
    (["check", "--model", "nope"], "unknown model"),
    (["bench", "--dtype", "fp8"], "unknown dtype"),
    (["check", "--dtype", "int8"], "unknown dtype"),
    (["check", "--heads", "cls,foo"], "unknown head"),
    (["bench", "--batch", "x"], "invalid int"),
    (["bench", "--batch", "0"], "--batch"),
    (["check", "--batch", "0"], "--batch"),
    (["check", "--batch", "-1"], "--batch"),
    (["frobnicate"], "invalid choice"),
    pytest.param(["bench", "--compile"], "needs CUDA", marks=pytest.mark.skipif(CUDA, reason="CPU-only error")),
    pytest.param(["bench", "--cudagraphs"], "needs CUDA", marks=pytest.mark.skipif(CUDA, reason="CPU-only error")),
    pytest.param(["check", "--dtype", "bf16"], "bf16", marks=pytest.mark.skipif(CUDA, reason="CPU-only error")),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_arguments_one_line_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0] and lines[0].startswith("hiera-fast") and "Traceback" not in captured.err
    assert captured.out == ""


def test_console_script_error_exit_code():
    proc = _run("bench", "--model", "nope")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown model" in proc.stderr


def _row(suite, impl, median_ms, **info):
    extra = {"suite": suite, "impl": impl, "median_ms": median_ms, "device": "NVIDIA H100 80GB HBM3",
             "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "hiera_fast": "0.1.0",
             "date": "2026-11-24T10:00:00+00:00", **info}
    return {"group": suite, "name": f"test[{impl}]", "fullname": f"x::test[{impl}]", "params": None,
            "extra_info": extra, "stats": {"median": median_ms / 1e3}}


def test_report_markdown(tmp_path):
    geo = dict(model="hiera_base_224", dtype="bf16", batch=256, calls=2, geometry="stage1.0 3136 mask-unit",
               where="stage1.0", floor_ms=0.206, case="hiera_base_224 stage1.0", **{"pass": "fwd"})
    rows = [_row("op", "fused", 0.25, gb_per_s=2466.0, pct_of_peak=82.2, **geo),
            _row("op", "official-5d", 2.5, gb_per_s=246.6, pct_of_peak=8.2, **geo)]
    model = dict(model="hiera_base_224", case="hiera_base_224 b64", dtype="bf16", batch=64, unit="images/s",
                 mode="inference")
    rows += [_row("model", impl, ms, items_per_s=64 / ms * 1e3, peak_memory_bytes=2**31, **model)
             for impl, ms in (("eager", 40.0), ("fused", 25.0), ("official", 80.0))]
    rows.append(_row("patch", "patched", 30.0, library="timm", library_version="1.0", model="hiera_base_224", batch=64,
                     dtype="bfloat16", unpatched_images_per_s=1000.0, patched_images_per_s=2133.0, speedup=2.133))
    rows.append({"group": "x", "name": "test_other", "fullname": "x", "extra_info": {}, "stats": {"median": 0.01}})
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"benchmarks": rows, "machine_info": {}, "commit_info": {}, "datetime": "x"}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", str(path), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "h100.md").read_text()
    assert "NVIDIA H100" in md and "Attention ops: hiera_base_224, bf16, fwd" in md
    assert "250 (2,466, 82%)" in md and "10.00x" in md  # fused 250 µs, 10x faster than official-5d
    assert "Inference: bf16, inference" in md and "3.20x" in md  # best ours (fused 25 ms) vs official (80 ms)
    assert "Drop-in patch" in md and "2.13x" in md
    assert "test_other" in md
    plot_line = proc.stdout.strip().splitlines()[-1]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "h100.png").exists()
    except ImportError:
        assert "skipped the plot" in plot_line


def test_report_op_tables_per_timer(tmp_path):
    """Op rows with ``graph_ms`` get a GPU-time table first (with the row's bandwidth figures for that time), then
    the do_bench table; a call that could not be captured is listed with its reason."""
    geo = dict(model="hiera_base_224", dtype="bf16", batch=256, calls=2, geometry="stage1.0 3136 mask-unit",
               where="stage1.0", floor_ms=0.206, case="hiera_base_224 stage1.0", bytes=600e6,
               **{"pass": "fwd+bwd"})

    from benchmarks.attention_calls import bandwidth as row_bandwidth

    def bandwidth(ms, prefix=""):  # as test_bench_ops stores them (attention_calls.bandwidth, 600 MB at 3 TB/s)
        return {f"{prefix}{k}": v for k, v in row_bandwidth(600e6, ms, 3.0e12).items()}

    rows = [_row("op", "fused", 0.9, graph_ms=0.3, **bandwidth(0.9), **bandwidth(0.3, "graph_"), **geo),
            _row("op", "eager", 3.0, graph_ms=1.2, **bandwidth(3.0), **bandwidth(1.2, "graph_"), **geo),
            _row("op", "official-5d", 9.0, graph_error="RuntimeError: capture failed", **bandwidth(9.0), **geo)]
    path = tmp_path / "ops.json"
    path.write_text(json.dumps({"benchmarks": rows, "machine_info": {}, "commit_info": {}, "datetime": "x"}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", str(path), "--out", str(tmp_path), "--no-plot"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "ops.md").read_text()
    gpu = md.index("hiera_base_224, bf16, fwd+bwd: GPU time")
    launches = md.index("hiera_base_224, bf16, fwd+bwd: with launches")
    assert gpu < launches
    gpu_table, launch_table = md[gpu:launches], md[launches:]
    assert "300 (2,000, 67%)" in gpu_table and "4.00x" in gpu_table  # eager 1.2 ms vs fused 0.3 ms
    assert "| – |" in gpu_table and "incomplete" in gpu_table  # official-5d has no GPU time
    assert "900 (667, 22%)" in launch_table and "10.00x" in launch_table  # official 9 ms vs fused 0.9 ms
    assert "official-5d, stage1.0 3136 mask-unit: RuntimeError: capture failed" in md
