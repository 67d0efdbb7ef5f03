"""hiera-fast: a minimal Hiera reference in PyTorch plus Triton kernels for its attention.

Public API (listed here and nowhere else)::

    HieraConfig                     config with transformers' field names + the official zoo presets
    HieraModel, HieraForImageClassification, HieraForPreTraining, HieraBackbone
                                    the models; constructor (config, fused=False); .from_pretrained / .save_pretrained
    ops.mask_unit_attention, ops.unrolled_max_pool
                                    the fused ops (eager with fused=False)
    HieraDetConfig, HieraDetModel  SAM 2's Hiera image encoder ("hieradet"): config + presets, the reference trunk
    patch, unpatch, patched, is_patched
                                    put the kernels into transformers' / timm's / the official Hiera models (and
                                    SAM 2 trunks of sam2 / timm / transformers / ultralytics)
    patch_transformers, patch_timm, patch_official, patch_sam2, patch_timm_sam2, patch_transformers_sam2,
    patch_ultralytics_sam2 (+ unpatch_*)
                                    the same at class level, before models are built

``hiera_fast.patch`` is the function; the per-library modules stay importable with
``from hiera_fast.patch.transformers import ...``.
"""

from . import ops
from .config import PRESETS, HieraConfig
from .model import HieraBackbone, HieraForImageClassification, HieraForPreTraining, HieraModel
from .patch import (
    is_patched,
    patch,
    patch_official,
    patch_sam2,
    patch_timm,
    patch_timm_sam2,
    patch_transformers,
    patch_transformers_sam2,
    patch_ultralytics_sam2,
    patched,
    unpatch,
    unpatch_official,
    unpatch_sam2,
    unpatch_timm,
    unpatch_timm_sam2,
    unpatch_transformers,
    unpatch_transformers_sam2,
    unpatch_ultralytics_sam2,
)
from .sam2 import HieraDetConfig, HieraDetModel

__version__ = "0.1.0"

__all__ = [
    "HieraConfig",
    "PRESETS",
    "HieraModel",
    "HieraForImageClassification",
    "HieraForPreTraining",
    "HieraBackbone",
    "ops",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "patch_transformers",
    "unpatch_transformers",
    "patch_timm",
    "unpatch_timm",
    "patch_official",
    "unpatch_official",
    "HieraDetConfig",
    "HieraDetModel",
    "patch_sam2",
    "unpatch_sam2",
    "patch_timm_sam2",
    "unpatch_timm_sam2",
    "patch_transformers_sam2",
    "unpatch_transformers_sam2",
    "patch_ultralytics_sam2",
    "unpatch_ultralytics_sam2",
    "__version__",
]
