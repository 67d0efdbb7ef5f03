"""Where the GPU time of the fastest variants goes, kind by kind, beside the roofline's floor of the same kind.

    python -m benchmarks.profile_gpu --model hiera_base_224 --batch 256 --impl fused+cudagraphs timm+cudagraphs
    python -m benchmarks.profile_gpu --model mae_hiera_base_224 --batch 128 --train --impl fused+cudagraphs \\
        hiera-optim+cudagraphs --out benchmarks/results/<dir>

For each implementation (``benchmarks/peers.py``: ours or a peer, compiled or not): compile and warm up, then
``torch.profiler`` over a few steps. Every GPU kernel is put in a kind by its name (:func:`kind_of`: attention,
gemm, conv, norm/elementwise, copy, optimizer, other) and its time summed per image; beside it the floor of that
kind from ``benchmarks.roofline`` (the plain column, and the floor if norms and activations were fused into their
GEMMs), and the step's MFU: the model's FLOPs (roofline, = ``torch.utils.flop_counter``) per second over the GPU's
GEMM rate. For an eager (not compiled) ``fused`` run the forward's kernels are also split by stage (a
``record_function`` range per encoder stage). CUDA graphs hide the Python side, not the kernels: the profiler sees
every kernel a replay launches.

Prints markdown; with ``--out DIR`` also writes ``NAME.md`` (``--name``, default ``profile``; and ``NAME.png`` with
matplotlib unless ``--no-plot``). On a CPU
(``--device cpu``, a smoke run) the CPU self time of the aten ops is classified instead, by their names.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import roofline
from benchmarks.peers import build_variant
from hiera_fast import bench

KINDS = ("attention", "gemm", "conv", "norm/elementwise", "copy", "optimizer", "other")
# name patterns, first match wins: CUDA kernel names (cuBLAS / CUTLASS / cuDNN / FlashAttention / inductor's Triton
# kernels / ours) and, on a CPU, aten op names
_PATTERNS = (
    ("attention", r"mask_unit_attn|window_attn|flash|fmha|attention|sdpa|_efficient_attention|attn"),
    ("optimizer", r"multi_tensor|adam|foreach|_fused_adam"),
    ("conv", r"conv|implicit_gemm|dgrad|wgrad"),
    ("gemm", r"gemm|xmma|cutlass|cublas|sm\d\d_|ampere_|hopper_|triton_tem|\bmm\b|addmm|bmm|matmul|linear"),
    ("copy", r"copy|memcpy|memset|cat|gather|scatter|index|clone|_to_copy|fill|zero"),
    ("norm/elementwise", r"triton_poi|triton_red|triton_per|elementwise|reduce|norm|gelu|add|mul|max|sum|mean"
                         r"|div|sub|pow|sqrt|exp|where|softmax"),
)


def kind_of(name: str) -> str:
    """The kind of a GPU kernel (or, on a CPU, an aten op) by its name; "other" if no pattern matches."""
    lowered = name.lower()
    return next((kind for kind, pattern in _PATTERNS if re.search(pattern, lowered)), "other")


@contextlib.contextmanager
def stage_ranges(model: torch.nn.Module):
    """A ``record_function`` range around each encoder stage's forward (``stage1``.. by position)."""
    stages = [m for name, m in model.named_modules() if re.fullmatch(r"(.*\.)?encoder\.stages\.\d+", name)]
    opened, hooks = [], []
    for i, stage in enumerate(stages):
        hooks.append(stage.register_forward_pre_hook(
            lambda m, a, i=i: opened.append(record_function(f"stage{i + 1}").__enter__())))
        hooks.append(stage.register_forward_hook(lambda m, a, o: opened.pop().__exit__(None, None, None)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _stage_of(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if re.fullmatch(r"stage\d", parent.name):
            return parent.name
        parent = parent.cpu_parent
    return None


def profile_impl(name: str, impl: str, batch: int, device: torch.device, train: bool, steps: int) -> dict:
    """``{"kinds": {kind: µs per image}, "stages": {stage: {kind: µs per image}}, "step_ms", "kernels"}``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = bench.preset_config(name)
    backend = None if device.type == "cuda" else "eager"
    variant = build_variant(name, impl, device, None if train else dtype, train=train, compile_backend=backend)
    x = bench.make_input(config, batch, device, torch.float32 if train else dtype)
    step = bench.train_step(variant, x, dtype) if train else bench.inference_step(variant, x)
    for _ in range(3):  # compile, capture, warm up
        step()
    bench.synchronize(device)
    by_stage = not bench.is_compiled(impl) and not train
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof, (stage_ranges(variant.model) if by_stage else
                                                  contextlib.nullcontext()):
        for _ in range(steps):
            step()
        bench.synchronize(device)
    kinds: dict[str, float] = collections.defaultdict(float)
    stages: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    kernels = 0
    per_image = 1.0 / (steps * batch)
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time
        else:
            if not event.name.startswith("aten::"):
                continue
            us = event.self_cpu_time_total  # each aten op's own time, without its children's
        kernels += 1
        kind = kind_of(event.name)
        kinds[kind] += us * per_image
        if by_stage:
            stage = _stage_of(event if device.type != "cuda" else (event.cpu_parent or event))
            if stage is not None:
                stages[stage][kind] += us * per_image
    return {"kinds": dict(kinds), "stages": {s: dict(k) for s, k in stages.items()}, "kernels": kernels // steps,
            "gpu_us_per_image": sum(kinds.values())}


def report(name: str, batch: int, train: bool, results: dict[str, dict], gpu: str, device: torch.device) -> str:
    dtype = "bf16" if device.type == "cuda" else "fp32"
    line = roofline.roofline(name, batch, dtype, train=train)
    per_image_us = 1e6 / batch
    floors: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for bucket in line.by_kind(gpu):  # the roofline's loss ops are norms and reductions: counted with those
        kind = "norm/elementwise" if bucket.name == "loss" else bucket.name
        floors[kind][0] += bucket.floor_s * per_image_us
        floors[kind][1] += bucket.floor_fused_s * per_image_us
    flops = line.total_flops / batch
    rate = roofline.GPUS[gpu].rate(torch.bfloat16)
    what = "MAE training step" if train else "inference"
    timer = "GPU kernel time" if device.type == "cuda" else "CPU time of the leaf aten ops (a smoke run)"
    out = [f"### {name}, batch {batch}, {dtype}, {what}: {timer} per image (µs) by kind, beside the {gpu} roofline", ""]
    impls = list(results)
    header = ["kind"] + impls + ["roofline floor", "floor if fused"]
    rows = []
    for kind in KINDS:
        floor, fused = floors.get(kind, (0.0, 0.0))
        rows.append([kind] + [f"{results[i]['kinds'].get(kind, 0.0):.1f}" for i in impls] + [f"{floor:.1f}",
                                                                                             f"{fused:.1f}"])
    total = line.total(gpu)
    rows.append(["**total**"] + [f"**{results[i]['gpu_us_per_image']:.1f}**" for i in impls]
                + [f"{total.floor_s * per_image_us:.1f}", f"{total.floor_fused_s * per_image_us:.1f}"])
    rows.append(["MFU (FLOPs / GPU time / GEMM rate)"]
                + [f"{100 * flops / (results[i]['gpu_us_per_image'] * 1e-6) / rate:.0f} %" if results[i][
                    'gpu_us_per_image'] else "–" for i in impls] + ["", ""])
    out += _table(header, rows)
    for impl, result in results.items():
        if result["stages"]:
            out += ["", f"{impl}, forward by stage (µs per image)", ""]
            stage_rows = [[stage] + [f"{kinds.get(k, 0.0):.1f}" for k in KINDS]
                          for stage, kinds in sorted(result["stages"].items())]
            out += _table(["stage", *KINDS], stage_rows)
    out.append("")
    out.append(f"{flops / 1e9:.2f} GFLOP per image (roofline, = torch.utils.flop_counter); GEMM rate "
               f"{rate / 1e12:.0f} TFLOP/s ({gpu}, measured)")
    return "\n".join(out)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _plot(results: dict[str, dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(results)
    for kind in KINDS:
        values = [r["kinds"].get(kind, 0.0) for r in results.values()]
        ax.bar(list(results), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("µs per image")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hiera_base_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--impl", nargs="+", default=["fused+cudagraphs", "timm+cudagraphs"])
    parser.add_argument("--train", action="store_true", help="a training step (MAE for mae_ presets)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu", default=None, choices=sorted(roofline.GPUS), help="roofline of (default: this GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="a directory for NAME.md (and NAME.png)")
    parser.add_argument("--name", default="profile", help="the files' name in --out (default: profile)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = args.gpu or ("h200" if "H200" in bench.device_name(device) else "h100")
    results = {}
    for impl in args.impl:
        try:
            results[impl] = profile_impl(args.model, impl, args.batch, device, args.train, args.steps)
        except bench.Unavailable as err:
            print(f"{impl}: skipped ({err})")
        bench.free_memory()
    if not results:
        return 1
    text = report(args.model, args.batch, args.train, results, gpu, device)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text(text + "\n")
        if not args.no_plot:
            _plot(results, out / f"{args.name}.png", f"{args.model} b{args.batch}{' train' if args.train else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
