"""SAM 2's Hiera trunk (``hiera_fast.sam2``) against every peer installed: the official ``sam2`` package, timm's
``hieradet_sam2``, transformers' ``Sam2HieraDetModel`` and ultralytics' ``encoders.Hiera``.

Weights are bias-heavy (qkv biases ~ N(0, 1), both position embeddings ~ N(0, 1): they start at zero), so padded
tokens (k = b_k, v = b_v) and window errors show. fp32, every output level, max error relative to the level's
largest entry <= 1e-5. Sizes: 256 with reduced depths (stages 3 and 4 pad 16 -> 28 and 8 -> 14), an "odd windows"
geometry (window_spec (8, 6, 5, 3): stages 2-4 pad, odd windows pool to floor), non-square inputs, five stages (an odd
map pooled), and 1024 with SAM 2.1-tiny's real depths and widths.
"""

from __future__ import annotations

import json

import pytest
import torch

from hiera_fast.sam2 import PRESETS, HieraDetConfig, HieraDetModel, window_attention
from hiera_fast.checkpoints import sam2 as W
from hiera_fast.sam2.model import window_partition, window_unpartition

from helpers import sam2_bias_heavy_ as bias_heavy_

FP32_TOL = 1e-5
SMALL = dict(embed_dim=16, num_heads=1, stages=(1, 2, 3, 2), global_att_blocks=(4,),
             window_pos_embed_bkg_spatial_size=(7, 7))  # window_spec (8, 4, 14, 7); block 4 global
ODD = {**SMALL, "window_spec": (8, 6, 5, 3)}
# five stages: stage 5's pooling block pools an odd 3x3 map (its residual floors to 1x1) in a 4x4 padded window
FIVE = {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1, 1), "q_pool": 4, "window_spec": (8, 4, 4, 4, 2),
        "global_att_blocks": (), "window_pos_embed_bkg_spatial_size": (7, 7)}
GEOMETRIES = {"default-256": (SMALL, (256, 256)), "odd-windows-256": (ODD, (256, 256)),
              "default-256x192": (SMALL, (256, 192)), "five-stages-96": (FIVE, (96, 96))}


# ------------------------------------------------------------------------------------------------ helpers
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_levels_close(got: list[torch.Tensor], ref: list[torch.Tensor], what: str, tol: float = FP32_TOL) -> None:
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"{what} level {i}: {tuple(a.shape)} vs {tuple(b.shape)}"
        err = rel(a, b)
        assert err <= tol, f"{what} level {i}: relative error {err:.2e} > {tol:.0e}"


def official_kwargs(cfg: HieraDetConfig) -> dict:
    """The official (and ultralytics) ``Hiera`` constructor arguments of ``cfg``."""
    return dict(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, drop_path_rate=cfg.drop_path_rate,
                q_pool=cfg.q_pool, q_stride=cfg.q_stride, stages=cfg.stages, dim_mul=cfg.dim_mul,
                head_mul=cfg.head_mul, window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size,
                window_spec=cfg.window_spec, global_att_blocks=cfg.global_att_blocks,
                return_interm_layers=cfg.return_interm_layers)


class Peer:
    """A peer library's trunk: how to build it from a config, run it (NCHW levels, finest first) and name its
    weights."""

    def __init__(self, name: str):
        self.name = name
        if name == "official":
            self.lib = pytest.importorskip("sam2.modeling.backbones.hieradet", reason="sam2 is not installed "
                                           "(SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
        elif name == "ultralytics":
            self.lib = pytest.importorskip("ultralytics.models.sam.modules.encoders",
                                           reason="ultralytics is not installed (pip install ultralytics)")
        elif name == "timm":
            self.lib = pytest.importorskip("timm.models.hieradet_sam2", reason="timm is not installed")
        else:
            self.lib = pytest.importorskip("transformers", reason="transformers is not installed")

    def build(self, cfg: HieraDetConfig) -> torch.nn.Module:
        if self.name in ("official", "ultralytics"):
            return self.lib.Hiera(**official_kwargs(cfg))
        if self.name == "timm":
            return self.lib.HieraDet(
                embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, stages=cfg.stages, q_pool=cfg.q_pool,
                q_stride=cfg.q_stride, dim_mul=cfg.dim_mul, head_mul=cfg.head_mul,
                global_pos_size=cfg.window_pos_embed_bkg_spatial_size, window_spec=cfg.window_spec,
                global_att_blocks=cfg.global_att_blocks, drop_path_rate=cfg.drop_path_rate, num_classes=0)
        data = {k: v for k, v in cfg.to_transformers_dict().items() if k != "model_type"}
        return self.lib.Sam2HieraDetModel(self.lib.Sam2HieraDetConfig(**data))

    def run(self, model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        if self.name == "timm":
            return model.forward_intermediates(x, intermediates_only=True)
        if self.name == "transformers":
            return [h.permute(0, 3, 1, 2) for h in model(x).intermediate_hidden_states]
        return model(x)

    def checkpoint(self, model: torch.nn.Module) -> dict:
        """The peer's weights in its own checkpoint format: official / ultralytics as a whole SAM 2 model's
        ``{"model": {"image_encoder.trunk.*": ...}}``, transformers as a ``Sam2Model``'s
        ``vision_encoder.backbone.*``, timm as its state dict."""
        state = model.state_dict()
        if self.name in ("official", "ultralytics"):
            return {"model": {f"image_encoder.trunk.{k}": v for k, v in state.items()}}
        if self.name == "transformers":
            return {f"vision_encoder.backbone.{k}": v for k, v in state.items()}
        return state

    def load_ours(self, model: torch.nn.Module, ours: HieraDetModel) -> None:
        """Give the peer ``ours``' weights (the inverse key maps)."""
        state = ours.state_dict()
        if self.name == "transformers":
            model.load_state_dict(W.to_transformers_keys(state))
        elif self.name == "timm":
            timm_state = {k.replace("mlp.layers.0.", "mlp.fc1.").replace("mlp.layers.1.", "mlp.fc2."): v
                          for k, v in state.items()}
            missing, unexpected = model.load_state_dict(timm_state, strict=False)
            assert not unexpected and all(k.startswith("head.") for k in missing)
        else:
            model.load_state_dict(state)


PEERS = ["official", "timm", "transformers", "ultralytics"]


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("peer_name", PEERS)
def test_matches_peer_at_padded_geometries(peer_name, geometry):
    """The peer's own checkpoint format → from_pretrained → every level equals the peer's (batch 2)."""
    peer = Peer(peer_name)
    kwargs, (height, width) = GEOMETRIES[geometry]
    cfg = HieraDetConfig(**kwargs)
    theirs = bias_heavy_(peer.build(cfg)).eval()
    ours = HieraDetModel.from_pretrained(peer.checkpoint(theirs), config=cfg).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        ref = peer.run(theirs, x)
        got = ours(x)
    assert [tuple(r.shape) for r in ref] == [(2, c, height // 4 // 2**s, width // 4 // 2**s)
                                             for s, c in enumerate(cfg.stage_dims)]
    assert_levels_close(got, ref, f"{peer_name} {geometry}")


def test_padding_geometry_is_what_the_tests_claim():
    """The 256 geometries really pad (else the parity tests above could not see a padding error)."""
    for kwargs, (height, width) in GEOMETRIES.values():
        cfg = HieraDetConfig(**kwargs)
        grid, padded = cfg.token_grid(height, width), []
        for spec in cfg.block_specs():
            if spec.window_size and (grid[0] % spec.window_size or grid[1] % spec.window_size):
                padded.append(spec.index)
            if spec.q_stride:
                grid = (grid[0] // spec.q_stride, grid[1] // spec.q_stride)
        assert len(padded) >= 2, (kwargs, padded)


@pytest.fixture(scope="module")
def tiny_1024():
    """SAM 2.1-tiny (real depths and widths), bias-heavy, and its four levels on one 1024x1024 image."""
    torch.manual_seed(1024)
    ours = bias_heavy_(HieraDetModel(HieraDetConfig.from_preset("sam2.1_hiera_tiny"))).eval()
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        return ours, x, ours(x)


@pytest.mark.parametrize("peer_name", PEERS)
def test_matches_peer_at_1024_with_real_depths(peer_name, tiny_1024):
    """Ours → the peer (inverse key maps) at SAM 2's own size: stage 3 pads 64 -> 70, stage 4 32 -> 35."""
    peer = Peer(peer_name)
    ours, x, got = tiny_1024
    theirs = peer.build(ours.config).eval()
    peer.load_ours(theirs, ours)
    with torch.no_grad():
        ref = peer.run(theirs, x)
    assert [tuple(r.shape[1:]) for r in ref] == [(96, 256, 256), (192, 128, 128), (384, 64, 64), (768, 32, 32)]
    assert_levels_close(got, ref, f"{peer_name} 1024")


def test_backward_matches_timm():
    """Gradients of the input and of every parameter equal timm's (padded geometry)."""
    peer = Peer("timm")
    cfg = HieraDetConfig(**ODD)
    theirs = bias_heavy_(peer.build(cfg)).eval()
    ours = HieraDetModel.from_pretrained(peer.checkpoint(theirs), config=cfg).eval()
    x = torch.randn(1, 3, 256, 256)
    grads = []
    for model, run in ((theirs, peer.run), (ours, lambda m, v: m(v))):
        xx = x.clone().requires_grad_(True)
        sum(o.pow(2).sum() for o in run(model, xx)).backward()
        grads.append((xx.grad, dict(model.named_parameters())))
    (gx_t, p_t), (gx_o, p_o) = grads
    assert rel(gx_o, gx_t) <= FP32_TOL
    for name, p in p_o.items():
        timm_name = name.replace("mlp.layers.0.", "mlp.fc1.").replace("mlp.layers.1.", "mlp.fc2.")
        assert rel(p.grad, p_t[timm_name].grad) <= FP32_TOL, name


@pytest.mark.parametrize("peer_name", ["official", "timm"])
def test_drop_path_in_training_matches_peer(peer_name):
    """In training mode with drop path, the same seed draws the same samples (the official draw order)."""
    peer = Peer(peer_name)
    cfg = HieraDetConfig(**SMALL, drop_path_rate=0.5)
    theirs = bias_heavy_(peer.build(cfg)).train()
    ours = HieraDetModel.from_pretrained(peer.checkpoint(theirs), config=cfg).train()
    x = torch.randn(4, 3, 128, 128)
    torch.manual_seed(7)
    ref = peer.run(theirs, x)
    torch.manual_seed(7)
    got = ours(x)
    assert_levels_close(got, ref, f"{peer_name} train")
    torch.manual_seed(8)
    assert rel(ours(x)[-1], got[-1]) > 1e-3  # drop path really drew samples


def test_return_interm_layers_false_returns_the_last_level():
    peer = Peer("official")
    cfg = HieraDetConfig(**SMALL, return_interm_layers=False)
    theirs = bias_heavy_(peer.build(cfg)).eval()
    ours = HieraDetModel.from_pretrained(peer.checkpoint(theirs), config=cfg).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        got, ref = ours(x), theirs(x)
    assert len(got) == 1 and ours.channel_list == theirs.channel_list == [128]
    assert_levels_close(got, ref, "return_interm_layers=False")


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("kwargs", [SMALL, ODD, {**SMALL, "window_spec": (7, 4, 5, 3)}], ids=["default", "odd", "ws7"])
def test_accepted_sizes_are_exactly_the_ones_timm_runs(kwargs):
    """Every size in a sweep (square and x256, batch 2): ours accepts it iff timm (the official code, copied) runs it
    and returns the batch; where both run, the levels agree."""
    peer = Peer("timm")
    cfg = HieraDetConfig(**kwargs)
    theirs = bias_heavy_(peer.build(cfg)).eval()
    ours = HieraDetModel.from_pretrained(peer.checkpoint(theirs), config=cfg).eval()
    rejected = 0
    for size in [(n, n) for n in range(68, 330, 8)] + [(n, 256) for n in (84, 160, 196, 224, 252, 1008 // 4)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            try:
                ref = peer.run(theirs, x)
                runs = all(r.shape[0] == 2 for r in ref)
            except (RuntimeError, ValueError, ZeroDivisionError):
                runs = False
            if runs:
                assert_levels_close(ours(x), ref, f"{kwargs.get('window_spec')} {size}")
            else:
                rejected += 1
                with pytest.raises(ValueError, match="HieraDet cannot run"):
                    ours(x)
    assert rejected > 0


def test_1008_is_rejected_up_front_with_the_reason():
    cfg = HieraDetConfig.from_preset("sam2.1_hiera_tiny")
    with pytest.raises(ValueError, match=r"252x252 patch grid is not a multiple of window_spec\[0\]=8.*try 992x992 "
                                         r"or 1024x1024"):
        cfg.check_image_size(1008, 1008)
    assert cfg.check_image_size(1024, 1024) == (256, 256)
    assert cfg.check_image_size(1021, 1023) == (256, 256)  # the conv's grid: ceil(n / 4)
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.check_image_size(1024, 1001)  # 251 tokens wide
    model = HieraDetModel(HieraDetConfig(**SMALL))
    with pytest.raises(ValueError, match="HieraDet cannot run a 100x128 input"):
        model(torch.randn(1, 3, 100, 128))


def test_unpartition_rule():
    """A pooling block whose window count changes is rejected (window_spec (8, 6, 5, 3): 160 → stage 4's first
    block cuts 10 tokens into 2 windows of 5, its pooled 5 into 3 windows of 2)."""
    cfg = HieraDetConfig(**ODD)
    with pytest.raises(ValueError, match="pooling block 6 cuts its height of 10 tokens into 2 windows of 5, but its "
                                         "pooled height of 5 into 3 windows of 2"):
        cfg.check_image_size(160, 160)


# ------------------------------------------------------------------------------------------------ pieces
def test_window_attention_matches_explicit_softmax():
    """4-D SDPA on views == softmax(q k^T / sqrt(d)) v per window and head, with the queries max-pooled in the
    window (a 5x5 window pools to 2x2: floor)."""
    qkv = torch.randn(6, 5, 5, 3 * 12, dtype=torch.float64)
    out = window_attention(qkv, num_heads=3, q_stride=2)
    q, k, v = qkv.view(6, 5, 5, 3, 3, 4).unbind(3)  # [B', h, w, heads, hd]
    q = torch.nn.functional.max_pool2d(q.reshape(6, 5, 5, 12).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    q = q.reshape(6, 4, 3, 4).transpose(1, 2)  # [B', heads, 4, hd]
    k, v = (t.reshape(6, 25, 3, 4).transpose(1, 2) for t in (k, v))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # [B', heads, 4, hd]
    assert out.shape == (6, 2, 2, 12)
    assert torch.allclose(out, ref.transpose(1, 2).reshape(6, 2, 2, 12), atol=1e-12)
    with pytest.raises(ValueError, match="divisible by num_heads=5"):
        window_attention(qkv, num_heads=5)


def test_window_partition_round_trip_pads_with_zeros():
    x = torch.randn(2, 10, 7, 3)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 3 * 2, 4, 4, 3) and padded == (12, 8)
    assert windows[-1, 2:].abs().sum() == 0 and windows[-1, :, 3:].abs().sum() == 0  # bottom-right window's pad
    assert torch.equal(window_unpartition(windows, 4, padded, (10, 7)), x)


# ------------------------------------------------------------------------------------------------ config
YAML_TRUNKS = {  # sam2/configs/sam2.1/*.yaml (trunk) over the official Hiera defaults
    "tiny": (96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7), (8, 4, 14, 7)),
    "small": (96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7), (8, 4, 14, 7)),
    "base_plus": (112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14), (8, 4, 14, 7)),
    "large": (144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
}


@pytest.mark.parametrize("size", list(YAML_TRUNKS))
def test_presets(size):
    a, b = HieraDetConfig.from_preset(f"sam2.1_hiera_{size}"), HieraDetConfig.from_preset(f"sam2_hiera_{size}")
    assert a == b  # SAM 2.0 and 2.1 trunks differ in nothing but their weights
    assert (a.embed_dim, a.num_heads, a.stages, a.global_att_blocks, a.window_pos_embed_bkg_spatial_size,
            a.window_spec) == YAML_TRUNKS[size]
    short = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}[size]
    for alias in (f"sam2.1_hiera_{short}", f"facebook/sam2.1-hiera-{size.replace('_', '-')}", f"sam2.1_{short}.pt",
                  f"sam2_hiera_{size}.fb_r896"):
        assert HieraDetConfig.from_preset(alias) == a, alias
    # the presets are the trunks transformers builds for the hub checkpoints' configs
    assert HieraDetConfig.from_transformers_dict(a.to_transformers_dict()) == a


def test_transformers_defaults_are_sam2_1_tiny():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    assert HieraDetConfig.from_transformers_dict(transformers.Sam2Config().to_dict()) == \
        HieraDetConfig.from_preset("sam2.1_hiera_tiny")
    assert HieraDetConfig.from_transformers_dict({"model_type": "sam2_hiera_det_model"}) == \
        HieraDetConfig.from_preset("sam2.1_hiera_tiny")


@pytest.mark.parametrize("kwargs, match", [
    (dict(window_spec=(8, 4, 14)), "window_spec needs one window per stage"),
    (dict(global_att_blocks=(12, 16, 24)), r"global_att_blocks \[24\] are not block indices"),
    (dict(global_att_blocks=(2,)), "pooling block 2 .* cannot attend globally"),
    (dict(q_pool=4), r"q_pool must be in \[0, 3\]"),
    (dict(q_stride=(2, 1)), "q_stride must be square"),
    (dict(num_heads=5), "stage 1 has 5 heads"),
    (dict(dim_mul=1.0), "keeps the width at pooling block 2"),
    (dict(window_spec=(8, 1, 14, 7)), "pooling block 5 attends in windows of 1"),
    (dict(stages=(2, 0, 16, 3)), "stages must be positive"),
    (dict(embed_dim=96.5), "embed_dim must be an int"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HieraDetConfig(**kwargs)


def test_block_schedule_of_base_plus():
    """The lag: a stage's first block keeps the previous stage's window; pooling blocks are 2, 5, 21."""
    specs = HieraDetConfig.from_preset("sam2.1_hiera_base_plus").block_specs()
    assert [s.index for s in specs if s.q_stride] == [2, 5, 21]
    assert [specs[i].window_size for i in (0, 2, 3, 5, 6, 12, 21, 22)] == [8, 8, 4, 4, 14, 0, 14, 7]
    assert [specs[i].num_heads for i in (0, 2, 5, 21)] == [2, 4, 8, 16]


# ------------------------------------------------------------------------------------------------ weights
def test_save_pretrained_is_a_transformers_directory(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = HieraDetConfig(**ODD)
    ours = bias_heavy_(HieraDetModel(cfg)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.Sam2HieraDetModel.from_pretrained(tmp_path).eval()
    again = HieraDetModel.from_pretrained(tmp_path).eval()
    assert again.config == cfg
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        got = ours(x)
        assert_levels_close([h.permute(0, 3, 1, 2) for h in theirs(x).intermediate_hidden_states], got, "saved")
        assert all(torch.equal(a, b) for a, b in zip(again(x), got))


def test_transformers_sam2_model_directory(tmp_path):
    """A whole ``Sam2Model`` saved by transformers (config.json + safetensors): its vision backbone loads, the
    config comes from its config.json."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = HieraDetConfig(**SMALL)
    vision = transformers.Sam2VisionConfig(backbone_config=cfg.to_transformers_dict(),
                                           backbone_channel_list=cfg.stage_dims[::-1],
                                           backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])
    theirs = transformers.Sam2Model(transformers.Sam2Config(vision_config=vision.to_dict()))
    bias_heavy_(theirs.vision_encoder.backbone).eval()
    theirs.save_pretrained(tmp_path)
    ours = HieraDetModel.from_pretrained(tmp_path).eval()
    assert ours.config == cfg
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = [h.permute(0, 3, 1, 2) for h in theirs.vision_encoder.backbone(x).intermediate_hidden_states]
        assert_levels_close(ours(x), ref, "Sam2Model directory")


def test_official_checkpoint_file_and_preset_recognition(tmp_path):
    """An official-format ``.pt`` of a whole model (trunk + other parts) loads with config=None: the preset is
    recognised from the shapes (meta tensors: nothing is allocated)."""
    for name in ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"):
        with torch.device("meta"):
            state = HieraDetModel(HieraDetConfig.from_preset(name)).state_dict()
        assert W.guess_config(state) == HieraDetConfig.from_preset(name)
    cfg = HieraDetConfig(**SMALL)
    ours = bias_heavy_(HieraDetModel(cfg)).eval()
    full = {f"image_encoder.trunk.{k}": v for k, v in ours.state_dict().items()}
    full.update({"image_encoder.neck.convs.0.conv.weight": torch.zeros(1), "sam_mask_decoder.x": torch.zeros(1)})
    torch.save({"model": full}, tmp_path / "sam2.1_small_test.pt")
    with pytest.raises(ValueError, match="matches no SAM 2 preset: pass config="):
        HieraDetModel.from_pretrained(tmp_path / "sam2.1_small_test.pt")
    again = HieraDetModel.from_pretrained(tmp_path / "sam2.1_small_test.pt", config=cfg)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_checkpoint_errors(tmp_path):
    cfg = HieraDetConfig(**SMALL)
    state = HieraDetModel(cfg).state_dict()
    with pytest.raises(ValueError, match="unrecognised SAM 2 Hiera checkpoint"):
        HieraDetModel.from_pretrained({"foo.weight": torch.zeros(1)}, config=cfg)
    with pytest.raises(ValueError, match="missing: .*blocks.7.mlp.layers.1.bias"):
        HieraDetModel.from_pretrained({k: v for k, v in state.items() if not k.startswith("blocks.7.")}, config=cfg)
    with pytest.raises(ValueError, match="wrong shape"):
        HieraDetModel.from_pretrained(state, config=HieraDetConfig(**{**SMALL, "embed_dim": 32}))
    with pytest.raises(ValueError, match="unknown SAM 2 preset"):
        HieraDetModel.from_pretrained(state, config="sam3_hiera_tiny")
    with pytest.raises(FileNotFoundError):
        HieraDetModel.from_pretrained(tmp_path / "nope.pt", config=cfg)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hiera"}))
    with pytest.raises(ValueError, match="not a SAM 2 Hiera config"):
        HieraDetModel.from_pretrained(tmp_path)


def test_config_json_of_timm_and_transformers():
    assert W.config_from_json({"architecture": "sam2_hiera_small.fb_r896", "num_classes": 0}) == \
        HieraDetConfig.from_preset("sam2.1_hiera_small")
    large = HieraDetConfig.from_preset("sam2.1_hiera_large")
    assert W.config_from_json({"model_type": "sam2", "vision_config": {"backbone_config": {
        **large.to_transformers_dict()}}}) == large
    with pytest.raises(ValueError, match="'hiera_base_224' is not a SAM 2 Hiera"):
        W.config_from_json({"architecture": "hiera_base_224"})
    with pytest.raises(ValueError, match="neither transformers'"):
        W.config_from_json({"stages": [1, 2, 7, 2]})


def test_timm_head_is_dropped():
    peer = Peer("timm")
    cfg = HieraDetConfig(**SMALL)
    state = peer.build(cfg).state_dict()
    assert any(k.startswith("head.norm.") for k in state)
    HieraDetModel.from_pretrained(state, config=cfg)  # head.norm only: no warning needed
    state["head.fc.weight"], state["head.fc.bias"] = torch.zeros(5, 128), torch.zeros(5)
    with pytest.warns(UserWarning, match="classifier head .* dropped"):
        HieraDetModel.from_pretrained(state, config=cfg)


def test_presets_listed():
    assert sorted(PRESETS) == sorted(f"{v}_hiera_{s}" for v in ("sam2", "sam2.1") for s in YAML_TRUNKS)
