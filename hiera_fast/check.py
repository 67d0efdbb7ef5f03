"""``hiera-fast check``: ``fused=True`` against the eager reference on whole models.

For each head (classification, MAE, video) of a preset's size and each dtype: the output and every parameter's
gradient of the fused and the eager model, both against the eager model in float64; PASS needs the fused error to be
at most 2x the eager error in the same dtype (plus a floor, :data:`ERROR_FLOOR`) everywhere, and the fused route for
every attention block and pooled residual, forward and backward, proven from ``ops.kernel_launches`` (our kernels,
or SDPA for global attention where the block's route says so). Without CUDA it runs the kernels under Triton's
interpreter on scaled-down models (:data:`CPU_SCALE`).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import math
import os
import subprocess
import sys
import warnings

import torch

from .cli import PROG, UsageError, device_for_run, parse_dtypes, preset_name

# a relative error floor per dtype for the 2x rule (ours vs a float64 reference <= 2x PyTorch's own error + floor)
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CPU_SCALE = dict(image=(64, 64), video=(4, 64, 64), depths=(1, 2, 2, 1))


def _fmt_err(x: float) -> str:
    return "nan" if x != x else f"{x:.1e}"


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
            overrides["image_size"] = CPU_SCALE["video" if "16x" in preset else "image"]
            overrides["depths"] = CPU_SCALE["depths"]
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
    if ops.runs_sdpa(windows, device, module.op.global_attention):
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
    floor = ERROR_FLOOR[r["dtype"]]
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


def run(args: argparse.Namespace) -> int:
    """The command: a table of results, exit code 0 on PASS, 1 on FAIL."""
    device = device_for_run()
    name = preset_name(args.model)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in heads if h not in ("cls", "mae", "video")]
    if bad or not heads:
        raise UsageError(f"unknown head(s) {bad or heads}; choose from cls, mae, video")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if device.type == "cpu":
        dtypes = parse_dtypes(args.dtype or "fp32")
        if torch.bfloat16 in dtypes:
            raise UsageError("bf16 cannot be checked without CUDA: Triton's interpreter computes bf16 wrongly; use "
                             "fp32 or fp16 here, bf16 on a GPU")
        rerun = _ensure_interpreter(args.argv)
        if rerun is not None:
            return rerun
    else:
        dtypes = parse_dtypes(args.dtype or "fp32,fp16,bf16")
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
              + ("" if full else f"; models are scaled down ({'x'.join(map(str, CPU_SCALE['image']))} images, "
                                  f"video {'x'.join(map(str, CPU_SCALE['video']))}, depths {CPU_SCALE['depths']}, "
                                  "one MAE decoder block) so the interpreter finishes quickly (--full: real sizes)")
              + "; bf16 is checked on a GPU only")
    print("errors: max |x - gold| / max |gold| against the eager model in float64, for the output and per parameter "
          "gradient (the table shows the parameter closest to its limit); PASS when fused <= 2 x eager's error "
          "(same dtype) + a floor "
          f"({', '.join(f'{k}: {v:g}' for k, v in zip(('fp32', 'fp16', 'bf16'), ERROR_FLOOR.values()))}) everywhere, "
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


