"""HieraConfig: presets, validation at construction, config.json round trips."""

from __future__ import annotations

import json

import pytest
import torch

import hiera_fast as H
from helpers import peer

ZOO = {  # name: (embed_dim, heads of stage 1, depths, video)
    "hiera_tiny_224": (96, 1, (1, 2, 7, 2), False),
    "hiera_small_224": (96, 1, (1, 2, 11, 2), False),
    "hiera_base_224": (96, 1, (2, 3, 16, 3), False),
    "hiera_base_plus_224": (112, 2, (2, 3, 16, 3), False),
    "hiera_large_224": (144, 2, (2, 6, 36, 4), False),
    "hiera_huge_224": (256, 4, (2, 6, 36, 4), False),
    "hiera_base_16x224": (96, 1, (2, 3, 16, 3), True),
    "hiera_base_plus_16x224": (112, 2, (2, 3, 16, 3), True),
    "hiera_large_16x224": (144, 2, (2, 6, 36, 4), True),
    "hiera_huge_16x224": (256, 4, (2, 6, 36, 4), True),
}


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("mae", [False, True])
def test_presets_match_the_official_zoo(name, mae):
    dim, heads, depths, video = ZOO[name]
    cfg = H.HieraConfig.from_preset(("mae_" if mae else "") + name)
    assert (cfg.embed_dim, cfg.num_heads[0], cfg.depths) == (dim, heads, depths)
    assert cfg.num_heads == tuple(heads * 2**i for i in range(4))
    assert cfg.num_query_pool == (2 if mae else 3)
    if mae:
        assert (cfg.decoder_hidden_size, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    if video:
        assert cfg.image_size == (16, 224, 224) and cfg.sep_pos_embed and cfg.num_labels == 400
        assert cfg.query_stride == (1, 2, 2) and cfg.masked_unit_size == (1, 8, 8)
    else:
        assert cfg.image_size == (224, 224) and not cfg.sep_pos_embed


def test_preset_head_dims():
    head_dims = {n: H.HieraConfig.from_preset(n).embed_dim // H.HieraConfig.from_preset(n).num_heads[0] for n in ZOO}
    assert head_dims["hiera_base_224"] == 96 and head_dims["hiera_base_plus_224"] == 56
    assert head_dims["hiera_large_224"] == 72 and head_dims["hiera_huge_224"] == 64


def test_integral_values_are_accepted_as_ints():
    """What JSON or numpy may hand over: 96.0 and numpy ints are ints, 0 / 1 are bools."""
    import numpy as np

    config = H.HieraConfig(embed_dim=96.0, depths=[np.int64(2), 3, 16, 3], masked_unit_attention=[1, 1, 0, 0])
    assert config.embed_dim == 96 and type(config.embed_dim) is int
    assert config.depths == (2, 3, 16, 3) and all(type(d) is int for d in config.depths)
    assert config.masked_unit_attention == (True, True, False, False)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown Hiera preset"):
        H.HieraConfig.from_preset("hiera_gigantic_224")


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=(225, 224)), "image_size"),
    (dict(image_size=(72, 72)), "image_size"),  # 18 tokens, not a multiple of 2**3 (the unroll)
    (dict(image_size=(256, 256), masked_unit_size=(16, 16)), "masked_unit_size"),  # beyond the 8x8 unrolled block
    (dict(masked_unit_size=(4, 8)), "masked_unit_size"),  # its 32-token windows are 8x4 blocks
    (dict(depths=(1, 1), num_heads=(1, 2), masked_unit_attention=(True, False), num_query_pool=1),
     "masked_unit_size"),  # one unroll: 2x2 blocks, not 8x8
    (dict(masked_unit_size=(4, 4), masked_unit_attention=(True, True, True, False)),
     "masked_unit_attention"),  # stage 4 attends within 4x4 units pooled three times: below one token
    (dict(masked_unit_size=(0, 8)), "masked_unit_size"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(drop_path_rate=-0.1), "drop_path_rate"),
    (dict(patch_size=(0, 7)), "patch_size"),
    (dict(patch_stride=(4, 0)), "patch_stride"),
    (dict(patch_padding=(-1, 3)), "patch_padding"),
    (dict(patch_padding=(0, 0)), "patch_padding"),  # a 7x7 conv without padding gives 55, not 56, tokens
    (dict(patch_size=(11, 11)), "patch_size"),  # 55 tokens
    (dict(num_labels=-1), "num_labels"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(image_size="224"), "image_size"),
    (dict(out_indices=[5]), "out_indices"),
    (dict(out_indices=[-6]), "out_indices"),
    (dict(decoder_hidden_size=16, decoder_depth=-1, decoder_num_heads=2), "decoder_depth"),
    (dict(num_heads=(1, 2, 5, 8)), "num_heads"),
    (dict(num_heads=(1, 2, 4)), "num_heads"),
    (dict(num_query_pool=4), "num_query_pool"),
    (dict(query_stride=(2, 2, 2)), "query_stride"),
    (dict(image_size=(224,), patch_size=(7,)), "image_size"),
    (dict(embed_dim_multiplier=1.0), "embed_dim_multiplier"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(decoder_hidden_size=500, decoder_depth=1, decoder_num_heads=16), "decoder_num_heads"),
    (dict(out_features=["stage9"]), "out_features"),
    (dict(sep_pos_embed=True), "sep_pos_embed"),
    # wrong types: never rounded (1.9 -> 1) nor read by truthiness ("false" -> True), nor failing inside torch
    (dict(embed_dim=True), "embed_dim"),
    (dict(embed_dim=16.5), "embed_dim"),  # was blamed on num_heads[1] ("dim 33")
    (dict(num_channels=3.7), "num_channels"),
    (dict(depths=(1.9, 2, 2, 1)), "depths"),
    (dict(depths=None), "depths"),
    (dict(masked_unit_attention=("false",) * 4), "masked_unit_attention"),
    (dict(decoder_hidden_size=16.5, decoder_depth=1, decoder_num_heads=2), "decoder_hidden_size"),
    (dict(sep_pos_embed="no"), "sep_pos_embed"),
    (dict(normalize_pixel_loss=None), "normalize_pixel_loss"),
])
def test_bad_configs_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        H.HieraConfig(**overrides)


@pytest.mark.parametrize("image_size, patch_size, patch_stride, patch_padding", [
    ((224, 224), (7, 7), (4, 4), (3, 3)), ((64, 64), (4, 4), (4, 4), (0, 0)), ((64, 64), (5, 3), (4, 2), (1, 1)),
    ((64, 64), (7, 7), (4, 4), (0, 0)), ((64, 64), (9, 9), (4, 4), (3, 3)), ((64, 64), (11, 11), (4, 4), (3, 3)),
    ((64, 64), (3, 3), (4, 4), (1, 1)),
])
def test_patch_geometry_matches_the_conv(image_size, patch_size, patch_stride, patch_padding):
    """Accepted exactly when the real patch-embedding conv gives image_size // patch_stride tokens."""
    conv = torch.nn.Conv2d(1, 1, patch_size, patch_stride, patch_padding)
    tokens = tuple(conv(torch.zeros(1, 1, *image_size)).shape[2:])
    kwargs = dict(image_size=image_size, patch_size=patch_size, patch_stride=patch_stride, patch_padding=patch_padding,
                  depths=(1, 1), num_heads=(1, 2), masked_unit_size=(2, 2), masked_unit_attention=(False, False),
                  num_query_pool=1)
    if tokens == tuple(i // s for i, s in zip(image_size, patch_stride)):
        assert H.HieraConfig(**kwargs).tokens_spatial_shape == tokens
    else:
        with pytest.raises(ValueError, match="patch_size"):
            H.HieraConfig(**kwargs)


@pytest.mark.parametrize("out_indices", [[-1], [0, -2], [-5, 4], [5], [-6], [1, 7]])
def test_out_indices_like_transformers(out_indices):
    transformers = peer("transformers")
    try:
        theirs = transformers.HieraConfig(out_indices=out_indices).out_features
    except (ValueError, IndexError):  # transformers: ValueError for 5, IndexError for -6
        with pytest.raises(ValueError, match="out_indices"):
            H.HieraConfig(out_indices=out_indices)
    else:
        assert H.HieraConfig(out_indices=out_indices).out_features == theirs


def test_from_dict_rejects_other_models():
    transformers = peer("transformers")
    with pytest.raises(ValueError, match="model_type is 'vit'"):
        H.HieraConfig.from_dict(transformers.ViTConfig().to_dict())
    with pytest.raises(ValueError, match="model_type"):
        H.HieraConfig.from_dict({"embed_dim": 96})
    assert H.HieraConfig.from_dict(transformers.HieraConfig(embed_dim=64).to_dict()).embed_dim == 64
    with pytest.raises(ValueError, match="unknown Hiera preset"):  # timm's windowed-position variant
        H.HieraConfig.from_dict({"architecture": "hiera_small_abswin_256", "num_classes": 5})
    with pytest.raises(ValueError, match="model_args"):
        H.HieraConfig.from_dict({"architecture": "hiera_tiny_224", "model_args": {"embed_dim": 64}})


def test_config_json_round_trip(tmp_path):
    cfg = H.HieraConfig.from_preset("mae_hiera_base_16x224", out_features=["stage2", "stage4"])
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "hiera" and data["sep_pos_embed"] is True
    again = H.HieraConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.out_indices == [2, 4]


def test_reads_transformers_config_json(tmp_path):
    transformers = peer("transformers")
    theirs = transformers.HieraConfig(embed_dim=112, num_heads=[2, 4, 8, 16], num_labels=3,
                                      out_features=["stage1", "stage3"])
    theirs.save_pretrained(tmp_path)
    ours = H.HieraConfig.from_pretrained(tmp_path)
    assert ours.embed_dim == 112 and ours.num_heads == (2, 4, 8, 16) and ours.num_labels == 3
    assert ours.out_features == ["stage1", "stage3"] and ours.out_indices == [1, 3]
