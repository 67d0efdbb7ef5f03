"""Small shared helpers for the model tests."""

from __future__ import annotations

import torch

import hiera_fast as H


def tiny_image_config(**overrides) -> H.HieraConfig:
    """A 64x64 Hiera with Hiera-T's structure scaled down: 16x16 tokens, 2x2 mask units of 8x8."""
    kwargs = dict(image_size=(64, 64), embed_dim=16, num_heads=(1, 2, 4, 8), depths=(1, 2, 2, 1), num_labels=7)
    kwargs.update(overrides)
    return H.HieraConfig(**kwargs)


def tiny_video_config(**overrides) -> H.HieraConfig:
    kwargs = dict(image_size=(4, 32, 32), embed_dim=16, num_heads=(2, 4, 8, 16), depths=(1, 1, 2, 1), num_labels=5,
                  query_stride=(1, 2, 2), masked_unit_size=(1, 8, 8), patch_size=(3, 7, 7), patch_stride=(2, 4, 4),
                  patch_padding=(1, 3, 3), sep_pos_embed=True)
    kwargs.update(overrides)
    return H.HieraConfig(**kwargs)


def tiny_mae_config(**overrides) -> H.HieraConfig:
    return tiny_image_config(**{"num_query_pool": 2, "decoder_hidden_size": 16, "decoder_depth": 1,
                                "decoder_num_heads": 2, **overrides})


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial random values (biases and norms too), so a wrong mapping shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model
