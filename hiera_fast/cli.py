"""The ``hiera-fast`` command (also ``python -m hiera_fast``).

``info``   versions, the device, and which backend ``fused=True`` uses here and why.
``check``  fused vs reference parity of whole models (output and every parameter gradient), proving from
           ``ops.kernel_launches`` that the Triton kernels ran; exit 0 on PASS, 1 on FAIL. Without CUDA it runs the
           kernels under Triton's interpreter on scaled-down models.
``bench``  throughput of eager vs fused (vs fused + ``torch.compile``, vs the peers) for one model.

Usage errors (unknown model, a GPU-only flag without CUDA, a bad dtype) are one line on stderr and exit code 2, as
argparse's own errors are here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import warnings

import torch

PROG = "hiera-fast"
# a relative error floor per dtype for the 2x rule (STYLE.md: ours vs a float64 reference <= 2x PyTorch's own error)
_ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
_CPU_SCALE = dict(image=(64, 64), video=(4, 64, 64), depths=(1, 2, 2, 1))


class UsageError(Exception):
    """A bad command line that argparse cannot see (unknown model, GPU-only flag without CUDA, ...): exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _device() -> torch.device:
    return torch.device("cuda" if _has_cuda() else "cpu")


def _dtypes(text: str) -> list[torch.dtype]:
    from .bench import parse_dtype

    try:
        return [parse_dtype(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise UsageError(str(err)) from None


def _model_name(name: str) -> str:
    from .bench import preset_config, preset_key

    try:
        preset_config(name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return preset_key(name)


def _fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


def _fmt_err(x: float) -> str:
    return "nan" if x != x else f"{x:.1e}"


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from . import PRESETS, __version__, ops
    from .bench import _triton_version, device_name

    print(f"hiera-fast {__version__}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {_triton_version() or 'not installed'}")
    device = _device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
              f"CUDA {torch.version.cuda}")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
        print(f"device: {device_name(device)}; no CUDA device ({built})")
    missing, interpreted = ops.routing.KERNELS_MISSING, ops.kernels_interpreted()
    how = "under Triton's interpreter (TRITON_INTERPRET=1)" if interpreted else "for the GPU"
    print(f"kernels: {missing}" if missing else f"kernels: hiera_fast.kernels imported, defined {how}")
    backend, reason = ops.fused_backend(device)
    print(f"fused=True on {device.type}: {backend} ({reason})")
    if device.type == "cpu" and backend != "triton-interpreter":
        print("  set TRITON_INTERPRET=1 in the environment (before hiera_fast's kernels are imported) to run the "
              "Triton kernels in Triton's interpreter on this CPU: correct in fp32/fp16, slow, for testing only; "
              f"`{PROG} check` does this itself")
    if device.type == "cuda" and backend != "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("  unset TRITON_INTERPRET to launch the kernels on the GPU")
    peers = []
    for dist in ("transformers", "timm", "hiera-transformer", "hiera-optim"):
        try:
            peers.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            peers.append(f"{dist} (not installed)")
    print("peers: " + ", ".join(peers))
    print(f"models ({len(PRESETS)}): " + ", ".join(sorted(PRESETS)))
    return 0


# ---------------------------------------------------------------------------------------------- check
def _family(name: str) -> str:
    """Preset name → its size: ``mae_hiera_base_plus_16x224`` → ``base_plus``."""
    key = name.removeprefix("mae_").removeprefix("hiera_")
    return key.rsplit("_", 1)[0]


def _check_configs(name: str, heads: list[str], full: bool) -> list[tuple[str, str, object, str]]:
    """(head, preset, config, description) per head to check; scaled down unless ``full``."""
    from . import PRESETS
    from .config import HieraConfig

    size = _family(name)
    presets = {"cls": f"hiera_{size}_224", "mae": f"mae_hiera_{size}_224", "video": f"hiera_{size}_16x224"}
    presets["mae" if name.startswith("mae_") else "video" if "16x" in name else "cls"] = name  # the named model itself
    out = []
    for head in heads:
        preset = presets[head]
        if preset not in PRESETS:
            out.append((head, preset, None, f"no {preset} preset (the official zoo has no video {size})"))
            continue
        overrides: dict = {}
        if not full:
            overrides["image_size"] = _CPU_SCALE["video" if "16x" in preset else "image"]
            overrides["depths"] = _CPU_SCALE["depths"]
            if head == "mae":
                overrides["decoder_depth"] = 1
            else:
                overrides["num_labels"] = 10
        config = HieraConfig.from_preset(preset, **overrides)
        desc = preset
        if overrides:
            desc += f" @{'x'.join(map(str, config.image_size))} depths {tuple(config.depths)}"
        out.append((head, preset, config, desc))
    return out


def _make_model(head: str, config, seed: int):
    from . import HieraForImageClassification, HieraForPreTraining
    from .model import HieraMaskUnitAttention

    torch.manual_seed(seed)
    model = (HieraForPreTraining if head == "mae" else HieraForImageClassification)(config)
    with torch.no_grad():  # peaky attention (scores with std ~2), so a wrong window or pool shows in the output
        for m in model.modules():
            if isinstance(m, HieraMaskUnitAttention):
                m.qkv.weight.normal_(0.0, 1.5 * m.qkv.in_features**-0.5)
    return model.train()


def _run(model, head: str, x, noise, weight, dtype, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output (logits / MAE pixel predictions) and every parameter's gradient of a fixed scalar."""
    model.zero_grad(set_to_none=True)
    autocast = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        if head == "mae":
            out = model(x, noise=noise)
            output, loss = out.logits, out.loss
        else:
            output = model(x).logits
            loss = (output.float() * weight.to(output.device, torch.float32)).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.detach(), grads


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _count_route(routes: collections.Counter, device: torch.device, module, args) -> None:
    """Forward pre-hook of an attention block: count whether ``fused=True`` runs it by our kernel or, for one window
    on a device where ``ops`` routes global attention to SDPA, by SDPA (plus our max-pool for a pooled query). The
    window count is the run-time one: an MAE keeping one mask unit runs its mask-unit blocks as global attention."""
    from . import ops

    windows = ops.window_count(args[0].shape[1], module.query_stride, module.window_size, module.use_mask_unit_attn)
    if ops.runs_sdpa(windows, device):
        routes["sdpa"] += 1
        routes["sdpa_pooled"] += module.query_stride > 1
    else:
        routes["kernel"] += 1


def _check_head(head: str, config, batch: int, dtypes: list[torch.dtype], device: torch.device, seed: int):
    """Yield one result dict per dtype: errors of fused and eager against a float64 eager gold run."""
    from . import ops
    from .model import HieraLayer, HieraMaskUnitAttention

    base = _make_model(head, config, seed)
    n_pool = sum(isinstance(m, HieraLayer) and m.dim != m.dim_out and m.query_stride > 1 for m in base.modules())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.num_channels, *config.image_size, generator=gen)
    noise = None
    if head == "mae":
        windows = math.prod(t // mu for t, mu in zip(config.tokens_spatial_shape, config.masked_unit_size))
        noise = torch.rand(batch, windows, generator=gen).to(device)
    weight = torch.randn(batch, config.num_labels, generator=gen)
    gold_out, gold_grads = _run(copy.deepcopy(base).to(device, torch.float64), head, x.to(device, torch.float64),
                                noise, weight, torch.float64, device)
    for dtype in dtypes:
        result = {"head": head, "dtype": dtype, "batch": batch}
        for fused in (False, True):
            model = copy.deepcopy(base).to(device)
            model.fused = fused
            routes = collections.Counter()  # per attention call, what fused=True runs for it
            hooks = [m.register_forward_pre_hook(functools.partial(_count_route, routes, device))
                     for m in model.modules() if isinstance(m, HieraMaskUnitAttention)]
            before = ops.kernel_launches.copy()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                out, grads = _run(model, head, x.to(device), noise, weight, dtype, device)
            for hook in hooks:
                hook.remove()
            tag = "fused" if fused else "eager"
            result[f"{tag}_out"] = _rel(out, gold_out)
            per_param = {n: _rel(g, gold_grads[n]) for n, g in grads.items()}
            result[f"{tag}_grads"] = per_param
            if fused:
                launched = ops.kernel_launches - before
                result["launches"] = {k: launched.get(k, 0) for k in (
                    "mask_unit_attention_fwd", "mask_unit_attention_bwd", "unrolled_max_pool_fwd",
                    "unrolled_max_pool_bwd", "global_attention_sdpa")}
                n_kernel, n_sdpa, n_query_pool = routes["kernel"], routes["sdpa"], routes["sdpa_pooled"]
                result["expected"] = {"mask_unit_attention_fwd": n_kernel, "mask_unit_attention_bwd": n_kernel,
                                      "unrolled_max_pool_fwd": n_pool + n_query_pool,
                                      "unrolled_max_pool_bwd": n_pool + n_query_pool, "global_attention_sdpa": n_sdpa}
                result["fallbacks"] = sorted({str(w.message) for w in caught if "hiera_fast" in str(w.message)})
            del model
        yield _judge(result)


def _judge(r: dict) -> dict:
    floor = _ERROR_FLOOR[r["dtype"]]
    reasons = []
    if not r["fused_out"] <= 2 * r["eager_out"] + floor:
        reasons.append(f"output error {_fmt_err(r['fused_out'])} > 2 x eager's {_fmt_err(r['eager_out'])} + {floor:g}")
    worst, worst_ratio = None, -1.0
    for name, err in r["fused_grads"].items():
        allowed = 2 * r["eager_grads"][name] + floor
        ratio = err / allowed if err == err else math.inf
        if ratio > worst_ratio:
            worst, worst_ratio = name, ratio
    if worst_ratio > 1.0:
        reasons.append(f"gradient of {worst}: error {_fmt_err(r['fused_grads'][worst])} > 2 x eager's "
                       f"{_fmt_err(r['eager_grads'][worst])} + {floor:g}")
    r["worst_grad"] = worst
    missing = {k: (r["launches"][k], n) for k, n in r["expected"].items() if r["launches"][k] != n}
    if missing:
        detail = ", ".join(f"{k} {got}/{n}" for k, (got, n) in missing.items())
        why = f" ({'; '.join(r['fallbacks'])})" if r["fallbacks"] else ""
        reasons.append(f"the Triton path did not run for every block: launches {detail}{why}")
    # the table shows the parameter closest to failing (largest fused error / allowed error)
    r["fused_grad"] = r["fused_grads"].get(worst, 0.0)
    r["eager_grad"] = r["eager_grads"].get(worst, 0.0)
    r["ok"] = not reasons
    r["reasons"] = reasons
    return r


def _ensure_interpreter(argv: list[str]) -> int | None:
    """On a CPU, the kernels must be *defined* under ``TRITON_INTERPRET=1``: set it now if no kernel module is
    imported yet; if one was imported without it, re-run this command in a fresh process (returns its exit code)."""
    from . import ops

    state = ops.kernels_interpreted()
    if state is None:
        os.environ["TRITON_INTERPRET"] = "1"
        return None
    if state and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "hiera_fast", *argv], env=env).returncode


def cmd_check(args: argparse.Namespace) -> int:
    device = _device()
    name = _model_name(args.model)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in heads if h not in ("cls", "mae", "video")]
    if bad or not heads:
        raise UsageError(f"unknown head(s) {bad or heads}; choose from cls, mae, video")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if device.type == "cpu":
        dtypes = _dtypes(args.dtype or "fp32")
        if torch.bfloat16 in dtypes:
            raise UsageError("bf16 cannot be checked without CUDA: Triton's interpreter computes bf16 wrongly; use "
                             "fp32 or fp16 here, bf16 on a GPU")
        rerun = _ensure_interpreter(args.argv)
        if rerun is not None:
            return rerun
    else:
        dtypes = _dtypes(args.dtype or "fp32,fp16,bf16")
    full = args.full or device.type == "cuda"
    batch = args.batch or (4 if device.type == "cuda" else 2)

    from . import ops
    from .bench import device_name, dtype_name

    backend, reason = ops.fused_backend(device)
    print(f"{PROG} check: fused=True (Triton) vs the eager reference, output and every parameter gradient, "
          f"on {device_name(device)}")
    print(f"backend: {backend} ({reason})")
    if backend == "eager":
        print(f"FAIL: nothing to check, fused=True runs the eager path on {device_name(device)}: {reason}")
        return 1
    if device.type == "cpu":
        print("note: no CUDA device, so TRITON_INTERPRET=1 is set and Triton's interpreter runs the kernels"
              + ("" if full else f"; models are scaled down ({'x'.join(map(str, _CPU_SCALE['image']))} images, "
                                  f"video {'x'.join(map(str, _CPU_SCALE['video']))}, depths {_CPU_SCALE['depths']}, "
                                  "one MAE decoder block) so the interpreter finishes quickly (--full: real sizes)")
              + "; bf16 is checked on a GPU only")
    print("errors: max |x - gold| / max |gold| against the eager model in float64, for the output and per parameter "
          "gradient (the table shows the parameter closest to its limit); PASS when fused <= 2 x eager's error "
          "(same dtype) + a floor "
          f"({', '.join(f'{k}: {v:g}' for k, v in zip(('fp32', 'fp16', 'bf16'), _ERROR_FLOOR.values()))}) everywhere, "
          "and every attention block and pooled residual ran its fused route, forward and backward: our kernels "
          "(attn), or for global attention on CUDA SDPA (sdpa, with our max-pool for a pooled query)")
    print()
    header = (f"{'head':<6} {'model':<50} {'dtype':<5} {'B':>2}  {'output fused/eager':>18}  "
              f"{'worst grad f/e':>18}  {'attn f/b':>9} {'sdpa':>4} {'pool f/b':>8}  result")
    print(header)
    print("-" * len(header))
    results, skipped = [], []
    for head, _, config, desc in _check_configs(name, heads, full):
        if config is None:
            skipped.append(f"{head}: {desc}")
            continue
        head_batch = args.batch or (1 if head == "video" and full else batch)
        for r in _check_head(head, config, head_batch, dtypes, device, args.seed):
            la = r["launches"]
            attn = f"{la['mask_unit_attention_fwd']}/{la['mask_unit_attention_bwd']}"
            pool = f"{la['unrolled_max_pool_fwd']}/{la['unrolled_max_pool_bwd']}"
            print(f"{head:<6} {desc:<50} {dtype_name(r['dtype']):<5} {r['batch']:>2}  "
                  f"{_fmt_err(r['fused_out']):>8} / {_fmt_err(r['eager_out']):<7}  "
                  f"{_fmt_err(r['fused_grad']):>8} / {_fmt_err(r['eager_grad']):<7}  {attn:>9} "
                  f"{la['global_attention_sdpa']:>4} {pool:>8}  "
                  f"{'PASS' if r['ok'] else 'FAIL'}", flush=True)
            for why in r["reasons"]:
                print(f"       FAIL: {why}", flush=True)
            results.append(r)
    for line in skipped:
        print(f"skipped {line}")
    print()
    failed = [r for r in results if not r["ok"]]
    if not results:
        print("FAIL: nothing was checked")
        return 1
    if failed:
        print(f"FAIL: {len(failed)} of {len(results)} checks failed")
        return 1
    sdpa = " (SDPA for global attention)" if any(r["launches"]["global_attention_sdpa"] for r in results) else ""
    print(f"PASS: {len(results)} checks; fused matches the reference and the fused route ran for every attention block"
          f"{sdpa} and pooled residual, forward and backward; the Triton kernels ran on {backend}")
    return 0


# ---------------------------------------------------------------------------------------------- bench
def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    device = _device()
    cuda = device.type == "cuda"
    name = _model_name(args.model)
    config = bench.preset_config(name)
    notes = []
    for flag, what in (("compile", "torch.compile"), ("cudagraphs", "torch.compile(mode='reduce-overhead')")):
        if getattr(args, flag) and not cuda:
            raise UsageError(f"--{flag} benchmarks the fused model under {what}, which needs CUDA (no CUDA device "
                             "here)")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.iters < 1 or args.warmup < 0:
        raise UsageError("--iters must be >= 1 and --warmup >= 0")
    dtype = _dtypes(args.dtype or ("bf16" if cuda else "fp32"))
    if len(dtype) != 1:
        raise UsageError("bench takes one --dtype")
    dtype = dtype[0]
    batch = args.batch or (64 if cuda else 1)
    impls = ["eager"]
    if cuda:
        impls += ["fused"] + ["fused+compile"] * args.compile + ["fused+cudagraphs"] * args.cudagraphs
    else:
        timed = "the eager model and the peers" if args.peers else "the eager model"
        notes.append(f"no CUDA device: no fused variant is timed, only {timed}; fused numbers need CUDA (on a CPU the "
                     "Triton kernels run only under Triton's interpreter, which is far too slow to time)")
        if args.dtype is None:
            notes.append("float32 on the CPU (bf16 there is slow and is not what the kernels target); pass --dtype to "
                         "change")
        elif dtype != torch.float32:
            notes.append(f"{bench.dtype_name(dtype)} on a CPU is slow; these numbers say little about a GPU")
    if args.peers:
        impls += list(bench.PEER_IMPLS)
    mode = "train" if args.train else "inference"
    unit = bench.item_unit(config)
    env = bench.environment(device)
    x = bench.make_input(config, batch, device, torch.float32 if args.train else dtype)
    if not args.json:
        how = " (forward + backward + AdamW" + (", autocast)" if dtype != torch.float32 else ")")
        print(f"{PROG} bench: {name}, batch {batch}, {bench.dtype_name(dtype)}, {mode}"
              f"{how if args.train else ''}, on {env['device']} "
              f"(torch {env['torch']}, triton {env['triton']})")
        for note in notes:
            print(f"note: {note}")
    else:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    rows = []
    for impl in impls:
        row = {"model": name, "variant": impl, "mode": mode, "batch": batch, "dtype": bench.dtype_name(dtype),
               "shape": list(x.shape), **env}
        warmup = max(args.warmup, 2) if impl in bench.COMPILE_MODES else args.warmup  # the first call compiles
        graphs = bench.uses_cuda_graphs(impl)  # peak memory from the first run: replays allocate from the graphs' pool
        try:
            variant = bench.build_variant(name, impl, device, None if args.train else dtype, train=args.train)
            step = bench.train_step(variant, x, dtype) if args.train else bench.inference_step(variant, x)
            first_peak = bench.peak_memory(step, device) if graphs else None  # the compiling call, before timing
            with _progress(warmup + args.iters, impl, enabled=not args.no_progress) as bar:
                times = bench.time_iterations(step, device, iters=args.iters, warmup=warmup,
                                              on_step=(lambda: bar.update(1)) if bar is not None else None)
            ms = statistics.median(times)
            row.update(ms_per_iter=ms, ms_min=min(times), ms_max=max(times), iters=len(times),
                       items_per_s=batch / (ms * 1e-3), unit=unit,
                       peak_memory_bytes=first_peak if graphs else bench.peak_memory(step, device),
                       note=variant.note)
            del variant, step
        except bench.Unavailable as err:
            row.update(skipped=str(err))
        except torch.OutOfMemoryError:
            row.update(error=f"out of memory at batch {batch}")
        except Exception as err:  # a peer that fails here is reported in its row; our own variants must run
            if impl not in bench.PEER_IMPLS:
                raise
            row.update(error=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        bench.free_memory()
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


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Triton kernels for the Hiera vision transformer: environment, parity "
                                            "check and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="{info,check,bench}", parser_class=_Parser)

    p = sub.add_parser("info", help="versions, the device, and which backend fused=True uses here")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="fused vs reference parity (output and gradients); exit 0 on PASS, 1 on FAIL",
                       description="Compare fused=True with the eager reference on whole models (classification, "
                                   "MAE, video heads of the model's size): the output and every parameter gradient "
                                   "against a float64 eager run, and prove from ops.kernel_launches that the Triton "
                                   "kernels ran. Without CUDA: Triton's interpreter and scaled-down models.")
    p.add_argument("--model", default="hiera_base_224", help="a preset; its size picks the heads' models "
                                                             "(default: hiera_base_224)")
    p.add_argument("--heads", default="cls,mae,video", help="comma list of cls, mae, video (default: all)")
    p.add_argument("--dtype", default=None, help="comma list of fp32, fp16, bf16 (default: fp32,fp16,bf16 on CUDA; "
                                                 "fp32 on a CPU, where bf16 is refused)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 4 on CUDA, video 1; 2 on a CPU)")
    p.add_argument("--full", action="store_true", help="on a CPU, check the real model sizes (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="throughput: eager vs fused (vs torch.compile, vs the peers)",
                       description="Images (or clips) per second of one model: eager vs fused=True (vs fused + "
                                   "torch.compile with --compile, + CUDA graphs with --cudagraphs, vs transformers/"
                                   "official/timm/hiera-optim with --peers), and peak memory. Without CUDA no fused "
                                   "variant is timed (only eager, and the peers with --peers).")
    p.add_argument("--model", default="hiera_base_224", help="a preset (default: hiera_base_224)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 64 on CUDA, 1 on a CPU)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on a CPU)")
    p.add_argument("--compile", action="store_true", help="also time fused + torch.compile (CUDA only)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="also time fused + torch.compile(mode='reduce-overhead'), i.e. CUDA graphs (CUDA only)")
    p.add_argument("--train", action="store_true", help="time a training step (forward + backward + AdamW, autocast; "
                                                        "mae_ presets: the MAE loss)")
    p.add_argument("--peers", action="store_true", help="also time transformers, official hiera, timm, hiera-optim "
                                                        "(where installed) on the same weights")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 on CUDA, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: 5 on CUDA, 1 on a CPU)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (no table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    if args.command == "bench":
        cuda = _has_cuda()
        args.iters = args.iters if args.iters is not None else (20 if cuda else 3)
        args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, no traceback (HIERA_FAST_DEBUG=1 shows it)
        if os.environ.get("HIERA_FAST_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{PROG} {args.command}: error: {type(err).__name__}: {first} (HIERA_FAST_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
