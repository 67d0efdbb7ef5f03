"""Small shared helpers for the model tests."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

import hiera_fast as H

# the peer libraries the parity tests compare with: import name -> distribution (all in the `test` extra)
PEERS = {"transformers": "transformers", "timm": "timm", "hiera": "hiera-transformer"}


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def peer(module: str) -> ModuleType:
    """Import a peer library (or one of its modules, e.g. ``timm.models.hiera``) for a parity test.

    On a user's machine a missing peer skips the test with the reason. In CI a missing peer is an error: a parity
    suite whose peers silently skip proves nothing, and its skips would hide among the GPU skips."""
    dist = PEERS[module.split(".")[0]]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if in_ci():
            raise ImportError(f"CI=true: the parity tests need {dist} (pip install -e '.[test]' installs it), "
                              f"but importing {module} failed: {err}") from err
        pytest.skip(f"{dist} is not installed (pip install {dist}): {err}")


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


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|a - ref| / max|ref|``."""
    return max_abs(a, ref) / max(ref.detach().double().abs().max().item(), 1e-30)


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial random values (biases and norms too), so a wrong mapping shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def peaky_attention_(model: torch.nn.Module, gain: float = 1.5) -> torch.nn.Module:
    """Make every attention peaked: each ``qkv`` Linear's weights ~ N(0, (gain / sqrt(fan_in))**2), so scores have a
    std of about ``gain**2`` over unit-variance inputs. With small weights softmax is near uniform, and errors that
    only change which keys a query favours (the wrong pooled candidate, a neighbouring window) hide inside a
    bf16/fp16 tolerance; peaked scores make them show."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("qkv") and isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, gain * m.in_features**-0.5)
    return model


def attention_blocks(model: torch.nn.Module) -> int:
    return sum(isinstance(m, H.model.HieraMaskUnitAttention) for m in model.modules())


def pooling_blocks(model: torch.nn.Module) -> int:
    """Blocks whose residual the fused max-pool pools (a stride > 1)."""
    return sum(isinstance(m, H.model.HieraLayer) and m.dim != m.dim_out and m.query_stride > 1
               for m in model.modules())


def assert_launched(launched, *, attention: int, pool: int, backward: bool) -> None:
    """The fused kernels ran for every attention block and pooled residual (forward, and backward if ``backward``):
    a fused-vs-eager comparison whose fused side fell back to the eager path would compare eager with eager."""
    expected = {"mask_unit_attention_fwd": attention, "unrolled_max_pool_fwd": pool}
    if backward:
        expected.update(mask_unit_attention_bwd=attention, unrolled_max_pool_bwd=pool)
    got = {k: launched.get(k, 0) for k in expected}
    assert got == expected and attention > 0, f"launches {got}, expected {expected}"


def sam2_bias_heavy_(model: torch.nn.Module) -> torch.nn.Module:
    """Weights ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1), qkv biases and position embeddings ~ N(0, 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
            elif name.endswith("qkv.bias") or "pos_embed" in name:
                p.normal_(0.0, 1.0)
    return model
