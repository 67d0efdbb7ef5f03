"""Our reference model against transformers' Hiera classes, loaded from a directory transformers saved."""

from __future__ import annotations

import pytest
import torch

import hiera_fast as H
from hiera_fast.model import stage_geometry
from hiera_fast.unroll import reroll
from helpers import max_abs, peer, randomize_

transformers = peer("transformers")

KW = dict(embed_dim=16, depths=[1, 2, 2, 1], num_heads=[1, 2, 4, 8], image_size=[64, 64], decoder_hidden_size=16,
          decoder_depth=2, decoder_num_heads=2, num_labels=5)


def _theirs(tcls, **overrides):
    """A transformers model of ``KW`` (``overrides`` replace entries), random weights, in eval mode."""
    return randomize_(tcls(transformers.HieraConfig(**{**KW, **overrides})), std=0.1).eval()


def _pair(tcls, hcls, tmp_path, **overrides):
    theirs = _theirs(tcls, **overrides)
    theirs.save_pretrained(tmp_path)
    ours = hcls.from_pretrained(tmp_path).eval()
    return theirs, ours


def test_model_matches_transformers(tmp_path):
    theirs, ours = _pair(transformers.HieraModel, H.HieraModel, tmp_path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = theirs(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    assert max_abs(a.last_hidden_state, b.last_hidden_state) <= 1e-4
    assert max_abs(a.pooler_output, b.pooler_output) <= 1e-4
    assert len(a.hidden_states) == len(b.hidden_states)
    for p, q in zip(a.reshaped_hidden_states, b.reshaped_hidden_states, strict=True):
        assert p.shape == q.shape and max_abs(p, q) <= 1e-4


@pytest.mark.parametrize("kind", ["class ids", "multi-hot", "regression"])
def test_classifier_matches_transformers(tmp_path, kind):
    num_labels = 1 if kind == "regression" else 5
    theirs, ours = _pair(transformers.HieraForImageClassification, H.HieraForImageClassification, tmp_path,
                         num_labels=num_labels)
    x = torch.randn(3, 3, 64, 64)
    labels = {"class ids": torch.randint(0, 5, (3,)), "multi-hot": torch.randint(0, 2, (3, 5)).float(),
              "regression": torch.randn(3)}[kind]
    with torch.no_grad():
        a, b = theirs(x, labels=labels), ours(x, labels=labels)
    assert max_abs(a.logits, b.logits) <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-4


@pytest.mark.parametrize("normalize", [True, False])
def test_pretraining_matches_transformers(tmp_path, normalize):
    theirs, ours = _pair(transformers.HieraForPreTraining, H.HieraForPreTraining, tmp_path,
                         normalize_pixel_loss=normalize)
    x = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 4)
    with torch.no_grad():
        a, b = theirs(x, noise=noise), ours(x, noise=noise)
    assert torch.equal(a.bool_masked_pos, b.bool_masked_pos)
    assert torch.equal(a.ids_restore, b.ids_restore)
    assert max_abs(a.logits, b.logits) <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-4


def test_transformers_reads_our_save(tmp_path):
    ours = randomize_(H.HieraForImageClassification(H.HieraConfig(**KW)), std=0.1).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.HieraForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(theirs(x).logits, ours(x).logits) <= 1e-4
    assert theirs.state_dict().keys() == ours.state_dict().keys()  # our names are transformers' names
    again = H.HieraForImageClassification.from_pretrained(tmp_path)
    mine, loaded = ours.state_dict(), again.state_dict()
    assert mine.keys() == loaded.keys()
    for k, v in mine.items():
        assert torch.equal(v, loaded[k]), k


def test_transformers_backbone_skips_unroll_ours_does_not(tmp_path):
    """transformers' backbone feeds raster-order tokens to an encoder that reads them as unrolled: its feature maps
    are exactly ours computed without the unroll, and differ from ours (test_vs_official proves ours right)."""
    stages = ["stage1", "stage2", "stage3", "stage4"]
    theirs, ours = _pair(transformers.HieraBackbone, H.HieraBackbone, tmp_path, out_features=stages)
    x = torch.randn(2, 3, 64, 64)
    config = ours.config
    tokens = config.tokens_spatial_shape
    with torch.no_grad():
        got, mine = theirs(x).feature_maps, ours(x).feature_maps
        raster = ours.embeddings(x, None, None, tokens)  # [B, N, C], never unrolled
        hidden = (raster, *ours.encoder(raster))
        emulated = []
        for name, index in zip(config.out_features, config.out_indices, strict=True):
            size, schedule = stage_geometry(config, tokens, max(index - 1, 0))
            emulated.append(ours.hidden_states_norms[name](reroll(hidden[index], size, schedule)).movedim(-1, 1))
    assert len(got) == len(mine) == len(emulated) == 4
    for a, b, e in zip(got, mine, emulated, strict=True):
        assert a.shape == b.shape == e.shape
        assert max_abs(a, e) <= 1e-4  # transformers computes exactly this
    assert max_abs(got[0], mine[0]) > 1e-2  # theirs is spatially scrambled, ours is not


def test_interpolate_pos_encoding_matches_transformers(tmp_path):
    theirs, ours = _pair(transformers.HieraModel, H.HieraModel, tmp_path)
    x = torch.randn(2, 3, 96, 96)  # 24x24 tokens instead of 16x16
    with torch.no_grad():
        a = theirs(x, interpolate_pos_encoding=True)
        b = ours(x, interpolate_pos_encoding=True)
    assert a.last_hidden_state.shape == b.last_hidden_state.shape
    assert max_abs(a.last_hidden_state, b.last_hidden_state) <= 1e-4


def test_transformers_default_two_labels(tmp_path):
    """transformers writes no num_labels / id2label for its default of 2 labels: that is 2 here too (it was 1000, a
    fresh head replacing the checkpoint's)."""
    config = transformers.HieraConfig(**{k: v for k, v in KW.items() if k != "num_labels"})  # its default: 2
    theirs = randomize_(transformers.HieraForImageClassification(config), std=0.1).eval()
    theirs.save_pretrained(tmp_path)
    ours = H.HieraForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.num_labels == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = theirs(x).logits
        assert max_abs(ours(x).logits, ref) <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("problem_type, labels", [
    ("regression", torch.randn(2, 3)), ("multi_label_classification", torch.randint(0, 2, (2, 3)).float()),
    ("single_label_classification", torch.tensor([0, 2])), (None, torch.tensor([1, 2])),
])
def test_problem_type_picks_transformers_loss(tmp_path, problem_type, labels):
    """config.json's problem_type picks the loss as in transformers (float targets with regression: MSE, not the
    BCE that the labels' dtype alone would pick)."""
    theirs = _theirs(transformers.HieraForImageClassification, num_labels=3, problem_type=problem_type)
    theirs.save_pretrained(tmp_path)
    ours = H.HieraForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.problem_type == problem_type
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = theirs(x, labels=labels).loss
        assert abs(ours(x, labels=labels).loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_sharded_transformers_checkpoint(tmp_path):
    """``save_pretrained(max_shard_size=...)`` writes shards and an index: all shards load (no weights were found)."""
    theirs = _theirs(transformers.HieraForImageClassification)
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = H.HieraForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = theirs(x).logits
        assert max_abs(ours(x).logits, ref) <= 1e-5 * ref.abs().max().item()


def test_save_writes_the_weights_dtype(tmp_path):
    """A model loaded from an fp16 checkpoint and saved in fp32 says float32 in its config.json (the source's float16
    stayed, and transformers then loaded the fp32 weights in fp16)."""
    theirs = _theirs(transformers.HieraForImageClassification)
    theirs.half().save_pretrained(tmp_path / "fp16")
    ours = H.HieraForImageClassification.from_pretrained(tmp_path / "fp16")
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.HieraForImageClassification.from_pretrained(tmp_path / "ours")
    assert again.dtype == torch.float32
