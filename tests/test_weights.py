"""Checkpoint loading/saving: formats, configs, clear errors."""

from __future__ import annotations

import os

import pytest
import torch

import hiera_fast as H
from helpers import max_abs, randomize_, tiny_image_config, tiny_mae_config


def test_save_and_load_round_trip(tmp_path):
    model = randomize_(H.HieraForPreTraining(tiny_mae_config()))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    again = H.HieraForPreTraining.from_pretrained(tmp_path)
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_bare_state_dict_needs_config(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(H.HieraModel(tiny_image_config()).state_dict(), path)
    with pytest.raises(ValueError, match="config="):
        H.HieraModel.from_pretrained(path)
    H.HieraModel.from_pretrained(path, config=tiny_image_config())  # works with one


def test_preset_name_as_config(tmp_path):
    cfg = H.HieraConfig.from_preset("hiera_tiny_224")
    path = tmp_path / "sd.pth"
    torch.save({"model_state": H.HieraModel(cfg).state_dict()}, path)
    model = H.HieraModel.from_pretrained(path, config="hiera_tiny_224")
    assert model.config.depths == (1, 2, 7, 2)


def test_wrong_config_lists_the_keys(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(H.HieraModel(tiny_image_config()).state_dict(), path)
    with pytest.raises(ValueError, match="missing") as err:
        H.HieraModel.from_pretrained(path, config=tiny_image_config(depths=(1, 2, 3, 1)))
    assert "encoder.stages.2.layers.2" in str(err.value)
    with pytest.raises(ValueError, match="wrong shape"):
        H.HieraModel.from_pretrained(path, config=tiny_image_config(embed_dim=32))


def test_unexpected_keys_are_an_error(tmp_path):
    state = H.HieraModel(tiny_image_config()).state_dict()
    state["encoder.stages.0.layers.0.surprise"] = torch.zeros(1)
    torch.save(state, tmp_path / "sd.pth")
    with pytest.raises(ValueError, match="unexpected.*surprise"):
        H.HieraModel.from_pretrained(tmp_path / "sd.pth", config=tiny_image_config())


def test_other_num_labels_drops_the_head(tmp_path):
    model = randomize_(H.HieraForImageClassification(tiny_image_config(num_labels=7)))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="classifier"):
        other = H.HieraForImageClassification.from_pretrained(tmp_path, config=tiny_image_config(num_labels=3))
    assert other.classifier.out_features == 3
    assert torch.equal(other.hiera.encoder.stages[1].layers[0].attn.qkv.weight,
                       model.hiera.encoder.stages[1].layers[0].attn.qkv.weight)


def test_mae_checkpoint_into_encoder(tmp_path):
    mae = randomize_(H.HieraForPreTraining(tiny_mae_config()))
    mae.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="decoder"):
        enc = H.HieraModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        all_visible = torch.ones(1, 4, dtype=torch.bool)
        assert max_abs(enc(x).last_hidden_state, mae.hiera(x, bool_masked_pos=all_visible).last_hidden_state) == 0


def test_official_hub_mixin_directory(tmp_path):
    hiera = pytest.importorskip("hiera")
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 2, 1),
                                      num_classes=7), std=0.1).train()
    official.save_pretrained(tmp_path)  # huggingface_hub's PyTorchModelHubMixin: config.json + safetensors
    ours = H.HieraForImageClassification.from_pretrained(tmp_path)
    assert ours.config.depths == (1, 2, 2, 1) and ours.config.num_labels == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(ours(x).logits, official(x)) <= 1e-4


def test_official_hub_mixin_directory_with_default_stages(tmp_path):
    """The hub mixin writes only the arguments that were passed: no ``stages`` here (Hiera-B's depths)."""
    hiera = pytest.importorskip("hiera")
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, num_classes=5), std=0.1).train()
    official.save_pretrained(tmp_path)
    ours = H.HieraForImageClassification.from_pretrained(tmp_path)
    assert ours.config.depths == (2, 3, 16, 3) and ours.config.image_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(ours(x).logits, official(x)) <= 1e-4


def test_foreign_config_json_is_an_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    H.HieraModel(tiny_image_config()).save_pretrained(tmp_path)
    transformers.ViTConfig().save_pretrained(tmp_path)  # replaces config.json
    with pytest.raises(ValueError, match="model_type is 'vit'"):
        H.HieraModel.from_pretrained(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'facebook/hiera-tiny-224-hf'"):
        H.HieraModel.from_pretrained("facebook/hiera-tiny-224-hf")


def test_missing_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        H.HieraModel.from_pretrained("./no/such/thing.pth")
