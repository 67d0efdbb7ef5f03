"""Our reference model against the official ``hiera`` package (PyPI ``hiera-transformer``), same random weights."""

from __future__ import annotations

import os

import pytest
import torch

import hiera_fast as H
from helpers import max_abs, randomize_, tiny_image_config, tiny_mae_config, tiny_video_config

hiera = pytest.importorskip("hiera", reason="the official package (pip install hiera-transformer) is needed")


def _load(cls, official: torch.nn.Module, cfg: H.HieraConfig, tmp_path, name="ckpt.pth"):
    path = os.path.join(tmp_path, name)
    torch.save({"model_state": official.state_dict()}, path)
    return cls.from_pretrained(path, config=cfg)


@pytest.mark.parametrize("preset", ["hiera_tiny_224", "hiera_base_plus_224"])  # head dims 96 and 56
def test_image_classifier_matches_official(preset, tmp_path):
    cfg = H.HieraConfig.from_preset(preset, depths=(1, 2, 2, 1), num_labels=10)
    official = randomize_(hiera.Hiera(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads[0], stages=cfg.depths,
                                      num_classes=10), std=0.05)
    ours = _load(H.HieraForImageClassification, official, cfg, tmp_path)
    x = torch.randn(2, 3, 224, 224)
    official.eval(), ours.eval()
    with torch.no_grad():
        probs = official(x)  # the official head applies softmax in eval
        _, feats = official(x, return_intermediates=True)
        out = ours(x, output_hidden_states=True)
    assert max_abs(out.logits.softmax(-1), probs) <= 1e-5
    official.train()  # train mode: logits, no softmax (no dropout/drop-path configured)
    with torch.no_grad():
        assert max_abs(ours(x).logits, official(x)) <= 1e-4
    for ref, got in zip(feats, out.reshaped_hidden_states[1:]):
        assert got.shape == ref.shape
        assert max_abs(got, ref) <= 1e-4


def test_video_matches_official(tmp_path):
    cfg = tiny_video_config()
    official = randomize_(hiera.Hiera(
        input_size=cfg.image_size, embed_dim=16, num_heads=2, stages=cfg.depths, num_classes=5, q_stride=(1, 2, 2),
        mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3),
        sep_pos_embed=True), std=0.1).train()
    ours = _load(H.HieraForImageClassification, official, cfg, tmp_path)
    x = torch.randn(2, 3, *cfg.image_size)
    with torch.no_grad():
        assert max_abs(ours(x).logits, official(x)) <= 1e-4


def test_mae_matches_official(tmp_path):
    cfg = tiny_mae_config()
    official = randomize_(hiera.MaskedAutoencoderHiera(
        input_size=cfg.image_size, embed_dim=16, num_heads=1, stages=cfg.depths, q_pool=2, decoder_embed_dim=16,
        decoder_depth=1, decoder_num_heads=2), std=0.1)
    ours = _load(H.HieraForPreTraining, official, cfg, tmp_path)
    x = torch.randn(3, 3, 64, 64)
    noise = torch.rand(3, 4)
    out = ours(x, noise=noise)
    keep = ours.hiera.random_masking(3, 4, noise, "cpu")[0]  # the same mask, window level
    loss, pred, label, mask = official(x, mask=keep)
    assert abs(out.loss.item() - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))
    masked = ~out.bool_masked_pos
    assert max_abs(out.logits[masked], pred) <= 1e-4


def test_mae_video_matches_official(tmp_path):
    cfg = tiny_video_config(num_query_pool=2, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2,
                            image_size=(4, 64, 64))
    official = randomize_(hiera.MaskedAutoencoderHiera(
        input_size=cfg.image_size, embed_dim=16, num_heads=2, stages=cfg.depths, q_pool=2, q_stride=(1, 2, 2),
        mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3),
        sep_pos_embed=True, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), std=0.1)
    ours = _load(H.HieraForPreTraining, official, cfg, tmp_path)
    x = torch.randn(2, 3, *cfg.image_size)
    num_windows = 2 * 2 * 2
    noise = torch.rand(2, num_windows)
    out = ours(x, noise=noise)
    loss, *_ = official(x, mask=ours.hiera.random_masking(2, num_windows, noise, "cpu")[0])
    assert abs(out.loss.item() - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))


def test_backbone_matches_official_intermediates(tmp_path):
    cfg = tiny_image_config(out_features=["stem", "stage1", "stage2", "stage3", "stage4"])
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=cfg.depths,
                                      num_classes=7), std=0.1).eval()
    ours = _load(H.HieraBackbone, official, cfg, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats = official(x, return_intermediates=True)
        maps = ours(x).feature_maps
    assert len(maps) == 5
    for norm, ref, got in zip(list(ours.hidden_states_norms.values())[1:], feats, maps[1:]):
        expected = norm(ref).movedim(-1, 1)  # [B, C, H, W]
        assert got.shape == expected.shape
        assert max_abs(got, expected) <= 1e-4
    # stem: patch embedding + position embedding in spatial order, before any block
    stem = official.patch_embed(x) + official.get_pos_embed()
    stem = ours.hidden_states_norms["stem"](stem).view(2, 16, 16, 16).movedim(-1, 1)
    assert max_abs(maps[0], stem) <= 1e-5


def test_masked_intermediates_match_official(tmp_path):
    cfg = tiny_image_config()
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=cfg.depths,
                                      num_classes=7), std=0.1).eval()
    ours = _load(H.HieraModel, official, cfg, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    with torch.no_grad():
        last, feats = official(x, mask=mask, return_intermediates=True)
        out = ours(x, bool_masked_pos=mask, output_hidden_states=True)
    assert max_abs(out.last_hidden_state, last) <= 1e-4
    for ref, got in zip(feats, out.reshaped_hidden_states[1:]):
        assert got.shape == ref.shape  # [B, #kept MUs, MUy, MUx, C]
        assert max_abs(got, ref) <= 1e-4


def test_gradients_match_official(tmp_path):
    cfg = tiny_image_config()
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=cfg.depths,
                                      num_classes=7), std=0.1).train()
    ours = _load(H.HieraForImageClassification, official, cfg, tmp_path).train()
    x = torch.randn(3, 3, 64, 64)
    labels = torch.randint(0, 7, (3,))
    torch.nn.functional.cross_entropy(official(x), labels).backward()
    ours(x, labels=labels).loss.backward()
    ref = dict(official.named_parameters())
    from hiera_fast.weights import official_to_transformers_keys

    names = official_to_transformers_keys({k: k for k in ref}, cfg)
    ours_params = dict(ours.named_parameters())
    for mine, theirs in names.items():
        mine = mine if mine.startswith("classifier") else "hiera." + mine
        g_ref, g_got = ref[theirs].grad, ours_params[mine].grad
        assert max_abs(g_got, g_ref) <= 1e-4 * max(1.0, g_ref.abs().max().item()), mine
