"""Our reference model against timm's ``hiera`` via a timm state dict file."""

from __future__ import annotations

import pytest
import torch

import hiera_fast as H
from helpers import max_abs, randomize_, tiny_image_config

timm = pytest.importorskip("timm")


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
