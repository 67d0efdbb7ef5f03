"""Drop-in patch: forward throughput of transformers', timm's and the official Hiera-B (224², bf16, batch 64,
inference, random N(0, 0.02) weights) before and after ``hiera_fast.patch(model)``; one case per library. GPU only.

Both sides are timed with ``triton.testing.do_bench`` (median, warm-up first) on the same model and input; the
row's ``extra_info`` holds both medians, images/s and the speed-up, and pytest-benchmark's own rounds time the
patched forward. Self-contained: it needs only pytest-benchmark and the three libraries.
"""

from __future__ import annotations

import datetime
import platform

import pytest
import torch

from hiera_fast import ops
from hiera_fast.patch import patch, unpatch

BATCH = 64
IMAGE = (3, 224, 224)
DTYPE = torch.bfloat16
# Hiera-B (the official zoo's base: embed 96, 1 head, stages (2, 3, 16, 3), q_stride 2x2, mask units 8x8)
BASE = {"embed_dim": 96, "num_heads": 1, "stages": (2, 3, 16, 3)}
LIBRARIES = ("transformers", "timm", "official")


def _build(library: str) -> tuple[torch.nn.Module, str]:
    """Hiera-B of ``library`` with its default (random) init, and the library's version string."""
    if library == "transformers":
        transformers = pytest.importorskip("transformers")
        config = transformers.HieraConfig(image_size=list(IMAGE[1:]), embed_dim=BASE["embed_dim"],
                                          num_heads=[1, 2, 4, 8], depths=list(BASE["stages"]))
        return transformers.HieraForImageClassification(config), transformers.__version__
    if library == "timm":
        timm = pytest.importorskip("timm")
        from timm.models.hiera import Hiera

        return Hiera(img_size=IMAGE[1:], **BASE), timm.__version__
    hiera = pytest.importorskip("hiera")
    import importlib.metadata

    return hiera.Hiera(input_size=IMAGE[1:], **BASE), importlib.metadata.version("hiera-transformer")


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.gpu
@pytest.mark.parametrize("library", LIBRARIES)
def test_patch_forward_throughput(benchmark, library):
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs a CUDA device (the Triton interpreter on a CPU times nothing useful); "
                    "tests/test_patch.py checks the patch's correctness on a CPU")
    backend, reason = ops.fused_backend("cuda")
    if backend != "triton":
        pytest.skip(f"the fused ops would not run Triton here: {reason}")
    import triton
    import triton.testing

    model, version = _build(library)
    with torch.no_grad():  # non-trivial weights everywhere (timm zero-inits its head): the sanity check means something
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to("cuda", DTYPE).eval()
    x = torch.randn(BATCH, *IMAGE, device="cuda", dtype=DTYPE)

    @torch.inference_mode()
    def forward():
        return model(x)

    try:
        ref = _logits(forward()).float()
        unpatched_ms = triton.testing.do_bench(forward, return_mode="median")
        patch(model)
        before = ops.kernel_launches.copy()
        got = _logits(forward()).float()  # warm-up (compiles the kernels) and a sanity check
        launched = ops.kernel_launches - before
        assert launched["mask_unit_attention_fwd"] > 0 and launched["unrolled_max_pool_fwd"] > 0
        rel_err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert rel_err < 5e-2, f"patched {library} model disagrees with the original: relative error {rel_err:.2e}"
        patched_ms = triton.testing.do_bench(forward, return_mode="median")

        def timed():
            forward()
            torch.cuda.synchronize()

        benchmark.group = f"patch Hiera-B 224 b{BATCH} {str(DTYPE).removeprefix('torch.')}"
        benchmark.extra_info.update(
            suite="patch", case=f"{library} hiera_base_224 b{BATCH}", library=library, library_version=version,
            impl="patched", gpu=torch.cuda.get_device_name(),
            device_capability=list(torch.cuda.get_device_capability()), dtype=str(DTYPE).removeprefix("torch."),
            batch=BATCH, shape=[BATCH, *IMAGE], model="hiera_base_224", model_config=dict(BASE),
            kernel_attention_calls=launched["mask_unit_attention_fwd"], sdpa_attention_calls=launched[
                "global_attention_sdpa"], pool_calls=launched["unrolled_max_pool_fwd"],
            unpatched_ms=unpatched_ms, patched_ms=patched_ms, speedup=unpatched_ms / patched_ms,
            unpatched_images_per_s=BATCH / (unpatched_ms * 1e-3), patched_images_per_s=BATCH / (patched_ms * 1e-3),
            max_rel_err=rel_err, timer="triton.testing.do_bench median", torch=torch.__version__,
            triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
            date=datetime.date.today().isoformat(),
        )
        benchmark.pedantic(timed, rounds=10, warmup_rounds=2)
    finally:
        unpatch(model)
        torch.cuda.empty_cache()
