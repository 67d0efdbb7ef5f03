"""Where the time of one MAE training step goes: eager vs fused, host vs GPU. Prints three tables; writes nothing.

1. **Interleaved steps.** The implementations' steps alternate, a few at a time, for several rounds, so a host that
   speeds up or slows down during the run moves them all alike (the benchmark suites time one implementation after
   the other, and eager-mode steps at batch 128 are bound by the host). Per implementation: the median wall time per
   step, images/s, and the median *host* time per step (how long ``step()`` takes to return after a synchronize:
   Python, dispatch and launches, when the GPU keeps up).
2. **Host time inside** :mod:`hiera_fast.ops` per step: the attention and max-pool calls of the forward, the fused
   backward bodies, and the Triton launchers inside them (:data:`TIMED_OPS`). A number far above the others' sum
   would point at a host sync.
3. **torch.profiler**: the GPU's busy time per step (the sum of kernel times), the GPU ops per step, and the top ops
   by GPU and by CPU time.

A step whose wall time is far above its GPU busy time is bound by the host, not by the kernels.

    python -m benchmarks.profile_train [--name mae_hiera_base_224] [--batch 128] [--impl eager fused fused/triton]

``fused/triton`` runs global attention by our Triton kernel too (``ops.set_global_attention("triton")``).
``--device cpu --mock-kernels`` measures the host cost of the fused path on a CPU: the Triton kernels are replaced
by zero-filled outputs of the right shapes (the losses are meaningless, the Python and dispatch work is the real
code's); Triton's launcher is not in it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from hiera_fast import bench, ops
from hiera_fast.ops import routing

# where part 2 measures host time: (label, object, attribute), looked up when the timer is installed (so under
# --mock-kernels the launchers are the mocks). The model calls its blocks' MaskUnitAttention ops and
# ``ops.unrolled_max_pool``; the autograd Functions call the backward bodies; the bodies call the launchers.
TIMED_OPS = {
    "attention calls (forward; eager or fused)": [("attention", "MaskUnitAttention", "__call__")],
    "max-pool calls (forward; eager or fused)": [("ops", None, "unrolled_max_pool")],
    "fused attention backward bodies": [("attention", None, "_backward")],
    "fused max-pool backward bodies": [("pool", None, "_backward")],
    "  of these: Triton launches": [("attention_fwd", None, "mask_unit_attention_forward"),
                                    ("attention_bwd", None, "mask_unit_attention_backward"),
                                    ("max_pool", None, "unrolled_max_pool_forward"),
                                    ("max_pool", None, "unrolled_max_pool_backward")],
}


def _owner(module: str, cls: str | None):
    """The object holding a timed attribute: a hiera_fast.ops module, a class in one, or a kernel module (as
    ``hiera_fast.ops.routing`` holds it: the real one, or the mock)."""
    owners = {"ops": ops, "attention": ops.attention, "pool": ops.pool, "attention_fwd": routing.attention_fwd,
              "attention_bwd": routing.attention_bwd, "max_pool": routing.max_pool}
    owner = owners[module]
    return getattr(owner, cls) if cls else owner


@contextlib.contextmanager
def timed_ops(totals: dict[str, list[float]]) -> Iterator[None]:
    """Wrap every place of :data:`TIMED_OPS` so each call adds ``[calls, seconds]`` to ``totals[label]``; restored on
    exit."""
    saved = []

    def timed(label: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = totals.setdefault(label, [0, 0.0])
                total[0] += 1
                total[1] += time.perf_counter() - start

        return wrapper

    for label, places in TIMED_OPS.items():
        for module, cls, name in places:
            owner = _owner(module, cls)
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, timed(label, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


class _MockKernels:
    """The launchers of ``hiera_fast.kernels`` returning zero-filled outputs of the right shapes (the custom ops'
    fake implementations; the forward's ``return_lse`` is the fake's ``with_lse``, and without it the launcher returns
    ``out`` alone)."""

    @staticmethod
    def mask_unit_attention_forward(qkv, num_heads, q_stride, num_windows, *, return_lse=False):
        out, lse = ops.attention._attention_fwd_fake(qkv, num_heads, q_stride, num_windows, return_lse)
        return (out.zero_(), lse.zero_()) if return_lse else out.zero_()

    @staticmethod
    def mask_unit_attention_backward(grad_out, qkv, out, lse, num_heads, q_stride, num_windows):
        return ops.attention._attention_bwd_fake(grad_out, qkv, out, lse, num_heads, q_stride, num_windows).zero_()

    @staticmethod
    def unrolled_max_pool_forward(x, stride):
        return ops.pool._pool_fwd_fake(x, stride).zero_()

    @staticmethod
    def unrolled_max_pool_backward(grad_out, x, stride):
        return ops.pool._pool_bwd_fake(grad_out, x, stride).zero_()


@contextlib.contextmanager
def mocked_kernels() -> Iterator[None]:
    """``--mock-kernels``: ``fused=True`` on the CPU takes the kernel route with :class:`_MockKernels` as the kernel
    modules (every other line of the fused path is the real one); the routes decided so far are forgotten before
    and after."""
    names = ("attention_fwd", "attention_bwd", "max_pool", "device_backend")
    saved = {name: getattr(routing, name) for name in names}
    routing.clear_routes()
    for name in names[:3]:
        setattr(routing, name, _MockKernels)
    routing.device_backend = lambda device: ("triton", "mocked kernels (benchmarks.profile_train --mock-kernels)")
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(routing, name, value)
        routing.clear_routes()


def _impl_and_global(spec: str) -> tuple[str, str]:
    impl, _, global_attention = spec.partition("/")  # "fused/triton": global attention by our Triton kernel
    return impl, global_attention or "sdpa"


def run(name: str, specs: list[str], batch: int, device: torch.device, rounds: int, per_round: int,
        rows: int) -> None:
    config = bench.preset_config(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = bench.make_input(config, batch, device)
    steps = {}  # spec -> (global attention backend, step)
    for spec in specs:
        impl, global_attention = _impl_and_global(spec)
        variant = bench.build_variant(name, impl, device, None, train=True)
        step = bench.train_step(variant, x, dtype)
        with ops.global_attention(global_attention):
            for _ in range(3):  # warm-up: Triton compiles, cuDNN/cuBLAS pick kernels, the allocator fills
                step()
        steps[spec] = global_attention, step
    bench.synchronize(device)

    wall: dict[str, list[float]] = collections.defaultdict(list)
    host: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for spec, (global_attention, step) in steps.items():
            with ops.global_attention(global_attention):
                start = time.perf_counter()
                for _ in range(per_round):
                    step()
                bench.synchronize(device)
                wall[spec].append((time.perf_counter() - start) * 1e3 / per_round)
                start = time.perf_counter()
                step()  # one step's host time: it returns once enqueued, while the GPU may still run it
                host[spec].append((time.perf_counter() - start) * 1e3)
                bench.synchronize(device)
    print(f"\n##### {name} batch {batch}, {device}, {rounds} rounds of {per_round} steps per implementation, "
          f"interleaved", flush=True)
    print(f"{'implementation':16} {'wall ms/step':>14} {'(min-max)':>14} {'images/s':>10} {'host ms/step':>13}")
    for spec in steps:
        median = statistics.median(wall[spec])
        print(f"{spec:16} {median:14.1f} {f'{min(wall[spec]):.1f}-{max(wall[spec]):.1f}':>14} "
              f"{batch / median * 1e3:10.0f} {statistics.median(host[spec]):13.1f}")

    for spec, (global_attention, step) in steps.items():
        with ops.global_attention(global_attention):
            totals: dict[str, list[float]] = {}
            with timed_ops(totals):
                for _ in range(per_round):
                    step()
            bench.synchronize(device)
            print(f"\n##### host time inside hiera_fast.ops, {spec}, per step (mean of {per_round})")
            for label in TIMED_OPS:
                calls, seconds = totals.get(label, (0, 0.0))
                print(f"{label:44} {calls / per_round:6.0f} calls {seconds * 1e3 / per_round:8.2f} ms")

            with profile(activities=[ProfilerActivity.CPU]
                         + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
                for _ in range(2):
                    step()
                bench.synchronize(device)
        events = prof.key_averages()
        if device.type == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.device_time for e in kernels) / 1e3 / 2
            print(f"\n##### torch.profiler, {spec}: GPU busy {gpu_ms:.1f} ms/step, {len(kernels) // 2} GPU ops/step",
                  flush=True)
            print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
        else:
            print(f"\n##### torch.profiler, {spec} (CPU)", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mae_hiera_base_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--impl", nargs="+", default=["eager", "fused"])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (part 1)")
    parser.add_argument("--steps-per-round", type=int, default=5, help="steps per round (part 1), and steps of part 2")
    parser.add_argument("--rows", type=int, default=15, help="rows per torch.profiler table")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mock-kernels", action="store_true",
                        help="CPU only: fused=True runs its real wrappers with zero-filled outputs as the kernels")
    args = parser.parse_args()
    device = torch.device(args.device)
    if min(args.rounds, args.steps_per_round, args.batch) < 1:
        parser.error("--rounds, --steps-per-round and --batch must be positive")
    if args.mock_kernels and device.type != "cpu":
        parser.error("--mock-kernels is for --device cpu (on a GPU the real kernels run)")
    for spec in args.impl:
        impl, global_attention = _impl_and_global(spec)
        if impl not in ("eager", "fused") or global_attention not in ops.GLOBAL_ATTENTION_BACKENDS:
            parser.error(f"--impl {spec!r}: expected eager or fused, optionally with /sdpa or /triton")
    with mocked_kernels() if args.mock_kernels else contextlib.nullcontext():
        run(args.name, args.impl, args.batch, device, args.rounds, args.steps_per_round, args.rows)


if __name__ == "__main__":
    main()
