"""What the benchmark suites share: the device a suite runs on (or why it skips), the smoke switch, and one way to
time a case and record it as a row of pytest-benchmark's JSON.

Every row's ``extra_info`` holds the environment (device, torch/triton/CUDA versions, date) and the case (suite,
case, impl, dtype, shape, batch) plus ``median_ms`` and the suite's throughput numbers; ``benchmarks/report.py``
reads only ``extra_info``.

Timing: ops on CUDA use ``triton.testing.do_bench`` (median; warm-up first; L2 flushed) for ``median_ms``, which
includes the host's launch cost where that exceeds the GPU work, and ``triton.testing.do_bench_cudagraph`` for
``graph_ms``, the GPU time alone (L2 not flushed between the captured calls); models, training steps and every CPU
case use the rounds pytest-benchmark runs (each round synchronizes the device), median.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pytest
import torch

from hiera_fast import bench

from benchmarks.peers import is_peer

SMOKE_ENV = "HIERA_FAST_BENCH_SMOKE"
NO_CUDA_REASON = ("needs CUDA (no CUDA device here): run `pytest benchmarks/` on a GPU machine, or add --bench-smoke "
                  "to run this case at toy sizes to exercise its code")


@dataclass(frozen=True)
class Setup:
    device: torch.device
    smoke: bool  # toy sizes: the code paths run, the numbers mean nothing

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compile_backend(self) -> str | None:
        """A smoke run on a CPU traces compiled rows with dynamo's "eager" backend (their code paths, no codegen)."""
        return "eager" if self.smoke and not self.cuda else None


def smoke_requested(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-smoke", default=False)) or os.environ.get(SMOKE_ENV, "0") not in ("", "0")


def gpu_setup(config: pytest.Config) -> Setup:
    """The device of a GPU suite: CUDA, or this device at toy sizes under --bench-smoke; otherwise skip."""
    smoke = smoke_requested(config)
    if torch.cuda.is_available():
        return Setup(torch.device("cuda"), smoke)
    if smoke:
        return Setup(torch.device("cpu"), True)
    pytest.skip(NO_CUDA_REASON)


def first_run_or_skip(step: Callable[[], object], impl: str, batch: int,
                      device: torch.device | None = None) -> int | None:
    """Run ``step`` once (compiles, warms up, allocates optimizer state) before timing. Out of memory is a skip;
    so is a peer implementation that cannot run here (with its reason); our own variants must run.

    Returns the peak bytes torch allocated on a CUDA ``device`` during that run (else None): the memory figure of a
    CUDA-graph variant, whose replays allocate nothing that ``max_memory_allocated`` sees (:func:`graph_memory`).

    A CUDA-graph variant (``mode="reduce-overhead"``) fails if inductor skipped CUDA graphs in that run (it does so
    silently, e.g. for a CPU tensor in the graph): its row would time a graph-less run under a CUDA-graph label."""
    graphs = bench.uses_cuda_graphs(impl)
    skips = cudagraph_skips()
    peak = None
    try:
        if device is not None and device.type == "cuda":
            peak = bench.peak_memory(step, device)  # runs step once, measured
        else:
            step()
    except torch.OutOfMemoryError:
        bench.free_memory()
        pytest.skip(f"{impl} runs out of memory at batch {batch}")
    except Exception as err:
        if not is_peer(impl):
            raise
        pytest.skip(f"{impl} failed to run: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    skipped = cudagraph_skips() - skips
    if graphs and skipped:
        pytest.fail(f"{impl}: inductor skipped CUDA graphs {skipped} time(s) in the warm-up run, so this row would "
                    f"time a run without them; TORCH_LOGS=perf_hints says why")
    return peak


def traced_graphs() -> int:
    """How many graphs dynamo has traced in this process (each compile and recompile adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cudagraph_skips() -> int:
    """How often inductor has chosen not to use CUDA graphs for a ``mode="reduce-overhead"`` graph in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def graph_memory(benchmark, impl: str, first_run_peak: int | None) -> None:
    """A CUDA-graph variant's peak memory is that of its first (warm-up) run: replays reuse the graphs' pool."""
    if bench.uses_cuda_graphs(impl) and first_run_peak is not None:
        benchmark.extra_info["peak_memory_bytes"] = first_run_peak
        benchmark.extra_info["note"] = ((benchmark.extra_info.get("note") or "") +
                                        "; peak memory of the first (warm-up) run: graph replays allocate from the "
                                        "graphs' pool, which torch's counter does not see").lstrip("; ")


def record(benchmark, setup: Setup | None, **info) -> None:
    """Environment + case into the row's ``extra_info``."""
    device = setup.device if setup else torch.device("cpu")
    benchmark.extra_info.update(bench.environment(device))
    benchmark.extra_info["smoke"] = bool(setup and setup.smoke)
    for key, value in info.items():
        if isinstance(value, torch.dtype):
            value = bench.dtype_name(value)
        elif isinstance(value, torch.Size):
            value = list(value)
        benchmark.extra_info[key] = value


_GRAPH_FAILED: dict[str, str] = {}  # graph key -> why its first capture failed (later cases of it skip the capture)


def _root_cause(err: BaseException) -> str:
    """The first error of a chain: a failed CUDA-graph capture raises the capture's own end-of-capture error, with
    the call's real error as its context."""
    while err.__context__ is not None and err.__context__ is not err:
        err = err.__context__
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def measure(benchmark, fn: Callable[[], object], device: torch.device, *, rounds: int, warmup_rounds: int = 1,
            do_bench: bool = False, grad_to_none: Sequence[torch.Tensor] | None = None,
            memory: bool = True, graph: str | None = None) -> float:
    """Run ``fn`` under ``benchmark.pedantic`` (each round synchronized) and return the median ms: of those rounds, or
    of ``triton.testing.do_bench`` when ``do_bench`` and on CUDA (then ``rounds`` is one: do_bench warms up and times
    on its own). Records ``median_ms``, ``timer``, ``min_ms`` (of the rounds, when they give the median) and
    ``peak_memory_bytes`` (CUDA, one extra run) in ``extra_info``.

    With a ``graph`` key (e.g. the implementation's name) on CUDA also records ``graph_ms``: the GPU time alone
    (:func:`time_graph_ms`, runs captured in a CUDA graph, L2 warm), or ``graph_error`` when ``fn``
    cannot be captured. It runs after the other timings. A failed capture keeps its memory pool until the process
    ends (torch frees a graph's pool only after a finished capture), so after one failure the key's later cases
    skip the capture and say so.

    Fails the row when ``torch.compile`` traced a new graph after the first round (a compiled variant whose guards
    fail on every call: its rounds would time recompiles, and past dynamo's recompile limit an uncompiled model)."""
    times: list[float] = []
    graphs: list[int] = []
    use_do_bench = do_bench and device.type == "cuda"
    if use_do_bench:  # do_bench warms up and times on its own: one pedantic round (pytest-benchmark needs a run)
        rounds, warmup_rounds = 1, 1

    def target():
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        bench.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        graphs.append(traced_graphs())

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    timed = times[-rounds:]
    if use_do_bench:
        median = time_ms(fn, device, grad_to_none=grad_to_none)
        benchmark.extra_info["timer"] = "triton.testing.do_bench median"
    else:
        median = statistics.median(timed)
        benchmark.extra_info["timer"] = f"median of {len(timed)} synchronized rounds"
        benchmark.extra_info["min_ms"] = min(timed)
    retraced = traced_graphs() - graphs[0]
    if retraced:
        pytest.fail(f"torch.compile traced {retraced} new graph(s) while this row was timed, after its first round: "
                    f"the rounds timed recompiles (TORCH_LOGS=recompiles says which guard failed)")
    benchmark.extra_info["median_ms"] = median
    if memory:
        benchmark.extra_info["peak_memory_bytes"] = bench.peak_memory(fn, device)
    if graph and device.type == "cuda":
        if graph in _GRAPH_FAILED:
            benchmark.extra_info["graph_error"] = (f"not captured: an earlier {graph} case failed "
                                                   f"({_GRAPH_FAILED[graph]})")
            return median
        try:
            benchmark.extra_info["graph_ms"] = time_graph_ms(fn, device, grad_to_none=grad_to_none)
        except Exception as err:  # noqa: BLE001  (recorded: the row keeps its other numbers)
            _GRAPH_FAILED[graph] = benchmark.extra_info["graph_error"] = _root_cause(err)
            with contextlib.suppress(Exception):  # a broken context shows in the next case, which fails on its own
                bench.synchronize(device)
    return median


# ---------------------------------------------------------------------------------------------- op timers
def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 25, rep: int = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None, cpu_iters: int = 5) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (``warmup``/``rep`` in ms), else the
    median of ``cpu_iters`` ``perf_counter`` runs after one warm-up run."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):  # its events and L2-flush buffer belong to the current device
            return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
    return statistics.median(bench.time_iterations(fn, device, iters=cpu_iters, warmup=1, grad_to_none=grad_to_none))


def time_graph_ms(fn: Callable[[], object], device: torch.device | str, *, rep: int = 20,
                  grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn()`` as GPU time alone: ``triton.testing.do_bench_cudagraph``, which captures many
    runs of ``fn`` in one CUDA graph and times its replays, so the host's cost of launching (Python, dispatch,
    autograd) is not in the number. :func:`time_ms` measures with the launches: when the host is slower than the GPU
    work of a call, that is host time. L2 is not flushed between the captured runs (the op benchmarks size their
    inputs past L2). CUDA only; raises whatever capture raises for an ``fn`` that cannot be captured."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"time_graph_ms needs a CUDA device, got {device}")
    from triton.testing import do_bench_cudagraph

    with torch.cuda.device(device):  # its side stream and graph belong to the current device
        return float(do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
