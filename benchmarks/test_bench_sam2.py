"""SAM 2's image encoder trunk (Hiera, "hieradet") at 1024², bf16, inference: the library's own code against
``hiera_fast.patch`` (every windowed block's attention on the fused BHWC kernels), eager and compiled; per windowed
attention call, the fused kernels against the official formulation; one ``SAM2ImagePredictor.set_image`` row.

- ``test_sam2_trunk``: SAM 2.1 tiny / small / base_plus / large, batch 1 and 8, random weights (the library's init),
  bf16 weights and input. ``library`` is the official ``sam2`` package (when installed; its ``MultiScaleBlock`` is
  ultralytics' too) or timm's ``hieradet_sam2`` (a copy of the official code, in every GPU image). ``impl`` is
  ``base[+mode]``: ``official`` (the library as it is) or ``patched``, eager, ``+compile`` (``torch.compile``
  default) or ``+max-autotune`` (``mode="max-autotune"``, what sam2's ``compile_image_encoder`` ships; its compile
  takes minutes). Rows hold ``median_ms``, images/s and peak memory; the patched rows the kernels' launches and the
  relative error against the official output of the same weights.
- ``test_sam2_window_call``: each distinct windowed-block attention of the four trunks at 1024² (map side, window,
  stride, heads, head dim), batch 1 and 8, bf16, forward and forward + backward: ``fused``
  (``hiera_fast.ops.window_attention``, qkv of the unpadded map in, the cropped map out) vs ``official`` (pad the
  normed map's qkv, partition, the official attention's SDPA with its query ``max_pool2d``, unpartition, crop: what
  the official block does around its attention module). ``gb_per_s`` / ``pct_of_peak`` use the least bytes the call
  must move (qkv read, output written; backward adds d_out, out, qkv again and d_qkv) against the GPU's measured copy
  bandwidth, as the Hiera op suite.
- ``test_sam2_set_image``: ``SAM2ImagePredictor(build_sam2("configs/sam2.1/sam2.1_hiera_b+.yaml")).set_image`` on a
  1024² uint8 image, batch 1, under bf16 autocast (the official notebooks' setting), random weights, before and
  after ``hiera_fast.patch(predictor.model)``: the whole encoder (trunk, FPN neck) and the predictor's pre- and
  post-processing. Needs the official ``sam2`` package (with hydra); skipped with the reason otherwise.

GPU only (``--bench-smoke`` runs the trunk cases at 256², tiny, on this device).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.attention_calls import bandwidth, peak_bandwidth
from benchmarks.common import first_run_or_skip, graph_memory, measure, record
from hiera_fast import ops
from hiera_fast.patch import patch
from hiera_fast.sam2 import HieraDetConfig
from hiera_fast.sam2.attention import window_attention as sdpa_window_attention
from hiera_fast.sam2.model import window_partition, window_unpartition

SIZES = ("tiny", "small", "base_plus", "large")
BATCHES = (1, 8)
IMPLS = ("official", "patched", "official+compile", "patched+compile", "official+max-autotune",
         "patched+max-autotune")
LIBRARIES = ("sam2", "timm")
IMAGE = 1024
DTYPE = torch.bfloat16


def _trunk(library: str, cfg: HieraDetConfig) -> torch.nn.Module:
    """The library's trunk for ``cfg``, returning its list of NCHW stage outputs."""
    if library == "sam2":
        try:
            hieradet = importlib.import_module("sam2.modeling.backbones.hieradet")
        except ImportError as err:
            pytest.skip(f"the official sam2 package is not installed: {err}")
        return hieradet.Hiera(
            embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, q_pool=cfg.q_pool, q_stride=cfg.q_stride,
            stages=cfg.stages, dim_mul=cfg.dim_mul, head_mul=cfg.head_mul,
            window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size, window_spec=cfg.window_spec,
            global_att_blocks=cfg.global_att_blocks, return_interm_layers=True)
    hieradet = pytest.importorskip("timm.models.hieradet_sam2", reason="timm is not installed")
    model = hieradet.HieraDet(
        embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, stages=cfg.stages, q_pool=cfg.q_pool, q_stride=cfg.q_stride,
        dim_mul=cfg.dim_mul, head_mul=cfg.head_mul, global_pos_size=cfg.window_pos_embed_bkg_spatial_size,
        window_spec=cfg.window_spec, global_att_blocks=cfg.global_att_blocks, num_classes=0)

    class Trunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.forward_intermediates(x, intermediates_only=True)

    return Trunk()


def _fused_or_skip(device: torch.device) -> None:
    backend, reason = ops.fused_backend(device)
    if backend == "eager":
        pytest.skip(f"fused=True would run the eager path here: {reason}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("library", LIBRARIES)
def test_sam2_trunk(benchmark, gpu, library, size, batch, impl):
    base, _, mode = impl.partition("+")
    if gpu.smoke and (size != "tiny" or batch != 1):
        pytest.skip("--bench-smoke runs tiny at batch 1 only")
    device, dtype = gpu.device, (DTYPE if gpu.cuda else torch.float32)
    side = 256 if gpu.smoke else IMAGE
    cfg = HieraDetConfig.from_preset(f"sam2.1_hiera_{size}")
    model = _trunk(library, cfg).to(device, dtype).eval()
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    launched = {}
    max_rel_err = None
    if base == "patched":
        _fused_or_skip(device)
        with torch.inference_mode():
            ref = [o.float() for o in model(x)]
        patch(model)
        before = ops.kernel_launches.copy()
        with torch.inference_mode():
            got = model(x)
        launched = dict(ops.kernel_launches - before)
        assert launched.get("window_attention_fwd", 0) > 0, "the patched trunk did not launch the window kernels"
        max_rel_err = max(((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                          for g, r in zip(got, ref, strict=True))
        assert max_rel_err < 5e-2, f"patched {library} trunk disagrees with the original: {max_rel_err:.2e}"
    run = model
    if mode:
        backend = gpu.compile_backend
        kwargs = {"backend": backend} if backend else ({"mode": mode} if mode == "max-autotune" else {})
        run = torch.compile(model, fullgraph=library == "sam2" and base == "official", dynamic=False, **kwargs)

    def forward():
        with torch.inference_mode():
            return run(x)

    peak = first_run_or_skip(forward, impl, batch, device)
    benchmark.group = f"sam2 trunk {size} {IMAGE if not gpu.smoke else side}² b{batch} {str(dtype)[6:]}"
    record(benchmark, gpu, suite="sam2", model=f"sam2.1_hiera_{size}", case=f"{library} {size} b{batch}",
           library=library, impl=impl, dtype=dtype, batch=batch, shape=[batch, 3, side, side],
           kernel_launches=launched, max_rel_err=max_rel_err)
    ms = measure(benchmark, forward, device, rounds=3 if gpu.smoke else 20, warmup_rounds=1 if gpu.smoke else 3)
    graph_memory(benchmark, impl, peak)
    benchmark.extra_info["images_per_s"] = batch / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------- attention calls
def _window_calls() -> list:
    """Distinct ``(side, window, q_stride, heads, head_dim)`` of the windowed blocks of the four trunks at 1024²."""
    calls = {}
    for size in SIZES:
        cfg = HieraDetConfig.from_preset(f"sam2.1_hiera_{size}")
        side = IMAGE // cfg.patch_stride[0]
        for spec in cfg.block_specs():
            if spec.window_size:
                key = (side, spec.window_size, spec.q_stride or 1, spec.num_heads, spec.dim_out // spec.num_heads)
                calls.setdefault(key, size)
            side //= spec.q_stride or 1
    return [pytest.param(key, id=f"{s}-{key[0]}px-ws{key[1]}-q{key[2]}-h{key[3]}x{key[4]}") for key, s in
            calls.items()]


def _official_call(qkv: torch.Tensor, num_heads: int, ws: int, q: int) -> torch.Tensor:
    """What the official block does around its attention: the qkv of zero-padded windows (the Linear's bias on the
    pads, as the official Linear writes them), SDPA with the query max-pool, the windows back, cropped."""
    B, H, W, _ = qkv.shape
    windows, padded = window_partition(qkv, ws)  # [B * nW, ws, ws, 3C], zeros on the pads
    out = sdpa_window_attention(windows, num_heads, q if q > 1 else None)
    Ho, Wo, wo = H // q, W // q, ws // q
    return window_unpartition(out, wo, (Ho + (-Ho) % wo, Wo + (-Wo) % wo), (Ho, Wo))


@pytest.mark.parametrize("impl", ("fused", "official"))
@pytest.mark.parametrize("pass_", ("fwd", "fwd+bwd"), ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("call", _window_calls())
def test_sam2_window_call(benchmark, gpu, call, batch, pass_, impl):
    side, ws, q, heads, head_dim = call
    if gpu.smoke:
        side, batch = min(side, 2 * ws), 1
    device, dtype = gpu.device, (DTYPE if gpu.cuda else torch.float32)
    C = heads * head_dim
    backward = pass_ == "fwd+bwd"
    qkv = torch.randn(batch, side, side, 3 * C, device=device, dtype=dtype, requires_grad=backward)
    bias = torch.randn(3 * C, device=device, dtype=dtype)
    if impl == "fused":
        _fused_or_skip(device)
        op = ops.WindowAttention(heads, ws, q, fused=True)
        fn_impl = lambda: op(qkv, bias)  # noqa: E731
    else:
        fn_impl = lambda: _official_call(qkv, heads, ws, q)  # noqa: E731
    out_shape = (batch, side // q, side // q, C)
    if backward:
        d_out = torch.randn(out_shape, device=device, dtype=dtype)

        def fn():
            fn_impl().backward(d_out)
    else:
        def fn():
            with torch.no_grad():
                return fn_impl()

    fn()
    benchmark.group = f"sam2 window call {str(dtype)[6:]} {pass_}"
    record(benchmark, gpu, suite="sam2-op", case=f"{side}px ws{ws} q{q} h{heads}x{head_dim} b{batch}", impl=impl,
           dtype=dtype, batch=batch, shape=list(qkv.shape), window_size=ws, q_stride=q, num_heads=heads,
           head_dim=head_dim, **{"pass": pass_})
    ms = measure(benchmark, fn, device, rounds=1 if gpu.smoke else 10, warmup_rounds=0 if gpu.smoke else 2,
                 do_bench=True, grad_to_none=[qkv] if backward else None, graph=f"sam2 {impl} {pass_}")
    element, out_numel = torch.finfo(dtype).bits // 8, batch * (side // q) ** 2 * C
    # forward: qkv read, out written; the backward reads qkv, out and d_out again and writes d_qkv
    moved = element * ((3 * qkv.numel() + 3 * out_numel) if backward else (qkv.numel() + out_numel))
    peak = peak_bandwidth(device)
    benchmark.extra_info.update(bytes=moved, floor_ms=moved / peak * 1e3, **bandwidth(moved, ms, peak))
    graph_ms = benchmark.extra_info.get("graph_ms")
    if graph_ms:
        benchmark.extra_info.update({f"graph_{k}": v for k, v in bandwidth(moved, graph_ms, peak).items()})


# ---------------------------------------------------------------------------------------------- set_image
@pytest.mark.parametrize("impl", ("official", "patched"))
def test_sam2_set_image(benchmark, gpu, impl):
    if not gpu.cuda:
        pytest.skip("set_image is benchmarked on CUDA only (SAM 2's predictor builds on the GPU)")
    try:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError as err:
        pytest.skip(f"the official sam2 package (with hydra) is not installed: {err}")
    import numpy as np

    predictor = SAM2ImagePredictor(build_sam2("configs/sam2.1/sam2.1_hiera_b+.yaml", None, device="cuda"))
    image = np.random.default_rng(0).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    launched = {}
    if impl == "patched":
        _fused_or_skip(gpu.device)
        patch(predictor.model)
        before = ops.kernel_launches.copy()
        with torch.inference_mode(), torch.autocast("cuda", dtype=DTYPE):
            predictor.set_image(image)
        launched = dict(ops.kernel_launches - before)
        assert launched.get("window_attention_fwd", 0) > 0

    def set_image():
        with torch.inference_mode(), torch.autocast("cuda", dtype=DTYPE):
            predictor.set_image(image)

    set_image()
    benchmark.group = "sam2 set_image base_plus 1024² bf16-autocast b1"
    record(benchmark, gpu, suite="sam2-predictor", model="sam2.1_hiera_base_plus", case="set_image b1", impl=impl,
           dtype="bf16-autocast", batch=1, shape=[IMAGE, IMAGE, 3], kernel_launches=launched)
    ms = measure(benchmark, set_image, gpu.device, rounds=20, warmup_rounds=3)
    benchmark.extra_info["images_per_s"] = 1 / (ms * 1e-3)
