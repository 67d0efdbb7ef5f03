"""Compile lane: build every kernel variant the launchers can pick for sm_80 and sm_90 on this (GPU-less) machine.

Each variant comes from the launchers' own config functions (``attention_forward_config``, ``max_pool_config``) over
Hiera's geometry classes, so the set is what the launchers choose, not a hand-written list. Per variant we read
registers, spills (STACK / LOCAL from ``cuobjdump -res-usage``), dynamic shared memory (``metadata.shared``) and
whether the PTX uses Hopper's ``wgmma`` or ``mma.sync``, print the table, and assert no spills and shared memory
under the device limit. The compile runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces
the kernels); this file is that subprocess's script too (``python tests/test_kernels_compile.py``).

The no-spill assertion holds for the Triton installed here (CI: 3.8). With triton 3.6 (the GPU image's; its ptxas
is CUDA 12.8's) every variant still builds, and a few spill 8-16 bytes, checked 2026-11-27: on sm_90 only the fp32
head-dim-256 forward (and the fp16 head-dim-256 dK/dV backward); on sm_80 also fp16 4/16x49 packed, the fp16/bf16
global 196/196 loop, the 1/8x19 head-dim-16 case and the fp16 stride-1 max-pool. Hiera's head dims on sm_90 in
fp16/bf16 build spill-free there too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
CCS = (80, 90)

# (tokens per window, q_stride, windows): every row of docs/DESIGN.md's 224² table, video, MAE-masked and odd shapes.
GEOMETRIES = [
    (64, 1, 49), (64, 4, 49), (16, 1, 49), (16, 4, 49),  # windowed: 64/64, 16/64, 16/16, 4/16
    (196, 1, 1), (196, 4, 1), (49, 1, 1),  # global: 196/196, 49/196, 49/49
    (1568, 1, 1), (1568, 4, 1),  # video stage 3 global, stage 4 first
    (12, 1, 7), (64, 8, 3), (8, 8, 19), (128, 2, 4),  # odd windows, q_stride 8, one query per window, big windows
    (18, 3, 4), (54, 9, 1),  # q_stride not a power of two (padded candidate axis)
]
HIERA_HEAD_DIMS = (56, 64, 72, 112, 128)  # the model zoo's head dims besides 96 (swept with every geometry)
OTHER_HEAD_DIMS = (16, 24, 40)  # pads 16 / 32 / 64 of odd head dims
THREE = [(64, 1, 49), (16, 4, 49), (196, 4, 1)]  # one-block single window, one-block packed, flash loop
LSE_OFF = {(64, 1, 49), (16, 4, 49), (196, 4, 1)}  # inference (no lse) variants, head dim 96


def _attention_variants() -> list[dict]:
    """Every distinct launch config of a representative plan: each geometry class at head dim 96, each head-dim
    pad, 256 in every path (the register-heaviest), bf16, fp32 and fp64."""
    import torch
    from hiera_fast.kernels.attention_fwd import attention_forward_config

    plan = [(torch.float16, 96, g) for g in GEOMETRIES]
    plan += [(torch.float16, hd, g) for hd in HIERA_HEAD_DIMS for g in THREE]
    plan += [(torch.float16, hd, g) for hd in OTHER_HEAD_DIMS for g in [(64, 1, 49), (8, 8, 19)]]
    plan += [(torch.float16, 256, g) for g in THREE + [(8, 8, 19)]]
    plan += [(torch.bfloat16, 96, g) for g in [(64, 1, 49), (16, 1, 49), (196, 1, 1)]]
    plan += [(dt, hd, g) for dt in (torch.float32, torch.float64) for hd in (96, 256) for g in THREE[1:]]
    plan += [(dt, 16, g) for dt in (torch.float32, torch.float64) for g in THREE]  # head dims <= 16: 64-tiles
    seen, out = set(), []
    for dtype, hd, (T, s, nw) in plan:
        cfg = attention_forward_config(hd, T, s, nw, dtype)
        for lse in (True, False) if (dtype, hd) == (torch.float16, 96) and (T, s, nw) in LSE_OFF else (True,):
            key = (str(dtype), lse, repr(sorted((k, str(v)) for k, v in cfg.items() if k != "windows_per_program")))
            if key not in seen:
                seen.add(key)
                out.append({"dtype": str(dtype).split(".")[-1], "lse": lse, "geom": f"{T // s}/{T}x{nw}", **cfg})
    return out


_TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _res_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in (kv.split(":", 1) for kv in line.split()) if k in ("REG", "STACK", "SHARED", "LOCAL")}


def _compile(fn, signature: dict, constexprs: dict, divisible: tuple, cc: int, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}  # as the JIT specialises
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps,
                                                                           "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    res = _res_usage(kernel.asm["cubin"])
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    return {"regs": res["REG"], "spill": res["STACK"] + res["LOCAL"], "smem": kernel.metadata.shared, "mma": mma,
            "fp32_dot": fp32_dot_precision(ptx)}


def fp32_dot_precision(ptx: str) -> str:
    """How the PTX multiplies fp32 matrices: ``3xtf32`` (tf32 tensor-core MMAs with the operands split into big and
    small tf32 parts, ``cvt.rna.tf32``: fp32-accurate), ``tf32`` (one rounded tf32 MMA: ~1e-3 relative error),
    ``fma`` (no tf32 MMA at all: IEEE fp32, or no fp32 dot). Triton's interpreter ignores ``input_precision``, so
    this is the only check of it without a GPU."""
    if not re.search(r"(mma\.sync|wgmma\.mma_async)\S*\.tf32", ptx):
        return "fma"
    return "3xtf32" if "cvt.rna.tf32" in ptx else "tf32"


def _worker() -> list[dict]:
    """Compile every variant for every cc; runs without TRITON_INTERPRET."""
    import triton.language as tl
    from hiera_fast.kernels import attention_fwd, max_pool

    rows = []
    fn = attention_fwd._mask_unit_attn_fwd_kernel
    for v in _attention_variants():
        ty = _TRITON_TYPE[v["dtype"]]
        sig = {n: "i32" for n in fn.arg_names}
        sig.update(QKV=f"*{ty}", Out=f"*{ty}", Lse="*fp64" if ty == "fp64" else "*fp32")
        cst = {k: v[k] for k in ("HEAD_DIM", "Q_STRIDE", "Q_CANDIDATES", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PACKED",
                                 "ONE_KV_BLOCK", "ACC_DTYPE", "DOT_PRECISION")}
        cst["ACC_DTYPE"] = getattr(tl, str(cst["ACC_DTYPE"]).replace("fp", "float"))
        cst["STORE_LSE"] = v["lse"]
        for cc in CCS:
            r = _compile(fn, sig, cst, ("QKV", "Out", "Lse", "stride_qkv_b", "stride_qkv_n"), cc,
                         v["num_warps"], v["num_stages"])
            name = (f"{v['dtype']} {v['geom']} hd{v['HEAD_DIM']}/{v['BLOCK_D']} s{v['Q_STRIDE']} M{v['BLOCK_M']} "
                    f"N{v['BLOCK_N']} {'packed' if v['PACKED'] else '1win'} {'1blk' if v['ONE_KV_BLOCK'] else 'loop'}"
                    f"{' lse' if v['lse'] else ''} w{v['num_warps']}")
            rows.append({"kernel": "attn_fwd", "variant": name, "cc": cc, **r})
    for v in max_pool.max_pool_variants():
        ty = _TRITON_TYPE[str(v.pop("dtype")).split(".")[-1]]
        for kname, fn in (("pool_fwd", max_pool._unrolled_max_pool_fwd_kernel),
                          ("pool_bwd", max_pool._unrolled_max_pool_bwd_kernel)):
            sig = {n: "i32" for n in fn.arg_names}
            ptrs = [n for n in ("X", "Out", "GradOut", "GradX") if n in fn.arg_names]
            sig.update({n: f"*{ty}" for n in ptrs})
            cst = {k: v[k] for k in fn.arg_names if k in v}
            div = (*ptrs, "stride_x_b", "stride_x_n")
            if kname == "pool_fwd" and not v["GRAD_C_CONTIGUOUS"]:
                continue  # the forward has no grad: same kernel as the contiguous row
            for cc in CCS:
                r = _compile(fn, sig, cst, div, cc, v["num_warps"], 1)
                name = f"{ty} " + " ".join(f"{k}={cst[k]}" for k in cst) + f" w{v['num_warps']}"
                rows.append({"kernel": kname, "variant": name, "cc": cc, **r})
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'kernel':9} {'variant':72} {'cc':>3} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':8} fp32 dot"
    return "\n".join([head] + [f"{r['kernel']:9} {r['variant']:72} {r['cc']:>3} {r['regs']:>4} {r['spill']:>5} "
                               f"{r['smem']:>7} {r['mma']:8} {r['fp32_dot']}" for r in rows])


def test_every_variant_compiles_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + _table(rows))
    bad = [r for r in rows if r["spill"] > 0 or r["smem"] > SMEM_LIMIT[r["cc"]]]
    assert not bad, "spills or too much shared memory:\n" + _table(bad)
    assert any(r["mma"] == "wgmma" for r in rows if r["cc"] == 90), "no variant reaches wgmma on sm_90"
    fp32 = [r for r in rows if r["kernel"] == "attn_fwd" and r["variant"].startswith("float32")]
    assert fp32 and all(r["fp32_dot"] == "3xtf32" for r in fp32), "fp32 forward dots must be 3xTF32:\n" + _table(fp32)


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "the compile lane needs the real compiler"
    print(json.dumps(_worker()))
