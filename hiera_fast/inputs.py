"""Input checks of the Hiera models and the MAE's masking inputs: a clear TypeError / ValueError naming the argument
(never a reshape error deep in the model), and the mask-unit bookkeeping of random or explicit masking."""

from __future__ import annotations

import torch

from .config import HieraConfig
from .losses import problem_type


def check_pixels(config: HieraConfig, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None,
                  dtype: torch.dtype) -> tuple:
    """Validate the input (``dtype``: the model's; ``interpolate_pos_encoding=None``: the model runs only at
    ``config.image_size``) and return its token grid."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
    if pixel_values.dtype != dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise TypeError(f"pixel_values is {pixel_values.dtype} but the model is {dtype}: convert one to the other "
                        "(or run under torch.autocast)")
    dims = config.spatial_dims
    layout = "[B, C, H, W]" if dims == 2 else "[B, C, T, H, W]"
    if pixel_values.dim() != dims + 2:
        raise ValueError(f"pixel_values must be {layout} (rank {dims + 2}), got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, the config expects {config.num_channels}")
    size = tuple(pixel_values.shape[2:])
    if size != config.image_size and not interpolate_pos_encoding:
        hint = ("pass interpolate_pos_encoding=True to run at another size" if interpolate_pos_encoding is not None
                else "this model runs only at config.image_size (its decoder position embedding is fixed)")
        raise ValueError(f"pixel_values spatial size {size} differs from config.image_size {config.image_size}; "
                         + hint)
    unrolls = len(config.depths) - 1
    for i, (n, s, q) in enumerate(zip(size, config.patch_stride, config.query_stride)):
        if n % (s * q**unrolls):
            raise ValueError(f"pixel_values size {size}: dim {i} must be a multiple of patch_stride * "
                             f"query_stride**{unrolls} = {s * q**unrolls} (the unroll)")
    return tuple(n // s for n, s in zip(size, config.patch_stride))


def check_masking(config: HieraConfig, who: str) -> None:
    if not config.supports_masking:
        unit = tuple(q ** (len(config.depths) - 1) for q in config.query_stride)
        raise ValueError(f"{who} needs HieraConfig.masked_unit_size == query_stride**(len(depths) - 1) = {unit}, got "
                         f"{config.masked_unit_size}: only then is mask unit w the w-th window of the unrolled layout "
                         "(see HieraConfig.supports_masking)")


def check_mask(bool_masked_pos, batch: int, num_windows: int, device: torch.device) -> torch.Tensor:
    if not isinstance(bool_masked_pos, torch.Tensor):
        raise TypeError(f"bool_masked_pos must be a torch.Tensor, got {type(bool_masked_pos).__name__}")
    if bool_masked_pos.shape != (batch, num_windows):
        raise ValueError(f"bool_masked_pos must be [B, #mask units] = {(batch, num_windows)}, "
                         f"got {tuple(bool_masked_pos.shape)}")
    if bool_masked_pos.device != device:
        raise ValueError(f"bool_masked_pos must be on pixel_values' device ({device}), got {bool_masked_pos.device}")
    return bool_masked_pos.bool()


def check_keep_ids(keep_ids, batch: int, num_windows: int, device: torch.device) -> None:
    if not isinstance(keep_ids, torch.Tensor):
        raise TypeError(f"keep_ids must be a torch.Tensor, got {type(keep_ids).__name__}")
    if keep_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"keep_ids must be an integer tensor (window ids), got {keep_ids.dtype}")
    if keep_ids.dim() != 2 or keep_ids.shape[0] != batch or not 1 <= keep_ids.shape[1] <= num_windows:
        raise ValueError(f"keep_ids must be [B, K] with B = {batch} and 1 <= K <= {num_windows} (the mask units), "
                         f"got {tuple(keep_ids.shape)}")
    if keep_ids.device != device:
        raise ValueError(f"keep_ids must be on pixel_values' device ({device}), got {keep_ids.device}")


def num_keep(config: HieraConfig, num_windows: int) -> int:
    """The number of mask units the MAE keeps visible (transformers' ``len_keep``)."""
    len_keep = int(num_windows * (1 - config.mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {config.mask_ratio} keeps no window out of {num_windows}")
    return len_keep


def random_masking(config: HieraConfig, batch: int, num_windows: int, noise: torch.Tensor | None, device):
    """transformers' ``random_masking``: keep the ``len_keep`` windows with the smallest noise.

    Returns ``(bool_masked_pos [B, #MUs] True = visible, ids_restore [B, #MUs], keep_ids [B, len_keep] ascending)``.
    """
    len_keep = num_keep(config, num_windows)
    if noise is None:
        noise = torch.rand(batch, num_windows, device=device)
    elif not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    elif not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    elif noise.shape != (batch, num_windows):
        raise ValueError(f"noise must be [batch, num_mask_units] = {(batch, num_windows)}, got {tuple(noise.shape)}")
    elif noise.device != torch.device(device):
        raise ValueError(f"noise must be on pixel_values' device ({device}), got {noise.device}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = torch.zeros(batch, num_windows, device=device)
    keep[:, :len_keep] = 1
    keep = torch.gather(keep, 1, ids_restore).bool()
    keep_ids = ids_shuffle[:, :len_keep].sort(dim=1).values
    return keep, ids_restore, keep_ids


def keep_ids_from_mask(mask: torch.Tensor, num_keep: int | None = None) -> torch.Tensor:
    """Ascending visible-window indices ``[B, K]`` of a keep-mask ``[B, #MUs]``; every row must keep K.

    Given ``num_keep`` (K known beforehand), the shape does not depend on the mask's values and the mask is checked
    only in eager mode, so ``torch.compile(fullgraph=True)`` traces it. Without it, K is read from the mask: a host
    sync that torch.compile cannot trace.
    """
    compiling = torch.compiler.is_compiling()
    if num_keep is None:
        unreadable = {"under torch.compile": compiling, "on the meta device (no values)": mask.device.type == "meta",
                      "for an empty batch": mask.shape[0] == 0}
        for why, applies in unreadable.items():
            if applies:
                raise ValueError(f"the number of visible mask units of bool_masked_pos is read from its values: {why} "
                                 "pass keep_ids= too")
        num_keep = int(mask[0].sum())
    if not compiling and mask.device.type != "meta":
        counts = mask.sum(1)
        if num_keep == 0 or not bool((counts == num_keep).all()):
            raise ValueError(f"bool_masked_pos must keep the same, non-zero number of mask units in every sample "
                             f"({num_keep} expected), got {counts.tolist()}")
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :num_keep]


def check_labels(labels, batch: int, config: HieraConfig) -> None:
    """transformers' three label kinds, each with its shape: regression targets ``[B]``/``[B, 1]`` (one label) or
    ``[B, num_labels]``, class ids ``[B]`` (int64/int32), multi-hot targets ``[B, num_labels]`` (floating point)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    num_labels = config.num_labels
    if num_labels < 1:
        raise ValueError("labels need a classifier: the config has num_labels=0")
    problem = problem_type(config, labels)
    if problem == "single_label_classification":
        if labels.dtype not in (torch.long, torch.int):
            raise TypeError(f"labels must be int64/int32 class ids (problem_type {problem}), got {labels.dtype}")
        kind, shapes = "class ids", [(batch,)]
    elif not (labels.is_floating_point() or problem == "regression" and labels.dtype in (torch.long, torch.int)):
        raise TypeError(f"labels must be floating-point targets (problem_type {problem}), got {labels.dtype}")
    elif problem == "regression":
        kind, shapes = "regression targets", [(batch,), (batch, 1)] if num_labels == 1 else [(batch, num_labels)]
    else:
        kind, shapes = "multi-hot targets", [(batch, num_labels)]
    if tuple(labels.shape) not in shapes:
        raise ValueError(f"labels as {kind} must have shape {' or '.join(map(str, shapes))}, "
                         f"got {tuple(labels.shape)}")


def check_prediction_grid(config: HieraConfig, pred_stride: int) -> None:
    """The MAE predicts one ``pred_stride``-sized pixel patch (of the first frame of a temporal patch, for video) per
    final token, as the official model does: its label grid (:meth:`HieraForPreTraining.pixel_labels`) must be the
    final token grid, or the loss would compare predictions with other tokens' pixels."""
    tokens_final = [t // q**config.num_query_pool for t, q in zip(config.tokens_spatial_shape, config.query_stride)]
    size = list(config.image_size)
    labels = [n // pred_stride for n in size[-2:]]
    if config.spatial_dims == 3:
        labels.insert(0, -(-size[0] // config.patch_stride[0]))  # every patch_stride[0]-th frame
    if labels != tokens_final:
        raise ValueError(f"HieraForPreTraining: the final token grid {tokens_final} differs from the grid of "
                         f"{pred_stride}-pixel label patches {labels} (pred_stride = patch_stride[-1] * "
                         f"query_stride[-1]**num_query_pool): patch_stride * query_stride**num_query_pool must be the "
                         f"same in every spatial dim, and query_stride 1 in time (patch_stride {config.patch_stride}, "
                         f"query_stride {config.query_stride}, num_query_pool {config.num_query_pool})")
