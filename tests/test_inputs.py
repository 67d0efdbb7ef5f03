"""Bad inputs get a clear ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import hiera_fast as H
from hiera_fast import ops
from helpers import tiny_image_config, tiny_mae_config, tiny_video_config


@pytest.fixture(scope="module")
def model():
    return H.HieraForImageClassification(tiny_image_config()).eval()


@pytest.mark.parametrize("shape, match", [
    ((2, 4, 64, 64), "channels"),
    ((2, 3, 64, 32), "interpolate_pos_encoding"),
    ((3, 64, 64), "rank 4"),
    ((2, 3, 4, 64, 64), "rank 4"),
])
def test_bad_pixel_values(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))


def test_interpolated_size_must_fit_mask_units(model):
    with pytest.raises(ValueError, match="multiple of patch_stride"):
        model(torch.randn(1, 3, 72, 72), interpolate_pos_encoding=True)


def test_pixel_values_type(model):
    with pytest.raises(TypeError, match="pixel_values"):
        model([[1.0]])


def test_video_model_wants_rank_5():
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        H.HieraModel(tiny_video_config())(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float64])
def test_pixel_values_dtype(model, dtype):
    with pytest.raises(TypeError, match="pixel_values"):
        model(torch.zeros(1, 3, 64, 64, dtype=dtype))


@pytest.mark.parametrize("labels, error", [
    (torch.randint(0, 7, (2, 3)), ValueError),  # class ids are [B]
    (torch.tensor([0, 1], dtype=torch.int16), TypeError),
    (torch.rand(2, 5), ValueError),  # multi-hot targets are [B, num_labels]
    ([0, 1], TypeError),
])
def test_bad_labels(model, labels, error):
    with pytest.raises(error, match="labels"):
        model(torch.randn(2, 3, 64, 64), labels=labels)


def test_bad_masks_and_noise():
    model = H.HieraModel(tiny_image_config())
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(x, bool_masked_pos=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same, non-zero number"):
        model(x, bool_masked_pos=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool))
    with pytest.raises(TypeError, match="bool_masked_pos"):
        model(x, bool_masked_pos=[[1, 0, 1, 0]] * 2)
    with pytest.raises(ValueError, match="is_mae"):
        model(x, noise=torch.rand(2, 4))
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="keep_ids"):
        model(x, bool_masked_pos=mask, keep_ids=torch.tensor([[0, 2], [1, 3]]))
    with pytest.raises(ValueError, match="noise"):
        H.HieraForPreTraining(tiny_mae_config())(x, noise=torch.rand(2, 3))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keep_ids=[[0, 2], [1, 2]]), TypeError, "keep_ids must be a torch.Tensor"),
    (dict(keep_ids=torch.tensor([[0.0, 2.0], [1.0, 2.0]])), TypeError, "keep_ids must be an integer tensor"),
    (dict(keep_ids=torch.tensor([0, 2])), ValueError, "keep_ids must be \\[B, K\\]"),
    (dict(keep_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError, "1 <= K <= 4"),
    (dict(keep_ids=torch.tensor([[0, 2], [1, 2]], device="meta")), ValueError, "keep_ids must be on"),
    (dict(bool_masked_pos=torch.ones(2, 4, dtype=torch.bool, device="meta")), ValueError, "bool_masked_pos must be on"),
])
def test_bad_keep_ids_and_mask_devices(kwargs, error, match):
    """keep_ids are checked as a tensor of window ids before use (a float one passed torch.equal, then failed in a
    gather); a mask or ids on another device than the pixels is a ValueError."""
    kwargs.setdefault("bool_masked_pos", torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool))
    with pytest.raises(error, match=match):
        H.HieraModel(tiny_image_config())(torch.randn(2, 3, 64, 64), **kwargs)


def test_empty_batch_mask_needs_keep_ids():
    """An empty batch's mask says nothing about how many units stay visible: a clear error, and with keep_ids it
    runs (an IndexError before)."""
    model = H.HieraModel(tiny_image_config())
    x, mask = torch.randn(0, 3, 64, 64), torch.zeros(0, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="for an empty batch pass keep_ids"):
        model(x, bool_masked_pos=mask)
    out = model(x, bool_masked_pos=mask, keep_ids=torch.zeros(0, 2, dtype=torch.long))
    assert out.last_hidden_state.shape[0] == 0


@pytest.fixture(scope="module")
def mae():
    return H.HieraForPreTraining(tiny_mae_config())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(noise=[[0.1] * 4] * 2), TypeError, "noise"),
    (dict(bool_masked_pos=[[1, 0, 0, 0]] * 2), TypeError, "bool_masked_pos"),
    (dict(bool_masked_pos=torch.tensor([True, False, False, False])), ValueError, "bool_masked_pos"),
    (dict(bool_masked_pos=torch.ones(2, 4, dtype=torch.bool)), ValueError, "bool_masked_pos"),  # nothing masked
    (dict(bool_masked_pos=torch.tensor([[1, 1, 0, 0]] * 2).bool()), ValueError, "1 expected"),  # mask_ratio: keep 1
    (dict(noise=torch.rand(2, 4), bool_masked_pos=torch.tensor([[1, 0, 0, 0]] * 2).bool()), ValueError, "not both"),
    (dict(noise=torch.rand(2, 4, device="meta")), ValueError, "noise must be on"),  # was accepted: garbage, NaN loss
    (dict(noise=torch.rand(2, 4, dtype=torch.complex64)), TypeError, "noise must be a floating-point tensor"),
    (dict(noise=torch.randint(0, 9, (2, 4))), TypeError, "noise must be a floating-point tensor"),
    (dict(bool_masked_pos=torch.tensor([[1, 0, 0, 0]] * 2, device="meta").bool()), ValueError, "must be on"),
])
def test_bad_mae_masks_and_noise(mae, kwargs, error, match):
    with pytest.raises(error, match=match):
        mae(torch.randn(2, 3, 64, 64), **kwargs)


def test_mae_runs_only_at_its_size(mae):
    with pytest.raises(ValueError, match="config.image_size") as err:
        mae(torch.randn(1, 3, 96, 96))
    assert "interpolate_pos_encoding" not in str(err.value)  # HieraForPreTraining has no such argument


@pytest.mark.parametrize("overrides", [
    dict(query_stride=(2, 1), masked_unit_size=(8, 1)),  # 16 predictions vs 64 label patches: a wrong loss before
    dict(patch_stride=(4, 2), patch_padding=(3, 3), image_size=(64, 32)),
])
def test_mae_prediction_grid_must_be_the_label_grid(overrides):
    """The MAE predicts one pred_stride-sized patch per final token; where that grid is not the label grid, the loss
    compared predictions with other tokens' pixels (the official model raises an IndexError)."""
    with pytest.raises(ValueError, match="final token grid"):
        H.HieraForPreTraining(tiny_mae_config(**overrides))


def test_mae_video_with_a_temporal_query_stride_is_refused():
    with pytest.raises(ValueError, match="query_stride 1 in time"):
        H.HieraForPreTraining(tiny_video_config(image_size=(16, 64, 64), query_stride=(2, 2, 2),
                                                masked_unit_size=(8, 8, 8), num_query_pool=2, decoder_hidden_size=16,
                                                decoder_depth=1, decoder_num_heads=2))


def test_mae_needs_a_masked_unit():
    with pytest.raises(ValueError, match="mask_ratio"):
        H.HieraForPreTraining(tiny_mae_config(mask_ratio=0.0))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 64, 48), 5, 1, 16, True), ValueError, "num_heads"),
    ((torch.randn(2, 60, 48), 1, 4, 16, True), ValueError, "q_stride \\* window_size"),
    ((torch.randn(2, 63, 48), 1, 2, 0, False), ValueError, "q_stride=2"),
    ((torch.randn(64, 48), 1, 1, 16, True), ValueError, "rank 3"),
    ((torch.randn(2, 64, 47), 1, 1, 16, True), ValueError, "3 \\* dim"),
    ((torch.randint(0, 9, (2, 64, 48)), 1, 1, 16, True), TypeError, "float16"),
    ((torch.randn(2, 64, 48), 0, 1, 16, True), ValueError, "num_heads"),
    ((torch.randn(2, 64, 48), 1, 1, 0, True), ValueError, "window_size"),
    (("qkv", 1, 1, 16, True), TypeError, "qkv"),
])
def test_attention_op_checks(fused, args, error, match):
    with pytest.raises(error, match=match):
        ops.mask_unit_attention(*args, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_max_pool_op_checks(fused):
    with pytest.raises(ValueError, match="stride=3"):
        ops.unrolled_max_pool(torch.randn(1, 8, 4), 3, fused=fused)
    with pytest.raises(ValueError, match="rank 3"):
        ops.unrolled_max_pool(torch.randn(8, 4), 2, fused=fused)
    with pytest.raises(ValueError, match="stride"):
        ops.unrolled_max_pool(torch.randn(1, 8, 4), 0, fused=fused)


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # torch's own warning for the variance of an empty batch
@pytest.mark.parametrize("make, pixels", [
    (lambda: H.HieraForPreTraining(tiny_mae_config()), (0, 3, 64, 64)),
    (lambda: H.HieraForPreTraining(tiny_video_config(num_query_pool=2, decoder_hidden_size=16, decoder_depth=1,
                                                     decoder_num_heads=2, image_size=(2, 64, 64))), (0, 3, 2, 64, 64)),
    (lambda: H.HieraForImageClassification(tiny_image_config()), (0, 3, 64, 64)),
    (lambda: H.HieraBackbone(tiny_image_config()), (0, 3, 64, 64)),
], ids=["mae", "mae-video", "classifier", "backbone"])
def test_empty_batch_gives_empty_outputs(make, pixels):
    """A batch of 0 runs (no reshape that cannot infer a -1 from 0 elements) and every output has batch 0."""
    model = make()
    out = model(torch.randn(pixels))
    for value in out.to_tuple():
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                assert t.shape[0] == 0, t.shape
