"""hiera-fast: a minimal Hiera reference in PyTorch plus Triton kernels for its attention.

Public API (listed here and nowhere else)::

    HieraConfig                     config with transformers' field names + the official zoo presets
    HieraModel, HieraForImageClassification, HieraForPreTraining, HieraBackbone
                                    the models; constructor (config, fused=False); .from_pretrained / .save_pretrained
    ops.mask_unit_attention, ops.unrolled_max_pool
                                    the fused ops (eager with fused=False)
"""

from . import ops
from .config import PRESETS, HieraConfig
from .model import HieraBackbone, HieraForImageClassification, HieraForPreTraining, HieraModel

__version__ = "0.1.0"

__all__ = [
    "HieraConfig",
    "PRESETS",
    "HieraModel",
    "HieraForImageClassification",
    "HieraForPreTraining",
    "HieraBackbone",
    "ops",
    "__version__",
]
