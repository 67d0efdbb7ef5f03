"""The losses of the Hiera models: transformers' classification losses, and the MAE's normalized-pixel MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import HieraConfig


def problem_type(config: HieraConfig, labels: torch.Tensor) -> str:
    """``config.problem_type``, or transformers' choice when it is None: regression for one label, single-label
    classification for class ids (int64/int32), multi-label classification for floating-point targets."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: HieraConfig) -> torch.Tensor:
    """transformers' loss for :func:`_problem_type`: MSE, cross-entropy or BCE with logits."""
    problem, num_labels = problem_type(config, labels), config.num_labels
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def mae_pixel_labels(config: HieraConfig, pixel_values: torch.Tensor, pred_stride: int) -> torch.Tensor:
    """Per prediction token, its ``pred_stride``-sized patch of pixels ``[B, L, P]`` (the official layout; video takes
    the first frame of each temporal patch, channels last)."""
    size = pred_stride
    if config.spatial_dims == 2:
        label = pixel_values.permute(0, 2, 3, 1).unfold(1, size, size).unfold(2, size, size)
        return label.flatten(1, 2).flatten(2)
    video = pixel_values[:, :, :: config.patch_stride[0]]
    label = video.unfold(3, size, size).unfold(4, size, size).permute(0, 2, 3, 4, 5, 6, 1)
    return label.flatten(1, 3).flatten(2)


def mae_loss(config: HieraConfig, label: torch.Tensor, logits: torch.Tensor, visible: torch.Tensor,
             num_masked: int) -> torch.Tensor:
    """Mean squared error of ``logits [B, L, P]`` against ``label [B, L, P]`` over the ``num_masked`` masked
    prediction tokens of each sample (``visible [B, L]`` False), each label patch normalised by its own mean and
    variance when ``config.normalize_pixel_loss``; gathered, not boolean-indexed, so the shape does not depend on the
    data."""
    masked_ids = torch.argsort(visible.to(torch.int8), dim=1, stable=True)[:, :num_masked]  # [B, M]
    index = masked_ids[..., None]
    label = torch.gather(label, 1, index.expand(-1, -1, label.shape[-1]))
    pred = torch.gather(logits, 1, index.expand(-1, -1, logits.shape[-1]))
    if config.normalize_pixel_loss:
        mean, var = label.mean(dim=-1, keepdim=True), label.var(dim=-1, keepdim=True)
        label = (label - mean) / (var + 1.0e-6) ** 0.5
    return ((pred - label) ** 2).mean()
