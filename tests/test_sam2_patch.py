"""``hiera_fast.patch`` on SAM 2 Hiera trunks (official ``sam2``, timm ``hieradet_sam2``, transformers' Sam2 vision
backbone, ultralytics): patched == unpatched, forward and backward (fp32, 1e-5 relative; bias-heavy weights, padded
geometry, drop path in training), every windowed block provably ran our fused window kernels (the launch counter,
forward and backward) and every global block our SDPA ``window_attention``, transformers' unused softmax is gone, the
state dict is untouched and ``unpatch`` restores the library's classes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hiera_fast import ops
from hiera_fast.patch import core, is_patched, patch, patched, unpatch
from hiera_fast.patch import sam2 as patch_sam2_mod  # hiera_fast.patch is also the function: from-imports only
from hiera_fast.patch import timm_sam2 as patch_timm_mod
from hiera_fast.patch import transformers_sam2 as patch_transformers_mod
from hiera_fast.patch import ultralytics_sam2 as patch_ultralytics_mod
from hiera_fast.sam2 import attention as sam2_attention

from helpers import sam2_bias_heavy_ as bias_heavy_

FP32_TOL = 1e-5
SIZE = (1, 3, 128, 128)  # stages 3 and 4 pad (8 -> 14, 4 -> 7): padded tokens are most of their keys
ARGS = dict(embed_dim=16, num_heads=1, stages=(1, 2, 3, 2), global_att_blocks=(4,))
WINDOWED, GLOBAL = 7, 1  # blocks of ARGS: block 4 is global


def _official():
    hieradet = pytest.importorskip("sam2.modeling.backbones.hieradet", reason="sam2 is not installed "
                                   "(SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
    return hieradet.Hiera(**ARGS, window_pos_embed_bkg_spatial_size=(7, 7), drop_path_rate=0.3)


def _ultralytics():
    encoders = pytest.importorskip("ultralytics.models.sam.modules.encoders",
                                   reason="ultralytics is not installed (pip install ultralytics)")
    return encoders.Hiera(**ARGS, window_pos_embed_bkg_spatial_size=(7, 7), drop_path_rate=0.3)


class _TimmTrunk(nn.Module):
    """timm's HieraDet returning its four stage outputs (``forward_intermediates``)."""

    def __init__(self):
        super().__init__()
        hieradet = pytest.importorskip("timm.models.hieradet_sam2", reason="timm is not installed")
        self.model = hieradet.HieraDet(**ARGS, num_classes=0, drop_path_rate=0.3, init_values=None)
        self.model.head = nn.Identity()  # a classifier's norm, not part of the trunk (and no gradient here)

    def forward(self, x):
        return self.model.forward_intermediates(x, intermediates_only=True)


def _timm_explicit_softmax():
    """timm with ``use_fused_attn()`` off: its attention is an explicit softmax, not SDPA."""
    trunk = _TimmTrunk()
    for m in trunk.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return trunk


class _TransformersTrunk(nn.Module):
    """transformers' Sam2HieraDetModel (``attn_implementation``: sdpa or eager) returning its stage outputs."""

    def __init__(self, attn_implementation: str = "sdpa"):
        super().__init__()
        transformers = pytest.importorskip("transformers", reason="transformers is not installed")
        config = transformers.Sam2HieraDetConfig(
            hidden_size=16, blocks_per_stage=[1, 2, 3, 2], embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 2, 4, 8], global_attention_blocks=[4])
        config._attn_implementation = attn_implementation
        self.model = transformers.Sam2HieraDetModel(config)

    def forward(self, x):
        return list(self.model(x).intermediate_hidden_states)


CASES = {
    "sam2": (_official, patch_sam2_mod, "patch_sam2", "unpatch_sam2"),
    "timm": (_TimmTrunk, patch_timm_mod, "patch_timm_sam2", "unpatch_timm_sam2"),
    "timm-explicit-softmax": (_timm_explicit_softmax, patch_timm_mod, "patch_timm_sam2", "unpatch_timm_sam2"),
    "transformers-sdpa": (_TransformersTrunk, patch_transformers_mod, "patch_transformers_sam2",
                          "unpatch_transformers_sam2"),
    "transformers-eager": (lambda: _TransformersTrunk("eager"), patch_transformers_mod, "patch_transformers_sam2",
                           "unpatch_transformers_sam2"),
    "ultralytics": (_ultralytics, patch_ultralytics_mod, "patch_ultralytics_sam2", "unpatch_ultralytics_sam2"),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _run(model: nn.Module, x: torch.Tensor, seed: int = 1234):
    """Outputs and the gradients of the input and every parameter, for a fixed loss and seed (drop path)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    outs = model(x)
    sum(o.pow(2).sum() for o in outs).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return [o.detach() for o in outs], grads


def _assert_close(got, ref, what: str) -> None:
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"{what}[{i}]"
        assert _rel(a, b) <= FP32_TOL, f"{what}[{i}]: relative error {_rel(a, b):.2e}"


def _attention_modules(model: nn.Module, lib: core.Library) -> int:
    return sum(type(m).__name__ == lib.attention.class_name for m in model.modules())


@pytest.fixture
def launches():
    """``launches(kind)``: the fused window kernels' launches (``"fwd"`` / ``"bwd"``) since the test began."""
    before = ops.kernel_launches.copy()
    return lambda kind: ops.kernel_launches[f"window_attention_{kind}"] - before[f"window_attention_{kind}"]


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of ``hiera_fast.sam2.attention.window_attention`` (what the patched global attention calls)."""
    counter = {"n": 0}
    real = sam2_attention.window_attention

    def counting(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sam2_attention, "window_attention", counting)
    return counter


@pytest.fixture(autouse=True)
def _undo_class_patches():
    yield
    for _, module, _, unpatch_name in CASES.values():
        getattr(module, unpatch_name)()


def _build(name: str):
    model = bias_heavy_(CASES[name][0]()).train()
    return model, torch.randn(*SIZE)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(CASES))
def test_patch_matches_library_fp32(name, calls, launches):
    """Outputs and all gradients (qkv biases included: padded tokens are their rows) equal before and after ``patch``
    (training mode: drop path draws alike); every windowed block launched the fused kernels forward and backward and
    the global one ran ``window_attention``; the state dict and instance attributes are untouched; ``unpatch`` gives
    back the library's classes and outputs."""
    model, x = _build(name)
    lib = CASES[name][1].LIBRARY
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layout = [(type(m), sorted(m.__dict__)) for m in model.modules()]
    ref_out, ref_grads = _run(model, x)
    assert calls["n"] == 0

    assert patch(model) is model and is_patched(model)
    assert [attrs for _, attrs in ((type(m), sorted(m.__dict__)) for m in model.modules())] == \
        [attrs for _, attrs in layout]
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert "hiera_fast: window attention" in repr(model) and "hiera_fast: fused window attention" in repr(model)

    out, grads = _run(model, x)
    assert _attention_modules(model, lib) == WINDOWED + GLOBAL
    assert (calls["n"], launches("fwd"), launches("bwd")) == (GLOBAL, WINDOWED, WINDOWED)
    _assert_close(out, ref_out, f"{name} outputs")
    _assert_close(grads, ref_grads, f"{name} grads")

    unpatch(model)
    assert [type(m) for m in model.modules()] == [t for t, _ in layout] and not is_patched(model)
    again, _ = _run(model, x)
    assert (calls["n"], launches("fwd")) == (GLOBAL, WINDOWED)
    assert all(torch.equal(a, b) for a, b in zip(again, ref_out))


@pytest.mark.parametrize("name", ["sam2", "timm", "transformers-sdpa", "ultralytics"])
def test_class_patch_reaches_new_instances_and_undoes(name, calls, launches):
    _, module, patch_name, unpatch_name = CASES[name]
    model, x = _build(name)
    lib = module.LIBRARY
    cls = type(next(m for m in model.modules() if type(m).__name__ == lib.attention.class_name))
    block_cls = type(next(m for m in model.modules() if type(m).__name__ == lib.block.class_name))
    forward, block_forward = cls.__dict__["forward"], block_cls.__dict__["forward"]
    model.eval()
    with torch.no_grad():
        ref = model(x)
    getattr(module, patch_name)()
    getattr(module, patch_name)()  # twice: a no-op
    assert cls.__dict__["forward"] is lib.attention.forward and block_cls.__dict__["forward"] is lib.block.forward
    fresh = copy.deepcopy(model)
    assert is_patched(model) and is_patched(fresh)
    with torch.no_grad():
        _assert_close(fresh(x), ref, name)
    assert (calls["n"], launches("fwd"), launches("bwd")) == (GLOBAL, WINDOWED, 0)
    getattr(module, unpatch_name)()
    assert cls.__dict__["forward"] is forward and block_cls.__dict__["forward"] is block_forward
    assert not is_patched(model)


def test_transformers_patch_forms_no_softmax(monkeypatch):
    """transformers' attention forms a softmax it never uses (and eager mode a second one); patched, none at all."""
    count = {"n": 0}
    real = torch.nn.functional.softmax

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", counting)
    for name, unpatched_calls in (("transformers-sdpa", 8), ("transformers-eager", 16)):
        model, x = _build(name)
        with torch.no_grad():
            model(x)
            assert count["n"] == unpatched_calls, name
            with patched(model):
                model(x)
            assert count["n"] == unpatched_calls, name
        count["n"] = 0


def test_transformers_vision_model_and_output_flags(calls, launches):
    """Inside ``Sam2VisionModel`` (backbone + neck); ``output_attentions`` / ``output_hidden_states`` records the same
    tensors as unpatched (transformers records attentions by hooks on the attention modules: those blocks run
    transformers' forward through the patched attention); without the flags, the windowed blocks are fused."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    trunk = _TransformersTrunk().model.config
    vision = transformers.Sam2VisionModel(transformers.Sam2VisionConfig(
        backbone_config=trunk.to_dict(), backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]))
    bias_heavy_(vision).eval()
    x = torch.randn(*SIZE)
    with torch.no_grad():
        ref = vision(x, output_attentions=True, output_hidden_states=True)
        with patched(vision):
            out = vision(x, output_attentions=True, output_hidden_states=True)
            assert (calls["n"], launches("fwd")) == (WINDOWED + GLOBAL, 0)
            plain = vision(x)
            assert (calls["n"], launches("fwd")) == (WINDOWED + 2 * GLOBAL, WINDOWED)
    _assert_close([plain.last_hidden_state], [ref.last_hidden_state], "without output flags")
    for field in ("last_hidden_state", "fpn_hidden_states", "hidden_states", "attentions"):
        a, b = getattr(out, field), getattr(ref, field)
        _assert_close([a] if isinstance(a, torch.Tensor) else list(a), [b] if isinstance(b, torch.Tensor) else list(b),
                      field)


def test_unknown_query_pool_runs_the_library_forward(calls, launches):
    """A query pool that ``window_attention`` does not compute (here ceil mode) keeps the library's own forward for
    that block and its attention."""
    model, x = _build("timm")
    model.eval()
    block = model.model.blocks[1]
    block.attn.q_pool = nn.MaxPool2d(2, 2, ceil_mode=True)
    with torch.no_grad():
        ref = model(x)
        with patched(model):
            out = model(x)
    assert (calls["n"], launches("fwd")) == (GLOBAL, WINDOWED - 1)  # every block but the one with the unusual pool
    _assert_close(out, ref, "ceil-mode pool")


def test_timm_lookalike_classes_are_not_hiera():
    """timm's MViTv2 and CrossViT have classes named ``MultiScaleBlock`` / ``MultiScaleAttention`` too: a model of
    them holds no Hiera (ValueError), and one that also holds a SAM 2 trunk gets only the trunk patched."""
    mvitv2 = pytest.importorskip("timm.models.mvitv2", reason="timm is not installed")
    lookalike = mvitv2.MultiScaleBlock(dim=8, dim_out=8, num_heads=1, feat_size=(4, 4))
    with pytest.raises(ValueError, match="holds no Hiera attention or block module"):
        patch(nn.Sequential(lookalike))
    trunk, _ = _build("timm")
    both = nn.ModuleDict({"trunk": trunk, "other": lookalike})
    patch(both)
    assert is_patched(trunk) and type(lookalike) is mvitv2.MultiScaleBlock
    assert type(lookalike.attn) is mvitv2.MultiScaleAttention


def test_libraries_registered():
    names = {lib.name for lib in core.LIBRARIES}
    assert {"sam2", "timm_sam2", "transformers_sam2", "ultralytics_sam2"} <= names
    for module in (patch_sam2_mod, patch_timm_mod, patch_transformers_mod, patch_ultralytics_mod):
        assert module.LIBRARY.block_with_attention  # patch(attention=True) patches the windowed blocks
