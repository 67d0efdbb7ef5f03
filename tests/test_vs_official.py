"""Our reference model against the official ``hiera`` package (PyPI ``hiera-transformer``), same random weights."""

from __future__ import annotations

import math
import os

import pytest
import torch

import hiera_fast as H
from helpers import max_abs, peer, randomize_, tiny_image_config, tiny_mae_config, tiny_video_config

hiera = peer("hiera")


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
    assert len(feats) == len(out.reshaped_hidden_states) - 1 == len(cfg.depths)
    for ref, got in zip(feats, out.reshaped_hidden_states[1:], strict=True):
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


def _tiny_mae_pair(tmp_path):
    """A random official ``MaskedAutoencoderHiera`` of :func:`tiny_mae_config` and our model loaded from it."""
    cfg = tiny_mae_config()
    official = randomize_(hiera.MaskedAutoencoderHiera(
        input_size=cfg.image_size, embed_dim=16, num_heads=1, stages=cfg.depths, q_pool=2, decoder_embed_dim=16,
        decoder_depth=1, decoder_num_heads=2), std=0.1)
    return official, _load(H.HieraForPreTraining, official, cfg, tmp_path)


def test_mae_matches_official(tmp_path):
    official, ours = _tiny_mae_pair(tmp_path)
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
    assert len(maps) == 5 and len(feats) == 4
    for norm, ref, got in zip(list(ours.hidden_states_norms.values())[1:], feats, maps[1:], strict=True):
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
    assert len(feats) == len(out.reshaped_hidden_states) - 1 == len(cfg.depths)
    for ref, got in zip(feats, out.reshaped_hidden_states[1:], strict=True):
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
    from hiera_fast.checkpoints.hiera import official_to_transformers_keys

    names = official_to_transformers_keys({k: k for k in ref}, cfg)
    ours_params = dict(ours.named_parameters())
    for mine, theirs in names.items():
        mine = mine if mine.startswith("classifier") else "hiera." + mine
        g_ref, g_got = ref[theirs].grad, ours_params[mine].grad
        assert max_abs(g_got, g_ref) <= 1e-4 * max(1.0, g_ref.abs().max().item()), mine


def _official_windows(tokens, q_stride, unrolls, mu) -> tuple[bool, bool]:
    """Through the official ``Unroll``: whether every MaskUnitAttention window (the tokens with one
    ``n % num_windows``) is one ``mu``-shaped mask unit, and whether window ``w`` is unit ``w`` in raster order (what
    the masked patch conv and the MAE decoder assume)."""
    from hiera.hiera_utils import Unroll

    raster = torch.arange(math.prod(tokens), dtype=torch.float64).view(1, -1, 1)
    order = Unroll(tokens, [1] * len(tokens), [q_stride] * unrolls)(raster).view(-1).long()  # raster id of token n
    coords = torch.stack(torch.unravel_index(order, tokens), -1)  # [N, D]
    num_windows = order.numel() // math.prod(mu)
    unit = (coords // torch.tensor(mu)).view(-1, num_windows, len(tokens))  # [T, nw, D] mask-unit coords
    if not bool((unit == unit[:1]).all()):
        return False, False
    grid = [t // m for t, m in zip(tokens, mu)]
    unit_ids = sum(unit[0, :, i] * math.prod(grid[i + 1:]) for i in range(len(grid)))
    return True, torch.equal(unit_ids, torch.arange(num_windows))


@pytest.mark.parametrize("tokens, q_stride, unrolls, mu", [
    ((16, 16), (2, 2), 3, (8, 8)), ((16, 16), (2, 2), 3, (4, 4)), ((16, 16), (2, 2), 3, (2, 2)),
    ((16, 16), (2, 2), 3, (1, 1)), ((16, 16), (2, 2), 3, (8, 4)), ((16, 16), (2, 2), 3, (4, 8)),
    ((16, 16), (2, 2), 3, (2, 8)), ((16, 16), (2, 2), 3, (16, 16)), ((16, 16), (2, 2), 3, (16, 8)),
    ((32, 32), (2, 2), 3, (16, 16)), ((16, 16), (2, 2), 2, (4, 4)), ((16, 16), (2, 2), 2, (8, 8)),
    ((16, 16), (2, 2), 1, (8, 8)), ((16, 16), (2, 2), 1, (2, 2)), ((8, 16), (1, 2), 3, (1, 8)),
    ((4, 8, 8), (1, 2, 2), 3, (1, 8, 8)), ((4, 8, 8), (1, 2, 2), 3, (1, 4, 4)), ((4, 8, 8), (1, 2, 2), 3, (2, 8, 8)),
])
def test_mask_unit_rule_follows_official_unroll(tokens, q_stride, unrolls, mu):
    """HieraConfig accepts masked_unit_size exactly when the official layout's windows are mask units, and allows
    masking exactly when they are also in raster order. Windows larger than ``q_stride**unrolls`` are units only
    when they span a whole token dim (``(16, 8)`` here), so at one image size only: rejected on purpose."""
    blocks, raster = _official_windows(tokens, q_stride, unrolls, mu)
    video = len(tokens) == 3
    stages = unrolls + 1
    kwargs = dict(image_size=[t * s for t, s in zip(tokens, (2, 4, 4) if video else (4, 4))],
                  patch_size=(3, 7, 7) if video else (7, 7), patch_stride=(2, 4, 4) if video else (4, 4),
                  patch_padding=(1, 3, 3) if video else (3, 3), query_stride=q_stride, masked_unit_size=mu,
                  depths=(1,) * stages, num_heads=(1, 2, 4, 8)[:stages], masked_unit_attention=(False,) * stages,
                  num_query_pool=unrolls, embed_dim=16)
    if blocks and all(m <= q**unrolls for m, q in zip(mu, q_stride)):
        assert H.HieraConfig(**kwargs).supports_masking == raster
    else:
        with pytest.raises(ValueError, match="masked_unit_size"):
            H.HieraConfig(**kwargs)


def test_mask_unit_4x4_matches_official(tmp_path):
    """4x4 mask units with three unrolls: 4x4 mask-unit attention windows, as the official model; masking is refused
    (the official model would drop other tokens than its masked conv zeroes)."""
    cfg = tiny_image_config(masked_unit_size=(4, 4))
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=cfg.depths,
                                      mask_unit_size=(4, 4), num_classes=7), std=0.1).train()
    ours = _load(H.HieraForImageClassification, official, cfg, tmp_path)
    assert ours.hiera.encoder.stages[0].layers[0].attn.window_size == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(ours(x).logits, official(x)) <= 1e-4
        _, feats = official(x, return_intermediates=True)
        got = ours(x, output_hidden_states=True).reshaped_hidden_states[1:]
    assert len(feats) == len(got) == 4
    for ref, mine in zip(feats, got, strict=True):
        assert mine.shape == ref.shape and max_abs(mine, ref) <= 1e-4
    with pytest.raises(ValueError, match="masked_unit_size"):
        ours.hiera(x, bool_masked_pos=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="masked_unit_size"):
        H.HieraForPreTraining(tiny_mae_config(masked_unit_size=(4, 4)))


def test_mae_mask_unit_4x4_three_stages_matches_official(tmp_path):
    """Three stages unroll twice, so 4x4 units are the whole unrolled block: masking is valid."""
    from hiera_fast.checkpoints.hiera import official_config_to_hiera_config

    kwargs = dict(input_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 1), q_pool=2, mask_unit_size=(4, 4),
                  mask_unit_attn=(True, True, False), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    official = randomize_(hiera.MaskedAutoencoderHiera(**kwargs), std=0.1)
    cfg = official_config_to_hiera_config(kwargs)
    assert cfg.supports_masking
    ours = _load(H.HieraForPreTraining, official, cfg, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    out = ours(x, noise=noise)
    loss, pred, *_ = official(x, mask=out.bool_masked_pos)
    assert abs(out.loss.item() - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))
    assert max_abs(out.logits[~out.bool_masked_pos], pred) <= 1e-4


def test_compiled_masking_matches_official(tmp_path):
    """bool_masked_pos under torch.compile(fullgraph=True): HieraForPreTraining's shapes come from mask_ratio;
    HieraModel's from keep_ids (without them it names keep_ids instead of tracing a data-dependent count)."""
    official, ours = _tiny_mae_pair(tmp_path)
    x = torch.randn(3, 3, 64, 64)
    mask = torch.rand(3, 4).argsort(1) < 1  # mask_ratio 0.6 keeps int(4 * 0.4) = 1 unit
    torch._dynamo.reset()
    out = torch.compile(ours, fullgraph=True, backend="eager")(x, bool_masked_pos=mask)
    loss, pred, *_ = official(x, mask=mask)
    assert abs(out.loss.item() - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))
    assert max_abs(out.logits[~out.bool_masked_pos], pred) <= 1e-4  # token-level visibility

    mask = torch.rand(3, 4).argsort(1) < 2  # any count for the encoder; keep_ids fix it
    keep_ids = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :2]
    with torch.no_grad():
        last, feats = hiera.Hiera.forward(official, x, mask=mask, return_intermediates=True)  # its encoder
        torch._dynamo.reset()
        encoder = torch.compile(ours.hiera, fullgraph=True, backend="eager")
        got = encoder(x, bool_masked_pos=mask, keep_ids=keep_ids, output_hidden_states=True)
        with pytest.raises(Exception, match="keep_ids"):
            encoder(x, bool_masked_pos=mask)
    assert max_abs(got.last_hidden_state, last) <= 1e-4
    assert max_abs(got.reshaped_hidden_states[-1], feats[-1]) <= 1e-4
