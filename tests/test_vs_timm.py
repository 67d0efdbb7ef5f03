"""Our reference model against timm's ``hiera`` via a timm state dict file."""

from __future__ import annotations

import pytest
import torch

import hiera_fast as H
from helpers import max_abs, peer, randomize_, tiny_image_config
from hiera_fast.model import DropPath

timm = peer("timm")


def test_timm_state_dict_matches(tmp_path):
    from timm.models.hiera import Hiera

    cfg = tiny_image_config()
    theirs = randomize_(Hiera(img_size=(64, 64), embed_dim=16, num_heads=1, stages=cfg.depths, num_classes=7),
                        std=0.1).eval()
    assert any(k.startswith("head.fc.") for k in theirs.state_dict())
    path = tmp_path / "timm.pth"
    torch.save(theirs.state_dict(), path)
    ours = H.HieraForImageClassification.from_pretrained(path, config=cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(ours(x).logits, theirs(x)) <= 1e-4


def test_timm_hub_directory(tmp_path):
    """timm's config.json (architecture + num_classes + model_args) next to its weights: the same model, head kept."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    theirs = randomize_(timm.create_model("hiera_tiny_224", num_classes=7, img_size=(64, 64)), std=0.05).eval()
    save_config_for_hf(theirs, tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    ours = H.HieraForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.num_labels == 7 and ours.config.image_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(ours(x).logits, theirs(x)) <= 1e-4


@pytest.mark.parametrize("p", [0.25, 1.0])
def test_drop_path_matches_timm(p):
    from timm.layers import DropPath as TimmDropPath

    x = torch.randn(64, 5, 3)
    seed = torch.seed()
    expected = TimmDropPath(p).train()(x)
    torch.manual_seed(seed)
    got = DropPath(p).train()(x)
    assert torch.isfinite(got).all() and torch.equal(got, expected)
