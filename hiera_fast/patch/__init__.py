"""Drop-in patch: put hiera-fast's fused kernels into transformers', timm's and the official Hiera models.

On an existing model (in place; ``unpatch`` undoes it)::

    model = transformers.HieraForImageClassification.from_pretrained(...)
    hiera_fast.patch(model)             # or: with hiera_fast.patched(model): ...

On the classes, before models are built (Liger-Kernel style; each has an undo)::

    hiera_fast.patch_transformers()     # patch_timm(), patch_official()

A patched module keeps its parameters, state dict and hooks; a ``copy.deepcopy`` of it stays patched, a model saved
with ``torch.save(model)`` loads unpatched (patch again after loading). ``is_patched(model)`` says whether any
module in it runs fused code.

Not supported: double backward (a backward through a gradient taken with ``torch.autograd.grad(...,
create_graph=True)``, e.g. a gradient penalty) raises ``RuntimeError``: the fused backward has no derivative of its
own. Run such a step unpatched (after :func:`unpatch`, or outside ``with patched(model)``).

One module per library (:mod:`.transformers`, :mod:`.timm`, :mod:`.official`; SAM 2's Hiera trunks: :mod:`.sam2`
(the official ``sam2``), :mod:`.timm_sam2`, :mod:`.transformers_sam2`, :mod:`.ultralytics_sam2`) around a shared
:mod:`.core`. None of them imports its library when imported (``patch_<library>()`` does): a model can only hold a
library's modules once that library is imported, so :func:`patch` looks only at the libraries already loaded.
"""

from __future__ import annotations

from .core import is_patched, patch, patched, unpatch
from .official import patch_official, unpatch_official
from .sam2 import patch_sam2, unpatch_sam2
from .timm import patch_timm, unpatch_timm
from .timm_sam2 import patch_timm_sam2, unpatch_timm_sam2
from .transformers import patch_transformers, unpatch_transformers
from .transformers_sam2 import patch_transformers_sam2, unpatch_transformers_sam2
from .ultralytics_sam2 import patch_ultralytics_sam2, unpatch_ultralytics_sam2

__all__ = [
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
    "patch_sam2",
    "unpatch_sam2",
    "patch_timm_sam2",
    "unpatch_timm_sam2",
    "patch_transformers_sam2",
    "unpatch_transformers_sam2",
    "patch_ultralytics_sam2",
    "unpatch_ultralytics_sam2",
]
