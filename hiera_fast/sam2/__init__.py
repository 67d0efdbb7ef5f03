"""SAM 2's Hiera image encoder ("hieradet"): config, reference model, attention, checkpoint key maps.

``from hiera_fast.sam2 import HieraDetConfig, HieraDetModel``; the drop-in patches of the official ``sam2``,
timm, transformers and ultralytics trunks are in :mod:`hiera_fast.patch` (``sam2``, ``timm_sam2``,
``transformers_sam2``, ``ultralytics_sam2``).
"""

from .attention import window_attention
from .config import PRESETS, HieraDetConfig
from .model import HieraDetModel

__all__ = ["PRESETS", "HieraDetConfig", "HieraDetModel", "window_attention"]
