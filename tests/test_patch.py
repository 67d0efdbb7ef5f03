"""``hiera_fast.patch`` on transformers', timm's and the official Hiera models: patched == unpatched (outputs and
every gradient), the Triton path provably ran, and the patch is clean (state dict, undo, idempotence, errors).

On a CPU the kernels run under Triton's interpreter (tests/conftest.py), which is slow: the models are tiny (64x64
images, embed_dim 16, depths (1, 2, 2, 1); video 4x32x32 with q_stride (1, 2, 2) and mask units (1, 8, 8)).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import re

import pytest
import torch
from torch import nn

from hiera_fast import ops
from hiera_fast.patch import (
    is_patched,
    patch,
    patch_official,
    patch_timm,
    patch_transformers,
    patched,
    unpatch,
    unpatch_official,
    unpatch_timm,
    unpatch_transformers,
)
from hiera_fast.patch import core
from helpers import max_abs, peer, randomize_

transformers = peer("transformers")
timm = peer("timm")
timm_hiera = peer("timm.models.hiera")
official = peer("hiera")

FP32_TOL = 1e-5  # max error relative to the tensor's largest entry
ATTENTION_NAMES = ("HieraMaskUnitAttention", "MaskUnitAttention")


# ------------------------------------------------------------------------------------------------ tiny models
def _hf_config(**overrides):
    kwargs = dict(image_size=[64, 64], embed_dim=16, num_heads=[1, 2, 4, 8], depths=[1, 2, 2, 1], num_labels=7,
                  drop_path_rate=0.2)
    kwargs.update(overrides)
    return transformers.HieraConfig(**kwargs)


IMAGE, VIDEO = (3, 64, 64), (3, 4, 32, 32)


def _hf_classifier():
    return transformers.HieraForImageClassification(_hf_config())


def _hf_backbone():
    return transformers.HieraBackbone(_hf_config(out_features=["stage1", "stage2", "stage3", "stage4"]))


def _timm():
    return timm_hiera.Hiera(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), num_classes=7,
                            init_values=0.5, drop_path_rate=0.2)


def _official_image():
    return official.Hiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), num_classes=7,
                          drop_path_rate=0.2)


def _official_video():
    return official.Hiera(input_size=(4, 32, 32), embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), num_classes=5,
                          q_stride=(1, 2, 2), mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7),
                          patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), sep_pos_embed=True)


# name -> (builder, input shape, train mode?). Train mode runs drop path (the same seed on both sides); the official
# video model runs in eval, where the official head applies its softmax.
CASES = {
    "transformers-classifier": (_hf_classifier, IMAGE, True),
    "transformers-backbone": (_hf_backbone, IMAGE, True),
    "timm": (_timm, IMAGE, True),
    "official-image": (_official_image, IMAGE, True),
    "official-video": (_official_video, VIDEO, False),
}


def _build(name: str, device: str, batch: int = 1):
    """A randomly initialised model (every parameter ~ N(0, 0.1), so biases and norms matter) and an input."""
    builder, shape, train = CASES[name]
    model = randomize_(builder(), std=0.1).to(device).train(train)
    return model, torch.randn(batch, *shape, device=device)


def _outputs(out) -> list[torch.Tensor]:
    """The tensors a model returned, whatever the library's output type."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "feature_maps"):
        return list(out.feature_maps)
    if hasattr(out, "logits"):
        return [out.logits] + ([out.loss] if getattr(out, "loss", None) is not None else [])
    return [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _attention_modules(model) -> int:
    return sum(type(m).__name__ in ATTENTION_NAMES for m in model.modules())


def _pools(m) -> bool:
    """A block whose residual is max-pooled with a stride > 1 (each library spells it its own way)."""
    name = type(m).__name__
    if name == "HieraLayer":
        return m.hidden_size != m.hidden_size_output and m.query_stride > 1
    if name == "HieraBlock" and hasattr(m, "do_expand"):  # timm
        return m.do_expand and m.proj is not None and m.attn.q_stride > 1
    if name == "HieraBlock":  # official
        return m.dim != m.dim_out and m.attn.q_stride > 1
    return False


def _pooling_blocks(model) -> int:
    return sum(_pools(m) for m in model.modules())


def _run(model, x, seed=1234, **kwargs):
    """Forward + backward of a fixed loss; returns ``(outputs, grads)`` with grads of the input and every
    parameter. The seed makes drop path (and anything random) the same on both sides."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    outs = _outputs(model(x, **kwargs))
    sum(o.float().pow(2).sum() for o in outs).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return [o.detach() for o in outs], grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_abs(a, b) / max(b.detach().abs().max().item(), 1e-12)


def _assert_close(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float, what: str) -> None:
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]"
        assert _rel(a, b) <= tol, f"{what}[{i}]: relative error {_rel(a, b):.2e} > {tol:.0e}"


def _layout(model) -> list[tuple[type, list[str]]]:
    """Each module's class and instance attributes: what ``unpatch`` must give back as ``patch`` found it."""
    return [(type(m), sorted(m.__dict__)) for m in model.modules()]


def _assert_clean(model) -> None:
    """No module holds a patch of ours: every class is its library's own, nothing of ours is on an instance."""
    for m in model.modules():
        assert core.LIBRARY_CLASS not in type(m).__dict__, type(m)
        assert "forward" not in m.__dict__ and "extra_repr" not in m.__dict__


def _launches(fn):
    """``fn()`` without autograd, and the kernel launches it made."""
    before = ops.kernel_launches.copy()
    with torch.no_grad():
        out = fn()
    return out, ops.kernel_launches - before


@pytest.fixture(autouse=True)
def _undo_class_patches():
    """No test leaves a class-level patch behind, whatever happens inside it."""
    yield
    unpatch_transformers()
    unpatch_timm()
    unpatch_official()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", [name for name in CASES if name != "transformers-backbone"])
def test_patch_matches_library_fp32(name, device):
    """Outputs and all gradients (input + every parameter) equal before and after ``patch``; the Triton kernels ran
    for every attention and every pooled residual, forward and backward; the state dict is untouched; ``unpatch``
    restores the original forward exactly."""
    model, x = _build(name, device)  # batch 1 for speed; the MAE tests run batch 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layout = _layout(model)
    ref_out, ref_grads = _run(model, x)

    assert patch(model) is model
    assert [attrs for _, attrs in _layout(model)] == [attrs for _, attrs in layout]  # nothing stored on instances
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    before = ops.kernel_launches.copy()
    out, grads = _run(model, x)
    launched = ops.kernel_launches - before
    n_attn, n_pool = _attention_modules(model), _pooling_blocks(model)
    assert n_attn > 0 and n_pool > 0
    assert launched["mask_unit_attention_fwd"] == n_attn
    assert launched["mask_unit_attention_bwd"] == n_attn
    assert launched["unrolled_max_pool_fwd"] == n_pool
    assert launched["unrolled_max_pool_bwd"] == n_pool
    _assert_close(out, ref_out, FP32_TOL, "output")
    _assert_close(grads, ref_grads, FP32_TOL, "grad")

    assert unpatch(model) is model
    _assert_clean(model)
    assert _layout(model) == layout
    before = ops.kernel_launches.copy()
    out, _ = _run(model, x)
    assert ops.kernel_launches == before
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out, strict=True))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_transformers_backbone(device):
    """HieraBackbone builds on the same classes as the classifier (covered with gradients above): forward only."""
    model, x = _build("transformers-backbone", device)
    model.eval()
    with torch.no_grad():
        ref = _outputs(model(x))
        patch(model)
        before = ops.kernel_launches.copy()
        got = _outputs(model(x))
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == _attention_modules(model)
    assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(model) > 0
    assert len(got) == 4
    _assert_close(got, ref, FP32_TOL, "feature map")


def _grad_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Relative L2 error of all gradients together (one max-pool winner flipped by fp16 rounding moves a whole
    gradient entry, so per-element comparisons of fp16 gradients are noise)."""
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(got, ref, strict=True))
    den = sum(b.double().pow(2).sum() for b in ref)
    return math.sqrt(num / den)


@pytest.mark.parametrize("name", ["transformers-classifier", "timm", "official-image"])
def test_patch_matches_library_fp16(name, device):
    """fp16 (runs on the CPU with torch >= 2.x; kernels in fp16 under the interpreter): the flash-attention rule
    against the fp32 model: the patched fp16 error is at most twice the library's own fp16 error (+ a floor)."""
    model, x = _build(name, device)
    ref_out, ref_grads = _run(model, x)
    half = copy.deepcopy(model).half()
    theirs_out, theirs_grads = _run(half, x.half())
    patch(half)
    before = ops.kernel_launches.copy()
    ours_out, ours_grads = _run(half, x.half())
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == _attention_modules(half)
    assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(half)
    for ours, theirs, ref in zip(ours_out, theirs_out, ref_out, strict=True):
        assert ours.dtype == torch.float16
        assert _rel(ours.float(), ref) <= 2 * _rel(theirs.float(), ref) + 1e-3
    ours_err, theirs_err = _grad_error(ours_grads, ref_grads), _grad_error(theirs_grads, ref_grads)
    assert ours_err <= 2 * theirs_err + 1e-3, (ours_err, theirs_err)


def test_official_mae_masked(device):
    """Masked MAE through the patched official ``MaskedAutoencoderHiera`` (the same ``mask=``): loss, prediction and
    every gradient equal; the decoder's global-attention blocks are patched too."""
    model = official.MaskedAutoencoderHiera(input_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 2, 1),
                                            q_pool=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    model = randomize_(model, std=0.1).to(device).train()
    x = torch.randn(2, *IMAGE, device=device)
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]], device=device)
    ref_out, ref_grads = _run(model, x, mask=mask)
    patch(model)
    assert is_patched(model.decoder_blocks[0].attn)
    before = ops.kernel_launches.copy()
    out, grads = _run(model, x, mask=mask)
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == _attention_modules(model)
    assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(model) > 0
    _assert_close(out, ref_out, FP32_TOL, "loss/pred/label")
    _assert_close(grads, ref_grads, FP32_TOL, "grad")


def test_transformers_pretraining_masked(device):
    """Masked MAE through the patched ``HieraForPreTraining`` (the same ``noise=``): loss, logits and every
    gradient equal."""
    config = _hf_config(num_query_pool=2, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2,
                        drop_path_rate=0.0)
    model = randomize_(transformers.HieraForPreTraining(config), std=0.1).to(device).train()
    x = torch.randn(2, *IMAGE, device=device)
    noise = torch.rand(2, 4, device=device)
    ref_out, ref_grads = _run(model, x, noise=noise)
    patch(model)
    before = ops.kernel_launches.copy()
    out, grads = _run(model, x, noise=noise)
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == _attention_modules(model)
    assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(model) > 0
    _assert_close(out, ref_out, FP32_TOL, "logits/loss")
    _assert_close(grads, ref_grads, FP32_TOL, "grad")


# ------------------------------------------------------------------------------------------------ behaviour
def test_transformers_output_attentions_falls_back(device):
    """``output_attentions=True`` needs the weights, which the kernel never forms: attention runs transformers'
    own forward for that call (the pooled residual stays fused)."""
    model, x = _build("transformers-classifier", device)
    model.eval()
    with torch.no_grad():
        ref = model(x, output_attentions=True)
        patch(model)
        before = ops.kernel_launches.copy()
        got = model(x, output_attentions=True)
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == 0
    assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(model)
    assert _rel(got.logits, ref.logits) <= FP32_TOL
    for a, b in zip(got.attentions, ref.attentions, strict=True):
        assert _rel(a, b) <= FP32_TOL


def test_patch_flags_and_context_manager(device):
    """``pooling=False`` patches attention only; ``with patched(model)`` adds the rest and, on exit, undoes only
    what it added."""
    model, x = _build("transformers-classifier", device)
    model.eval()
    n_attn, n_pool = _attention_modules(model), _pooling_blocks(model)
    patch(model, pooling=False)
    with torch.no_grad():
        before = ops.kernel_launches.copy()
        with patched(model) as same:
            assert same is model
            model(x)
        inside = ops.kernel_launches - before
        before = ops.kernel_launches.copy()
        model(x)
        after = ops.kernel_launches - before
    assert (inside["mask_unit_attention_fwd"], inside["unrolled_max_pool_fwd"]) == (n_attn, n_pool)
    assert (after["mask_unit_attention_fwd"], after["unrolled_max_pool_fwd"]) == (n_attn, 0)
    with pytest.raises(ValueError, match="nothing to patch"):
        patch(model, attention=False, pooling=False)


@pytest.mark.parametrize("name", ["transformers-classifier", "timm", "official-image"])
def test_patch_twice_is_noop_and_repr(name, device):
    """Exactly the modules that run fused code change class and get a tag; a second ``patch`` changes nothing (same
    classes, same repr); ``unpatch`` (twice) gives back the library classes and repr."""
    model, _ = _build(name, device)
    layout, text = _layout(model), repr(model)
    assert not is_patched(model)
    patch(model)
    assert is_patched(model)
    classes = [type(m) for m in model.modules()]
    changed = sum(cls is not before for cls, (before, _) in zip(classes, layout, strict=True))
    assert changed == _attention_modules(model) + _pooling_blocks(model)
    patched_text = repr(model)
    assert patched_text.count("hiera_fast: fused attention") == _attention_modules(model)
    assert patched_text.count("hiera_fast: fused pooled residual") == _pooling_blocks(model)
    assert core.patch_modules(model) == []
    assert all(type(m) is cls for m, cls in zip(model.modules(), classes, strict=True))
    assert repr(model) == patched_text
    unpatch(model)
    unpatch(model)  # a no-op too
    assert _layout(model) == layout and repr(model) == text
    assert not is_patched(model)


def test_deepcopy_of_patched_model_stays_patched_on_the_copy(device):
    """A deep copy of a patched model runs the kernels on its own weights; ``unpatch`` on the copy leaves the original
    patched, and the copy then runs the library's own code, equal to the unpatched model."""
    model, x = _build("official-image", device)
    model.eval()
    ref, _ = _launches(lambda: model(x))
    patch(model)
    clone = copy.deepcopy(model)
    randomize_(model)  # the copy must not run on the original's weights
    got, launched = _launches(lambda: clone(x))
    assert launched["mask_unit_attention_fwd"] == _attention_modules(clone)
    assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(clone)
    assert _rel(got, ref) <= FP32_TOL
    unpatch(clone)
    _assert_clean(clone)
    assert is_patched(model) and not is_patched(clone)
    assert "hiera_fast" not in repr(clone) and "hiera_fast: fused attention" in repr(model)
    got, launched = _launches(lambda: clone(x))
    assert sum(launched.values()) == 0
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["transformers-classifier", "timm"])  # the official Head holds a lambda: no pickle
def test_saved_patched_model_loads_unpatched(name, device):
    """``torch.save(model)`` of a patched model pickles the library classes: the file names nothing of hiera_fast
    (it loads where hiera_fast is not installed) and loads unpatched, equal to the unpatched model."""
    model, x = _build(name, device)
    model.eval()
    ref, _ = _launches(lambda: _outputs(model(x)))
    patch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert b"hiera_fast" not in buffer.getvalue()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_patched(model) and not is_patched(loaded)
    _assert_clean(loaded)
    assert "hiera_fast" not in repr(loaded)
    got, launched = _launches(lambda: _outputs(loaded(x)))
    assert sum(launched.values()) == 0
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_data_parallel_replica_runs_on_its_own_weights(device):
    """``nn.DataParallel`` makes each replica with ``_replicate_for_data_parallel()`` (a shallow copy of the
    ``__dict__``) and then gives it that device's children: the patched replica runs the kernel on those, not on the
    module it was copied from. Compared with an unpatched module holding the same children."""
    model, _ = _build("official-image", device)
    attn = model.blocks[0].attn
    ref = randomize_(copy.deepcopy(attn))  # the replica's weights, unlike the original's
    patch(model)
    replica = attn._replicate_for_data_parallel()
    replica._modules.update(ref._modules)  # what replicate() does, per device
    x = torch.randn(2, 256, attn.qkv.in_features, device=device)  # the first stage's 16x16 tokens
    got, launched = _launches(lambda: replica(x))
    assert launched["mask_unit_attention_fwd"] == 1
    want, _ = _launches(lambda: ref(x))
    assert _rel(got, want) <= FP32_TOL


def test_timm_expand_without_projection_keeps_timms_forward(device):
    """timm's ``use_expand_proj=False`` pools the residual as cat(max, mean) with no projection: those blocks run
    timm's own code, by instance patch (left as they are) and by class patch (falling back to the original), and
    are neither reported as patched nor tagged; attention still runs the kernel."""
    model = timm_hiera.Hiera(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 2, 2, 1), num_classes=7,
                             use_expand_proj=False)
    model = randomize_(model, std=0.1).to(device).eval()
    x = torch.randn(1, *IMAGE, device=device)
    expanding = [b for b in model.blocks if b.do_expand]
    assert expanding and all(b.proj is None for b in expanding)
    ref, _ = _launches(lambda: model(x))
    layout = _layout(model)
    for patch_blocks in (lambda: patch(model, attention=False), lambda: patch_timm(attention=False)):
        patch_blocks()
        assert not is_patched(model)
        assert "hiera_fast" not in repr(model)
        got, launched = _launches(lambda: model(x))
        assert sum(launched.values()) == 0
        assert _rel(got, ref) <= FP32_TOL
    unpatch_timm()
    for patch_all, undo in ((lambda: patch(model), lambda: unpatch(model)), (patch_timm, unpatch_timm)):
        patch_all()
        assert all(type(b) is timm_hiera.HieraBlock for b in model.blocks)
        assert not any(is_patched(b) for b in model.blocks if b.do_expand and b.attn.q_stride == 1)
        text = repr(model)
        assert text.count("hiera_fast: fused attention") == _attention_modules(model)
        assert "hiera_fast: fused pooled residual" not in text
        got, launched = _launches(lambda: model(x))
        assert launched["mask_unit_attention_fwd"] == _attention_modules(model)
        assert launched["unrolled_max_pool_fwd"] == 0
        assert _rel(got, ref) <= FP32_TOL
        undo()
    assert _layout(model) == layout


def _with_4x_signature(forward):
    """transformers 4.x's ``forward(hidden_states, head_mask=None, output_attentions=False)`` around 5.x's
    ``forward``: CI installs only 5.x. The stand-in scales its output by the head mask, so that a mask the patched
    path dropped would show."""
    def forward_4x(self, hidden_states, head_mask=None, output_attentions=False):
        out, weights = forward(self, hidden_states, output_attentions=output_attentions)
        return (out if head_mask is None else out * head_mask), weights

    return forward_4x


def test_transformers_4x_call_signature(monkeypatch, device):
    """transformers 4.x's stages call ``layer(x, layer_head_mask, output_attentions=...)`` and its layers
    ``attn(x_norm, head_mask, output_attentions=...)``. With the library's forwards given 4.x's signature, the
    patched modules take every such call: without a head mask they run the kernels; a head mask or
    ``output_attentions=True`` goes to the library's forward. Each call equals the same call unpatched."""
    modeling = transformers.models.hiera.modeling_hiera
    for cls in (modeling.HieraMaskUnitAttention, modeling.HieraLayer):
        monkeypatch.setattr(cls, "forward", _with_4x_signature(cls.forward))
    model, _ = _build("transformers-classifier", device)
    model.eval()
    layer = model.hiera.encoder.stages[1].layers[0]  # the first pooling layer: 16x16 tokens in, 8x8 out
    assert _pools(layer)
    x = torch.randn(2, 256, layer.hidden_size, device=device)
    x_norm = layer.layernorm_before(x).detach()
    mask = torch.tensor(1.5, device=device)
    calls = [  # (call, attention kernels, pooling kernels) when patched
        (lambda: layer(x, None, output_attentions=False), 1, 1),
        (lambda: layer.attn(x_norm, None, output_attentions=False), 1, 0),
        (lambda: layer.attn(x_norm, None), 1, 0),
        (lambda: layer.attn(x_norm, head_mask=None), 1, 0),
        (lambda: layer(x, mask, output_attentions=False), 1, 0),  # the stand-in layer calls attn the 5.x way
        (lambda: layer.attn(x_norm, mask), 0, 0),
        (lambda: layer.attn(x_norm, head_mask=mask, output_attentions=True), 0, 0),
    ]
    refs = [_launches(call)[0] for call, _, _ in calls]
    patch(model)
    for (call, n_attn, n_pool), (ref_out, ref_weights) in zip(calls, refs, strict=True):
        (out, weights), launched = _launches(call)
        assert (launched["mask_unit_attention_fwd"], launched["unrolled_max_pool_fwd"]) == (n_attn, n_pool)
        assert _rel(out, ref_out) <= FP32_TOL
        assert (weights is None) == (ref_weights is None)
        assert weights is None or _rel(weights, ref_weights) <= FP32_TOL


def test_compile_fullgraph(device):
    """A patched model compiles with ``fullgraph=True`` and matches the unpatched model, output and every gradient;
    after ``unpatch`` the compiled model runs the library's code again (the class swap is guarded)."""
    torch._dynamo.reset()
    model, x = _build("timm", device)
    ref_out, ref_grads = _run(model, x)
    patch(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = ops.kernel_launches.copy()
    out, grads = _run(compiled, x)
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] == launched["mask_unit_attention_bwd"] == _attention_modules(model)
    assert launched["unrolled_max_pool_fwd"] == launched["unrolled_max_pool_bwd"] == _pooling_blocks(model)
    _assert_close(out, ref_out, FP32_TOL, "output")
    _assert_close(grads, ref_grads, FP32_TOL, "grad")
    unpatch(model)
    _, launched = _launches(lambda: compiled(x))
    assert sum(launched.values()) == 0


def _hf_checkpointing(use_reentrant: bool):
    def enable(model):  # transformers 5.x renamed gradient_checkpointing_enable (deprecated there)
        on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        on({"use_reentrant": use_reentrant})
    return enable


GRADIENT_CHECKPOINTING = {
    "transformers-reentrant": ("transformers-classifier", _hf_checkpointing(True)),
    "transformers-non-reentrant": ("transformers-classifier", _hf_checkpointing(False)),
    "timm": ("timm", lambda m: m.set_grad_checkpointing(True)),
}


@pytest.mark.parametrize("case", list(GRADIENT_CHECKPOINTING))
def test_gradient_checkpointing(case, device):
    """With the library's gradient checkpointing on, a patched model gives the unpatched outputs and gradients, and
    the fused forward runs twice per attention (the recompute in the backward), the backward once."""
    name, enable = GRADIENT_CHECKPOINTING[case]
    model, x = _build(name, device)
    enable(model)
    ref_out, ref_grads = _run(model, x)
    patch(model)
    before = ops.kernel_launches.copy()
    out, grads = _run(model, x)
    launched = ops.kernel_launches - before
    attention, pooling = _attention_modules(model), _pooling_blocks(model)
    assert launched["mask_unit_attention_fwd"] == 2 * attention and launched["mask_unit_attention_bwd"] == attention
    assert launched["unrolled_max_pool_fwd"] == 2 * pooling and launched["unrolled_max_pool_bwd"] == pooling
    _assert_close(out, ref_out, FP32_TOL, "output")
    _assert_close(grads, ref_grads, FP32_TOL, "grad")


# ------------------------------------------------------------------------------------------------ class level
CLASS_LEVEL = {
    "transformers": (patch_transformers, unpatch_transformers, "transformers-classifier",
                     lambda: transformers.models.hiera.modeling_hiera.HieraMaskUnitAttention),
    "timm": (patch_timm, unpatch_timm, "timm", lambda: timm_hiera.MaskUnitAttention),
    "official": (patch_official, unpatch_official, "official-image", lambda: official.MaskUnitAttention),
}


@pytest.mark.parametrize("library", list(CLASS_LEVEL))
def test_class_level_patch_and_undo(library, device):
    """A model built after ``patch_<library>()`` runs the kernels (one built before is patched too: the class
    attribute is what changed); after the undo, new models run the original forward."""
    do, undo, case, attention_class = CLASS_LEVEL[library]
    original_forward = attention_class().forward
    old, x = _build(case, device)
    old.eval()
    with torch.no_grad():
        ref = _outputs(old(x))
    try:
        do()
        do()  # twice: a no-op
        assert attention_class().forward is not original_forward
        new, _ = _build(case, device)
        new.load_state_dict(old.state_dict())
        new.eval()
        patch(new)  # already patched by class: a no-op, nothing saved on the instances
        _assert_clean(new)
        assert "hiera_fast: fused attention" in repr(new)
        assert all(is_patched(m) for m in old.modules() if type(m).__name__ in ATTENTION_NAMES)
        before = ops.kernel_launches.copy()
        with torch.no_grad():
            got = _outputs(new(x))
        launched = ops.kernel_launches - before
        assert launched["mask_unit_attention_fwd"] == _attention_modules(new)
        assert launched["unrolled_max_pool_fwd"] == _pooling_blocks(new)
        _assert_close(got, ref, FP32_TOL, "new model")
    finally:
        undo()
    undo()  # twice: a no-op
    assert attention_class().forward is original_forward
    fresh, _ = _build(case, device)
    fresh.eval()
    assert not any(is_patched(m) for m in fresh.modules())
    assert "hiera_fast" not in repr(fresh)
    before = ops.kernel_launches.copy()
    with torch.no_grad():
        fresh(x)
    assert ops.kernel_launches == before


def test_class_level_patch_compiles_once(device, monkeypatch):
    """A model patched by class and compiled before any eager call traces once: the fused forwards' layout check
    (cached per class in eager mode) must not leave a guard that the next call fails. Outputs equal the library's.
    One library: the check is the libraries' shared code (``core.Library.check``)."""
    from hiera_fast.patch import core

    do, _undo, case, _attention_class = CLASS_LEVEL["official"]
    monkeypatch.setattr(core, "_CHECKED", set())  # as in a fresh process: no class checked yet
    model, x = _build(case, device)
    model.eval()
    with torch.no_grad():
        ref = _outputs(model(x))
    do()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for call in range(2):
        before = ops.kernel_launches.copy()
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=call > 0):
            got = _outputs(compiled(x))
        assert (ops.kernel_launches - before)["mask_unit_attention_fwd"] == _attention_modules(model)
        _assert_close(got, ref, FP32_TOL, f"call {call}")


BLOCK_NAMES = ("HieraLayer", "HieraBlock")


@pytest.mark.parametrize("library", ["transformers", "timm", "official"])
def test_is_patched_and_repr_say_what_runs_fused(library, device):
    """``is_patched(model)`` is True when any module in it runs fused code. With the blocks patched alone
    (``attention=False``), by instance or by class, exactly the blocks that pool with a stride > 1 are reported and
    tagged, as many as the pooling kernel launches; the output equals the unpatched model's."""
    do, undo, case, _ = CLASS_LEVEL[library]
    model, x = _build(case, device)
    model.eval()
    blocks = [m for m in model.modules() if type(m).__name__ in BLOCK_NAMES]
    pooling = [_pools(b) for b in blocks]
    assert any(pooling) and not all(pooling)
    ref, _ = _launches(lambda: _outputs(model(x)))
    assert not is_patched(model)
    for patch_blocks, undo_blocks in ((lambda: patch(model, attention=False), lambda: unpatch(model)),
                                      (lambda: do(attention=False), undo)):
        patch_blocks()
        assert is_patched(model)
        assert [is_patched(b) for b in blocks] == pooling
        text = repr(model)
        assert text.count("hiera_fast: fused pooled residual") == sum(pooling) and "fused attention" not in text
        got, launched = _launches(lambda: _outputs(model(x)))
        assert (launched["unrolled_max_pool_fwd"], launched["mask_unit_attention_fwd"]) == (sum(pooling), 0)
        _assert_close(got, ref, FP32_TOL, "output")
        undo_blocks()
        assert not is_patched(model)


# ------------------------------------------------------------------------------------------------ errors
def test_non_hiera_model_raises():
    with pytest.raises(ValueError) as info:
        patch(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
    message = str(info.value)
    hf = "transformers.models.hiera.modeling_hiera"
    for name in (f"{hf}.HieraMaskUnitAttention", f"{hf}.HieraLayer", "timm.models.hiera.MaskUnitAttention",
                 "timm.models.hiera.HieraBlock", "hiera.hiera.MaskUnitAttention", "hiera.hiera.HieraBlock"):
        assert name in message
    for fn in (patch, unpatch, is_patched):
        with pytest.raises(TypeError, match=f"hiera_fast.{fn.__name__} expects a torch.nn.Module, got str"):
            fn("not a model")


def test_unknown_layout_names_the_library_version(device):
    """A missing attribute, a class that moved, a module or class the library no longer has: each a clear error
    naming the library and its version."""
    model, _ = _build("transformers-classifier", device)
    del model.hiera.encoder.stages[0].layers[0].attn.query_stride
    with pytest.raises(RuntimeError, match=re.escape(f"transformers {transformers.__version__}") + ".*query_stride"):
        patch(model)
    _assert_clean(model)  # nothing half-patched

    moved = type("HieraMaskUnitAttention", (nn.Module,), {"__module__": "transformers.models.hiera.modeling_v2"})
    with pytest.raises(RuntimeError, match=re.escape(f"transformers {transformers.__version__}")):
        patch(nn.Sequential(moved()))

    from hiera_fast.patch.timm import LIBRARY as TIMM

    gone_module = dataclasses.replace(TIMM, module="timm.models.no_such_hiera")
    with pytest.raises(RuntimeError, match=re.escape(f"timm {timm.__version__}")):
        gone_module.classes(import_module=True)
    gone_class = dataclasses.replace(TIMM, attention=dataclasses.replace(TIMM.attention, class_name="NoSuchAttention"))
    with pytest.raises(RuntimeError, match="NoSuchAttention"):
        gone_class.classes(import_module=True)
