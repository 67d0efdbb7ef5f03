"""Benchmark suite setup. ``pytest benchmarks/`` (the root pyproject's testpaths is ``tests`` only).

On a machine without CUDA every GPU case skips with its reason and the CPU cases (``test_bench_cpu.py``) run.
``--bench-smoke`` (or ``HIERA_FAST_BENCH_SMOKE=1``) runs the GPU suites on this device at toy sizes, to exercise
their code; on a CPU it sets ``TRITON_INTERPRET=1`` first so the fused cases run the kernels in the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import SMOKE_ENV, Setup, gpu_setup, smoke_requested


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-smoke", action="store_true", default=False,
                     help="hiera-fast: run the GPU benchmark suites at toy sizes on this device (numbers meaningless)")


def pytest_configure(config: pytest.Config) -> None:
    # the kernels read TRITON_INTERPRET when they are defined: set it before any test module imports them
    if smoke_requested(config) and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault(SMOKE_ENV, "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A case that failed, skipped or was interrupted after its timed rounds is not saved: pytest-benchmark writes every
    row whose ``has_error`` is unset, and sets it only for exceptions inside ``pedantic``. A row failed by a check
    after timing (:func:`benchmarks.common.measure` when the rounds recompiled) would otherwise be reported with the
    times it rejected; one interrupted by a step's time limit (gpu_session.sh sends SIGINT) would miss numbers (or,
    cut inside ``pedantic``, have none, which makes pytest-benchmark fail to write the JSON of every finished case),
    and be reported under the wrong timer."""
    outcome = yield
    if outcome.excinfo is not None:
        benchmark = getattr(item, "funcargs", {}).get("benchmark")
        if benchmark is not None:
            benchmark.has_error = True


@pytest.fixture
def gpu(request) -> Setup:
    """The device of a GPU case (skips without CUDA unless --bench-smoke)."""
    return gpu_setup(request.config)
