"""What ``hiera-fast bench`` needs: our model's variants, timed steps, peak memory, the rows' environment.

An implementation is named ``base[+mode]``: ``base`` is ``eager`` (``fused=False``) or ``fused`` here (the benchmark
suites add the peers: ``benchmarks/peers.py``), ``mode`` a ``torch.compile`` mode (:data:`COMPILE_MODES`:
``compile`` is the default mode, ``cudagraphs`` ``mode="reduce-overhead"``, ``max-autotune``,
``max-autotune-no-cudagraphs``), e.g. ``fused+cudagraphs``. Every variant of a preset starts from the same seeded
weights (:func:`reference_model`).

Timing: :func:`time_iterations` records a pair of CUDA events around each iteration (a progress bar can tick) and
reads them after one synchronize; on a CPU ``time.perf_counter``. Peak memory is read in a separate run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, ops
from .config import PRESETS, HieraConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

# suffix -> torch.compile mode ("reduce-overhead" captures forward and backward in CUDA graphs)
COMPILE_MODES = {"compile": "default", "cudagraphs": "reduce-overhead", "max-autotune": "max-autotune",
                 "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}
OUR_BASES = ("eager", "fused")
MODEL_IMPLS = ("eager", "fused", "fused+compile", "fused+cudagraphs")  # what `hiera-fast bench` times


def split_impl(impl: str) -> tuple[str, str | None]:
    """``"timm+max-autotune"`` -> ``("timm", "max-autotune")``; ``"fused"`` -> ``("fused", None)``."""
    base, plus, mode = impl.partition("+")
    if plus and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r} in {impl!r}; choose from {', '.join(COMPILE_MODES)}")
    return base, (mode or None)


def uses_cuda_graphs(impl: str) -> bool:
    """Whether ``impl`` is compiled with CUDA graphs (``mode="reduce-overhead"`` or ``"max-autotune"``): its replays
    allocate from the graphs' pool, so its peak memory is read on the first run."""
    mode = split_impl(impl)[1]
    return mode is not None and COMPILE_MODES[mode] in ("reduce-overhead", "max-autotune")


def is_compiled(impl: str) -> bool:
    return split_impl(impl)[1] is not None


# ---------------------------------------------------------------------------------------------- dtypes, devices
def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``fp16``/``bf16`` (or ``float32``, ``half``, ``bfloat16``) → torch dtype; ValueError otherwise."""
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine() or 'unknown'}, {os.cpu_count()} cores)"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def environment(device: torch.device | str) -> dict:
    """What every result row records: device, versions, date."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "hiera_fast": __version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], object], device: torch.device | str, *, iters: int, warmup: int,
                    on_step: Callable[[], None] | None = None,
                    grad_to_none: Sequence[torch.Tensor] | None = None) -> list[float]:
    """Milliseconds of each of ``iters`` runs after ``warmup`` runs; ``on_step()`` after every run (progress bars).

    CUDA: a pair of events around each run, read after one synchronize at the end (the host runs ahead, as in a
    real loop). CPU: ``perf_counter``.
    """
    device = torch.device(device)

    def clear():
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(warmup):
        clear()
        fn()
        if on_step:
            on_step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            clear()
            start.record()
            fn()
            end.record()
            if on_step:
                on_step()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        clear()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if on_step:
            on_step()
    return times


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated by torch on ``device`` during one run of ``fn`` (weights included); None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ---------------------------------------------------------------------------------------------- models
class Unavailable(Exception):
    """A variant that cannot run here; the message says why (a skip reason)."""


def preset_config(name: str) -> HieraConfig:
    """``HieraConfig.from_preset`` with a one-line error naming the close matches."""
    try:
        return HieraConfig.from_preset(name)
    except ValueError:
        import difflib

        key = name.removeprefix("facebook/").replace("-", "_")
        close = difflib.get_close_matches(key, PRESETS, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose from {', '.join(sorted(PRESETS))}") from None


def preset_key(name: str) -> str:
    return name.removeprefix("facebook/").replace("-", "_")


def is_mae(name: str) -> bool:
    return preset_key(name).startswith("mae_")


def item_unit(config: HieraConfig) -> str:
    return "clips/s" if config.spatial_dims == 3 else "images/s"


def _our_class(name: str):
    from .model import HieraForImageClassification, HieraForPreTraining

    return HieraForPreTraining if is_mae(name) else HieraForImageClassification


@functools.lru_cache(maxsize=1)
def reference_model(name: str, seed: int = 0) -> nn.Module:
    """Our model of preset ``name`` with seeded random weights, fp32 on the CPU: every variant of a benchmark starts
    from these weights (ours by copy, the peers through the checkpoint key maps), so all run the same model. Cached
    (one preset at a time)."""
    config = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _our_class(name)(config).eval()


def reference_state(name: str) -> dict[str, torch.Tensor]:
    """:func:`reference_model`'s weights, transformers' names."""
    return {k: v.detach() for k, v in reference_model(preset_key(name)).state_dict().items()}


@dataclass
class Variant:
    """A model ready to time: ``forward(x)`` returns a tensor (logits, or the MAE loss); ``loss(x)`` a scalar.
    ``before_step`` runs before each step outside any captured graph (a static-buffer refresh)."""

    impl: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""
    before_step: Callable[[], None] | None = None


def cross_entropy_on_fixed_labels(num_labels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A classifier's training loss: cross-entropy of fp32 logits against random labels fixed per batch size."""
    labels: dict[tuple, torch.Tensor] = {}

    def loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.device)
        if key not in labels:
            gen = torch.Generator(x.device).manual_seed(0)
            labels[key] = torch.randint(0, num_labels, (x.shape[0],), device=x.device, generator=gen)
        return F.cross_entropy(logits.float(), labels[key])

    return loss


def compiled_variant(impl: str, model: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                     loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, device: torch.device,
                     note: str = "", before_step: Callable[[], None] | None = None,
                     compile_backend: str | None = None) -> Variant:
    """``impl``'s :class:`Variant` of ``model``: ``call(module, x)`` gives its output; under ``impl``'s compile mode
    ``module`` is ``torch.compile(model, mode=...)`` (dynamo's cache reset first: compiles of earlier models count
    towards its recompile limit on shared code, past which it would silently run eager), and each call of a
    CUDA-graph mode starts a new step (``cudagraph_mark_step_begin``: the graphs' outputs of the last one may be
    overwritten). ``loss(output, x)`` makes the training loss of a forward's output (None: the output is it).
    ``compile_backend`` replaces the mode's backend (the suites' CPU smoke runs trace with "eager": no code is
    generated, and there are no CUDA graphs)."""
    mode = split_impl(impl)[1]
    module = model
    if mode is not None:
        torch._dynamo.reset()
        kwargs = {"backend": compile_backend} if compile_backend else {"mode": COMPILE_MODES[mode]}
        module = torch.compile(model, **kwargs)
    graphs = uses_cuda_graphs(impl) and not compile_backend

    def forward(x):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return call(module, x)

    if graphs and device.type == "cuda":
        note = "; ".join(filter(None, [note, f"torch.compile(mode={COMPILE_MODES[mode]!r}): CUDA graphs"]))
    step_loss = forward if loss is None else (lambda x: loss(forward(x), x))
    return Variant(impl, model, forward, step_loss, note, before_step)


def build_variant(name: str, impl: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
                  train: bool = False, compile_backend: str | None = None) -> Variant:
    """Our model of preset ``name`` as ``impl`` (``eager`` or ``fused``, optionally ``+mode``) on ``device`` with
    the weights of :func:`reference_model`. ``dtype`` casts the weights (inference); None keeps fp32 (training under
    autocast). Raises :class:`Unavailable` when the variant cannot run here (``fused`` where the kernels cannot)."""
    device = torch.device(device)
    base, _ = split_impl(impl)
    if base not in OUR_BASES:
        raise ValueError(f"unknown implementation {impl!r}: ours are {' / '.join(OUR_BASES)} (+ a compile mode: "
                         f"{', '.join(COMPILE_MODES)}); the benchmark suites add the peers (benchmarks/peers.py)")
    fused = base == "fused"
    if fused:
        backend, reason = ops.routing.device_backend(device)
        if backend == "eager":
            raise Unavailable(f"fused=True would run the eager path here: {reason}")
    model = copy.deepcopy(reference_model(preset_key(name)))
    model.fused = fused
    model = model.to(device=device, dtype=dtype).train(train)
    mae = is_mae(name)

    def call(module, x):
        out = module(x)
        return out.loss if mae else out.logits

    loss = None if mae else cross_entropy_on_fixed_labels(model.config.num_labels)
    return compiled_variant(impl, model, call, loss, device, compile_backend=compile_backend)


def make_input(config: HieraConfig, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> torch.Tensor:
    """Random pixels ``[B, C, *image_size]``."""
    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(batch, config.num_channels, *config.image_size, generator=gen, device=device, dtype=dtype)


def inference_step(variant: Variant, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step():
        if variant.before_step is not None:
            variant.before_step()
        with torch.no_grad():
            return variant.forward(x)

    return step


def train_step(variant: Variant, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """forward + backward + AdamW step, under autocast to ``dtype`` (no autocast for fp32)."""
    device = x.device
    params = [p for p in variant.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = dtype != torch.float32

    def step():
        if variant.before_step is not None:
            variant.before_step()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = variant.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def free_memory() -> None:
    """Drop compiled graphs, collect garbage and give cached CUDA memory back (call after dropping a variant).

    ``torch._dynamo.reset()`` comes first: dynamo's cache keeps a compiled model's graphs alive after the model is
    dropped, and with them a ``mode="reduce-overhead"`` model's CUDA-graph trees and memory pool, which
    ``empty_cache`` cannot free (the next variant would run, and have its peak memory read, beside them)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the command
def _fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    """``hiera-fast bench``: a table (or ``--json`` rows) of images/s and peak memory per variant."""
    from .cli import PROG, UsageError, device_for_run, parse_dtypes, preset_name

    device = device_for_run()
    cuda = device.type == "cuda"
    name = preset_name(args.model)
    config = preset_config(name)
    notes = []
    for flag, what in (("compile", "torch.compile"), ("cudagraphs", "torch.compile(mode='reduce-overhead')")):
        if getattr(args, flag) and not cuda:
            raise UsageError(f"--{flag} benchmarks the fused model under {what}, which needs CUDA (no CUDA device "
                             "here)")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.iters < 1 or args.warmup < 0:
        raise UsageError("--iters must be >= 1 and --warmup >= 0")
    dtype = parse_dtypes(args.dtype or ("bf16" if cuda else "fp32"))
    if len(dtype) != 1:
        raise UsageError("bench takes one --dtype")
    dtype = dtype[0]
    batch = args.batch or (64 if cuda else 1)
    impls = ["eager"]
    if cuda:
        impls += ["fused"] + ["fused+compile"] * args.compile + ["fused+cudagraphs"] * args.cudagraphs
    else:
        notes.append("no CUDA device: no fused variant is timed, only the eager model; fused numbers need CUDA (on a "
                     "CPU the Triton kernels run only under Triton's interpreter, which is far too slow to time)")
        if args.dtype is None:
            notes.append("float32 on the CPU (bf16 there is slow and is not what the kernels target); pass --dtype to "
                         "change")
        elif dtype != torch.float32:
            notes.append(f"{dtype_name(dtype)} on a CPU is slow; these numbers say little about a GPU")
    mode = "train" if args.train else "inference"
    unit = item_unit(config)
    env = environment(device)
    x = make_input(config, batch, device, torch.float32 if args.train else dtype)
    if not args.json:
        how = " (forward + backward + AdamW" + (", autocast)" if dtype != torch.float32 else ")")
        print(f"{PROG} bench: {name}, batch {batch}, {dtype_name(dtype)}, {mode}"
              f"{how if args.train else ''}, on {env['device']} "
              f"(torch {env['torch']}, triton {env['triton']})")
        for note in notes:
            print(f"note: {note}")
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    rows = []
    for impl in impls:
        row = {"model": name, "variant": impl, "mode": mode, "batch": batch, "dtype": dtype_name(dtype),
               "shape": list(x.shape), **env}
        warmup = max(args.warmup, 2) if is_compiled(impl) else args.warmup  # the first call compiles
        graphs = uses_cuda_graphs(impl)  # peak memory from the first run: replays allocate from the graphs' pool
        try:
            variant = build_variant(name, impl, device, None if args.train else dtype, train=args.train)
            step = train_step(variant, x, dtype) if args.train else inference_step(variant, x)
            first_peak = peak_memory(step, device) if graphs else None  # the compiling call, before timing
            with _progress(warmup + args.iters, impl, enabled=not args.no_progress) as bar:
                times = time_iterations(step, device, iters=args.iters, warmup=warmup,
                                              on_step=(lambda: bar.update(1)) if bar is not None else None)
            ms = statistics.median(times)
            row.update(ms_per_iter=ms, ms_min=min(times), ms_max=max(times), iters=len(times),
                       items_per_s=batch / (ms * 1e-3), unit=unit,
                       peak_memory_bytes=first_peak if graphs else peak_memory(step, device),
                       note=variant.note)
            del variant, step
        except Unavailable as err:
            row.update(skipped=str(err))
        except torch.OutOfMemoryError:
            row.update(error=f"out of memory at batch {batch}")
        free_memory()
        rows.append(row)
    eager = next((r for r in rows if r["variant"] == "eager" and "ms_per_iter" in r), None)
    for r in rows:
        if eager and "ms_per_iter" in r:
            r["speedup_vs_eager"] = eager["ms_per_iter"] / r["ms_per_iter"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print()
    header = f"{'variant':<14} {'ms/iter':>9} {unit:>11} {'vs eager':>9} {'peak mem':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "ms_per_iter" not in r:
            print(f"{r['variant']:<14} {'-':>9} {'-':>11} {'-':>9} {'-':>10}  ({r.get('skipped') or r.get('error')})")
            continue
        mem = r["peak_memory_bytes"]
        mem = f"{mem / 2**30:.2f} GiB" if mem is not None else "n/a"
        print(f"{r['variant']:<14} {r['ms_per_iter']:>9.2f} {_fmt_rate(r['items_per_s']):>11} "
              f"{r.get('speedup_vs_eager', 1.0):>8.2f}x {mem:>10}" + (f"  ({r['note']})" if r.get("note") else ""))
    print(f"\nmedian of {args.iters} iterations after {args.warmup} warm-up; "
          + ("CUDA-event timing, peak memory = torch.cuda.max_memory_allocated over one more iteration"
             if cuda else "perf_counter timing; no peak memory on a CPU"))
    return 0


