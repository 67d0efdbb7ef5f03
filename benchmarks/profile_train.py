"""Where the time of one MAE training step goes, on a CUDA GPU: wall time per step, the GPU's busy time (the sum of
kernel times), the number of kernel launches, and the top CPU-side and GPU-side ops of ``torch.profiler``.

A step whose wall time is far above its GPU busy time is bound by the host (Python, dispatch, launches), not by the
kernels. Prints tables; writes nothing.

    python -m benchmarks.profile_train [--name mae_hiera_base_224] [--batch 128] [--impl eager fused fused/triton]

``fused/triton`` runs global attention by our Triton kernel too (``ops.set_global_attention("triton")``).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hiera_fast import bench, ops


def profile_step(name: str, impl: str, batch: int, rows: int, device: str = "cuda") -> None:
    """Run and print one profile; ``impl`` as in ``bench.build_variant``, with global attention as set now."""
    config = bench.preset_config(name)
    device = torch.device(device)

    def sync():
        bench.synchronize(device)

    variant = bench.build_variant(name, impl, device, None, train=True)
    x = bench.make_input(config, batch, device)
    step = bench.train_step(variant, x, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for _ in range(3):
        step()
    sync()
    steps = 10
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    start = time.perf_counter()
    step()  # host time to enqueue one step (the GPU may still be busy with it)
    host_ms = (time.perf_counter() - start) * 1e3
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        sync()
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / 2
    print(f"\n##### {name} b{batch} {impl} (global attention: {ops._global_attention}): wall {wall_ms:.1f} ms/step, "
          f"host enqueue {host_ms:.1f} ms/step, GPU busy {gpu_ms:.1f} ms/step, {len(kernels) // 2} GPU ops/step", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    del variant, step, x
    bench.free_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="mae_hiera_base_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--impl", nargs="+", default=["eager", "fused"])
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    for impl in args.impl:
        impl, _, global_attention = impl.partition("/")  # "fused/triton": global attention by our Triton kernel too
        with ops.global_attention(global_attention or "sdpa"):
            profile_step(args.name, impl, args.batch, args.rows, args.device)


if __name__ == "__main__":
    main()
