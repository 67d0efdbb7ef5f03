"""HieraConfig: presets, validation at construction, config.json round trips."""

from __future__ import annotations

import json

import pytest

import hiera_fast as H

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


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown Hiera preset"):
        H.HieraConfig.from_preset("hiera_gigantic_224")


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=(225, 224)), "image_size"),
    (dict(image_size=(72, 72)), "masked_unit_size"),  # 18 tokens, not a multiple of 8
    (dict(masked_unit_size=(4, 4)), "masked_unit_size"),  # must be divisible by 2**3
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
])
def test_bad_configs_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        H.HieraConfig(**overrides)


def test_config_json_round_trip(tmp_path):
    cfg = H.HieraConfig.from_preset("mae_hiera_base_16x224", out_features=["stage2", "stage4"])
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "hiera" and data["sep_pos_embed"] is True
    again = H.HieraConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.out_indices == [2, 4]


def test_reads_transformers_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.HieraConfig(embed_dim=112, num_heads=[2, 4, 8, 16], num_labels=3,
                                      out_features=["stage1", "stage3"])
    theirs.save_pretrained(tmp_path)
    ours = H.HieraConfig.from_pretrained(tmp_path)
    assert ours.embed_dim == 112 and ours.num_heads == (2, 4, 8, 16) and ours.num_labels == 3
    assert ours.out_features == ["stage1", "stage3"] and ours.out_indices == [1, 3]
