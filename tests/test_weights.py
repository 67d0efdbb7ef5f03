"""Checkpoint loading/saving: formats, configs, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import hiera_fast as H
from helpers import max_abs, peer, randomize_, tiny_image_config, tiny_mae_config


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
    hiera = peer("hiera")
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
    hiera = peer("hiera")
    official = randomize_(hiera.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, num_classes=5), std=0.1).train()
    official.save_pretrained(tmp_path)
    ours = H.HieraForImageClassification.from_pretrained(tmp_path)
    assert ours.config.depths == (2, 3, 16, 3) and ours.config.image_size == (64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(ours(x).logits, official(x)) <= 1e-4


def test_foreign_config_json_is_an_error(tmp_path):
    transformers = peer("transformers")
    H.HieraModel(tiny_image_config()).save_pretrained(tmp_path)
    transformers.ViTConfig().save_pretrained(tmp_path)  # replaces config.json
    with pytest.raises(ValueError, match="model_type is 'vit'"):
        H.HieraModel.from_pretrained(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'facebook/hiera-tiny-224-hf' is not a local file or directory, and fetching "
                                      "it as a Hugging Face hub id failed"):
        H.HieraModel.from_pretrained("facebook/hiera-tiny-224-hf")


@pytest.mark.parametrize("path", ["./no/such/thing.pth", "weights/hiera_tiny.pth", "ckpts/model.safetensors"])
def test_missing_path_is_a_clear_error(path):
    """A mistyped relative path of one folder and a file looks like a hub id (org/name): its checkpoint suffix says
    it is a file, so the error is about the file, not a hub download."""
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        H.HieraModel.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- other libraries' saves


def test_bad_problem_type_names_the_field():
    with pytest.raises(ValueError, match="problem_type"):
        tiny_image_config(problem_type="classification")


def test_masked_unit_attention_switched_back_on_warns():
    """transformers and the official model build a stage's first block differently when mask-unit attention comes
    back on after a stage without it: such a transformers config.json warns."""
    data = {**tiny_image_config(masked_unit_attention=(True, False, True, False)).to_dict()}
    with pytest.warns(UserWarning, match="transformers' HieraModel gives it mask-unit attention"):
        H.HieraConfig.from_dict(data)


def test_official_head_mul_rounds_per_stage(tmp_path):
    """The official model rounds the heads at every stage (``int(int(1 * 1.5) * 1.5) = 1``, not ``int(1.5**2) = 2``):
    a hub-mixin config with head_mul 1.5 gives its heads, and its outputs."""
    hiera = peer("hiera")
    args = dict(input_size=(64, 64), embed_dim=24, num_heads=1, head_mul=1.5, stages=(1, 1, 1, 1), num_classes=5)
    theirs = randomize_(hiera.Hiera(**args), std=0.1).eval()
    torch.save(theirs.state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(args))
    ours = H.HieraForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.num_heads == (1, 1, 1, 1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = torch.log(theirs(x))  # the official head returns probabilities in eval
        got = torch.log_softmax(ours(x).logits, -1)
    assert max_abs(got, ref) <= 1e-4 * ref.abs().max().item()


def test_preset_name_takes_the_checkpoints_classes(tmp_path):
    """``config="hiera_tiny_224"`` with an official checkpoint fine-tuned to 10 classes loads its classifier (a
    fresh 1000-class head replaced it); a HieraConfig says the classes itself (another size: a new head, warned)."""
    state = H.HieraForImageClassification(H.HieraConfig.from_preset("hiera_tiny_224", num_labels=10)).state_dict()
    torch.save({"model_state": state}, tmp_path / "ft.pth")
    model = H.HieraForImageClassification.from_pretrained(tmp_path / "ft.pth", config="hiera_tiny_224")
    assert model.config.num_labels == 10
    assert torch.equal(model.classifier.weight, state["classifier.weight"])
    with pytest.warns(UserWarning, match="another head"):
        H.HieraForImageClassification.from_pretrained(tmp_path / "ft.pth",
                                                      config=H.HieraConfig.from_preset("hiera_tiny_224"))


def test_mae_decoder_of_another_depth_is_an_error(tmp_path):
    """A head both sides have must match key for key: an MAE decoder deeper or shallower than the config's is an
    error (it was dropped or left initialised with a warning, and the loss silently changed)."""
    model = H.HieraForPreTraining(tiny_mae_config(decoder_depth=2))
    model.save_pretrained(tmp_path)
    config = H.HieraConfig.from_pretrained(tmp_path)
    for depth, word in ((1, "unexpected"), (3, "missing")):
        config.decoder_depth = depth
        with pytest.raises(ValueError, match=word):
            H.HieraForPreTraining.from_pretrained(tmp_path, config=config)


def test_timm_features_only_state_dict(tmp_path):
    """timm's ``features_only`` model wraps the net as ``model.``: its keys lose that prefix and load."""
    timm = peer("timm")
    net = timm.create_model("hiera_tiny_224", features_only=True, img_size=(64, 64), out_indices=(0, 1, 2, 3))
    torch.save(net.state_dict(), tmp_path / "feat.pth")
    config = H.HieraConfig.from_preset("hiera_tiny_224", image_size=(64, 64))
    model = H.HieraModel.from_pretrained(tmp_path / "feat.pth", config=config)
    assert torch.equal(model.embeddings.position_embeddings, net.state_dict()["model.pos_embed"])


def test_official_three_stage_model_with_default_flags(tmp_path):
    """An official 3-stage model built with the default ``mask_unit_attn`` (4 flags) reads the first 3: its hub-mixin
    config.json (without them) loads (it was a ValueError about a field the user never set), and the outputs
    match."""
    hiera = peer("hiera")
    args = dict(input_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 1), q_pool=2, mask_unit_size=(4, 4),
                num_classes=5)
    theirs = randomize_(hiera.Hiera(**args), std=0.1).eval()
    torch.save(theirs.state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps(args))
    ours = H.HieraForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.masked_unit_attention == (True, True, False) and ours.config.num_query_pool == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = torch.log(theirs(x))
        got = torch.log_softmax(ours(x).logits, -1)
    assert max_abs(got, ref) <= 1e-4 * ref.abs().max().item()


def test_official_dim_mul_that_rounds_differently_is_a_clear_error():
    """The official model rounds the width at every stage (14 * 1.5 -> 21 -> 31 -> 46), HieraConfig as transformers
    does (14 * 1.5**3 -> 47): such a config is refused by name, not by a list of mismatched shapes."""
    from hiera_fast.checkpoints.hiera import official_config_to_hiera_config

    with pytest.raises(ValueError, match="dim_mul 1.5.*not supported"):
        official_config_to_hiera_config(dict(embed_dim=14, num_heads=1, head_mul=1.0, dim_mul=1.5,
                                             stages=(1, 1, 1, 1), input_size=(64, 64)))
    exact = official_config_to_hiera_config(dict(embed_dim=16, dim_mul=1.5, head_mul=1.0, stages=(1, 1, 1, 1),
                                                 num_heads=1, input_size=(64, 64)))
    assert exact.stage_dims == [16, 24, 36, 54]
