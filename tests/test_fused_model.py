"""``fused=True`` models equal ``fused=False`` ones, and the Triton path provably ran (interpreter on a CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import hiera_fast as H
from hiera_fast import ops
from helpers import max_abs, randomize_, tiny_image_config, tiny_mae_config, tiny_video_config

pytestmark = pytest.mark.skipif(ops.fused_backend("cpu")[0] == "eager" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def _attention_layers(model) -> int:
    return sum(isinstance(m, H.model.HieraMaskUnitAttention) for m in model.modules())


def _pooling_layers(model) -> int:
    return sum(isinstance(m, H.model.HieraLayer) and m.dim != m.dim_out and m.query_stride > 1
               for m in model.modules())


def _pair(cls, config, device):
    eager = randomize_(cls(config), std=0.1).to(device)
    fused = copy.deepcopy(eager)
    fused.fused = True
    assert fused.fused and not eager.fused
    return eager, fused


def _rel(a, b) -> float:
    return max_abs(a, b) / max(b.abs().max().item(), 1e-12)


def _query_stride_3_config():
    """Pooling by 3x3 (a flattened query stride of 9, not a power of two), with 3x3 mask units."""
    return H.HieraConfig(image_size=(36, 36), embed_dim=16, num_heads=(1, 2), depths=(1, 1), num_labels=3,
                         query_stride=(3, 3), masked_unit_size=(3, 3), masked_unit_attention=(True, False),
                         num_query_pool=1)


@pytest.mark.parametrize("make_config", [tiny_image_config, tiny_video_config, _query_stride_3_config],
                         ids=["image", "video", "query-stride-3x3"])
def test_classifier_fused_equals_eager(make_config, device):
    config = make_config()
    eager, fused = _pair(H.HieraForImageClassification, config, device)
    x = torch.randn(2, 3, *config.image_size, device=device)
    before = ops.kernel_launches.copy()
    with torch.no_grad():
        got, ref = fused(x, output_hidden_states=True), eager(x, output_hidden_states=True)
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == _attention_layers(fused)
    assert launched["unrolled_max_pool_fwd"] == _pooling_layers(fused)
    assert _rel(got.logits, ref.logits) <= 1e-5
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert _rel(a, b) <= 1e-5


def test_model_fused_toggle_at_run_time(device):
    model = randomize_(H.HieraModel(tiny_image_config()), std=0.1).to(device)
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        model.fused = True
        before = ops.kernel_launches["mask_unit_attention_fwd"]
        got = model(x).last_hidden_state
        assert ops.kernel_launches["mask_unit_attention_fwd"] - before == _attention_layers(model)
        model.fused = False
        before = ops.kernel_launches["mask_unit_attention_fwd"]
        model(x)
        assert ops.kernel_launches["mask_unit_attention_fwd"] == before
    assert _rel(got, ref) <= 1e-5
    with pytest.raises(TypeError, match="fused must be a bool"):
        model.fused = "False"  # truthy: it would have switched the kernels on
    with pytest.raises(TypeError, match="fused must be a bool"):
        H.HieraModel(tiny_image_config(), fused="yes")
    assert not model.fused


@pytest.mark.parametrize("make_config", [tiny_mae_config, lambda: tiny_video_config(
    num_query_pool=2, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2, image_size=(2, 64, 64))],
    ids=["image", "video"])
def test_pretraining_fused_equals_eager(make_config, device):
    config = make_config()
    eager, fused = _pair(H.HieraForPreTraining, config, device)
    x = torch.randn(3, 3, *config.image_size, device=device)
    num_windows = eager.hiera.embeddings.position_embedding(config.tokens_spatial_shape).shape[1] // \
        config.flat_mask_unit_size
    noise = torch.rand(3, num_windows, device=device)
    before = ops.kernel_launches.copy()
    got, ref = fused(x, noise=noise), eager(x, noise=noise)
    assert (ops.kernel_launches - before)["mask_unit_attention_fwd"] == _attention_layers(fused)
    assert torch.equal(got.bool_masked_pos, ref.bool_masked_pos)
    assert _rel(got.logits, ref.logits) <= 1e-5
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    got.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(fused.named_parameters(), eager.parameters()):
        assert _rel(p.grad, q.grad) <= 1e-4, name


def test_from_pretrained_fused(tmp_path, device):
    model = randomize_(H.HieraForImageClassification(tiny_image_config()), std=0.1)
    model.save_pretrained(tmp_path)
    fused = H.HieraForImageClassification.from_pretrained(tmp_path, fused=True).to(device)
    assert fused.fused
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        assert _rel(fused(x).logits, model.to(device)(x).logits) <= 1e-5


def test_backbone_fused(device):
    config = tiny_image_config(out_features=["stage1", "stage2", "stage3", "stage4"])
    eager, fused = _pair(H.HieraBackbone, config, device)
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        for a, b in zip(fused(x).feature_maps, eager(x).feature_maps):
            assert _rel(a, b) <= 1e-5
