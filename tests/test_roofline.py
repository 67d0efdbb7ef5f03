"""benchmarks/roofline.py: FLOPs equal FlopCounterMode's, bytes are exact for known ops, every op has a stage and a
kind, the fused column is never above the plain one, and the autocast emulation is CUDA autocast. Meta device only."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import roofline as rl
from hiera_fast import HieraConfig

# 64² images: 16x16 tokens, 4 mask units of 8x8; head dim 32 in every stage
SMALL = {"embed_dim": 32, "image_size": (64, 64), "depths": (1, 2, 2, 1), "num_heads": (1, 2, 4, 8), "num_labels": 10}
SMALL_MAE = dict(SMALL, num_query_pool=2, decoder_hidden_size=64, decoder_depth=1, decoder_num_heads=2)
BF16 = 2  # bytes


@functools.cache
def result(name: str, batch: int, train: bool = False, precision: str | None = None, dtype: str = "bf16"):
    config = HieraConfig(**{"small": SMALL, "small_mae": SMALL_MAE}[name]) if name.startswith("small") else name
    return rl.roofline(config, batch, dtype, train, precision)


CASES = [("small", 2, False, None), ("small", 2, False, "autocast"), ("small", 2, True, None),
         ("small_mae", 2, True, None), ("small_mae", 2, False, None), ("small", 2, False, None, "fp32")]


def flop_counter_total(name: str, batch: int, train: bool, gpu_sdpa: bool = True) -> int:
    """FlopCounterMode on the same model and step, in fp32 on the meta device, SDPA as the GPU runs it."""
    config = HieraConfig(**{"small": SMALL, "small_mae": SMALL_MAE}[name]) if name.startswith("small") else \
        HieraConfig.from_preset(name)
    model = rl.build_meta_model(config).train(train)
    x = torch.empty(batch, config.num_channels, *config.image_size, device="meta")
    sdpa = rl.GpuSdpa() if gpu_sdpa else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter, sdpa, torch.set_grad_enabled(train):
        out = model(x)
        if train:
            loss = out.loss if config.decoder_hidden_size else \
                F.cross_entropy(out.logits, torch.zeros(batch, dtype=torch.long, device="meta"))
            loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name, batch, train", [("small", 2, False), ("small", 2, True), ("small_mae", 2, True),
                                                ("hiera_base_224", 1, False), ("mae_hiera_base_224", 1, True)])
def test_flops_equal_flop_counter(name, batch, train):
    r = result(name, batch, train)
    assert r.total_flops == flop_counter_total(name, batch, train)
    if name == "small_mae":  # the meta device's math SDPA: its backward is 2x the forward, FlashAttention's 2.5x
        flash_bwd = sum(row.flops for row in r.rows if row.name == "_scaled_dot_product_flash_attention_backward")
        assert flash_bwd > 0
        assert r.total_flops - flash_bwd // 5 == flop_counter_total(name, batch, train, gpu_sdpa=False)
    if name.endswith("base_224"):  # the 17.6 / 58 GFLOP per image once quoted leave the attention out
        attention = sum(row.flops for row in r.rows if row.kind == "attention")
        expected = 58.25 if train else 17.60
        assert (r.total_flops - attention) / batch / 1e9 == pytest.approx(expected, abs=0.01)


def test_view_bytes_count_distinct_elements():
    t = torch.empty(4, 6, device="meta", dtype=torch.bfloat16)
    assert rl._view_bytes(t) == 48
    assert rl._view_bytes(t.t()) == 48
    assert rl._view_bytes(t[:, :2]) == 16
    assert rl._view_bytes(torch.empty(6, device="meta").expand(4, 6)) == 24  # a broadcast row is read once
    assert rl._view_bytes(torch.empty(0, 6, device="meta")) == 0
    recorder = rl._Recorder(torch.nn.Module(), "head")
    with recorder:
        t * t  # one tensor read once, the product written once
        t.t().contiguous()  # a copy; the transpose itself is a view
        t.add_(1)  # in place: read and written
    assert [(op.name, rl._plain_bytes(op)) for op in recorder.ops] == [("mul", 96), ("clone", 96), ("add_", 96)]
    assert recorder.views == 1


def block_rows(r, module: str, phase: str = "fwd") -> dict:
    """Rows of one module (exact name) in one phase, by op name, in order."""
    out = {}
    for row in r.rows:
        if row.module == module and row.phase == phase:
            out.setdefault(row.name, []).append(row)
    return out


def test_bytes_of_one_block_exact():
    """Stage 1's block of the small model (bf16 weights, batch 2: 512 tokens of 32 channels), plain and fused."""
    r = result("small", 2)
    T, C, H = 512, 32, 128  # tokens, channels, MLP hidden
    layer = "hiera.encoder.stages.0.layers.0"
    ln1 = block_rows(r, f"{layer}.layernorm_before")["native_layer_norm"][0]
    qkv = block_rows(r, f"{layer}.attn.qkv")["addmm"][0]
    proj = block_rows(r, f"{layer}.attn.proj")["addmm"][0]
    fc1 = block_rows(r, f"{layer}.mlp.fc1")["addmm"][0]
    gelu = block_rows(r, f"{layer}.mlp.activation_fn")["gelu"][0]
    fc2 = block_rows(r, f"{layer}.mlp.fc2")["addmm"][0]
    add_attn, add_mlp = block_rows(r, layer)["add"]
    stats = 2 * T * 4  # LayerNorm's fp32 mean and rstd
    # plain: read every input once, write every output once
    assert qkv.bytes == BF16 * (T * C + 3 * C * C + 3 * C + T * 3 * C)
    assert qkv.flops == 2 * T * C * 3 * C
    assert ln1.bytes == BF16 * (T * C + 2 * C + T * C) + stats
    assert fc1.bytes == BF16 * (T * C + H * C + H + T * H)
    assert gelu.bytes == BF16 * 2 * T * H
    assert add_mlp.bytes == BF16 * 3 * T * C
    # fused: LayerNorm recomputed in qkv's prologue (reads x), qkv writes its output for attention
    assert ln1.bytes_fused == BF16 * (T * C + 2 * C) and ln1.kernel == -1
    assert qkv.bytes_fused == BF16 * (3 * C * C + 3 * C + T * 3 * C)
    # proj reads the attention output, the residual add in its epilogue reads x and writes the new x
    assert proj.bytes_fused == BF16 * (T * C + C * C + C) and add_attn.kernel == proj.kernel
    assert add_attn.bytes_fused == BF16 * 2 * T * C
    # one MLP kernel: norm recomputed, hidden on chip, residual add in fc2's epilogue (x read once, by the norm)
    assert fc1.kernel == gelu.kernel == fc2.kernel == add_mlp.kernel
    assert (fc1.bytes_fused, gelu.bytes_fused, fc2.bytes_fused) == (BF16 * (H * C + H), 0, BF16 * (C * H + C))
    assert add_mlp.bytes_fused == BF16 * T * C
    # stage 2's pooled residual: max over the proj output; its unread indices are not written when fused
    pool = block_rows(r, "hiera.encoder.stages.1.layers.0")["max"][0]
    assert pool.bytes == BF16 * (T * 2 * C + T // 4 * 2 * C) + 8 * T // 4 * 2 * C
    assert pool.bytes_fused == BF16 * (T * 2 * C + T // 4 * 2 * C)
    # the attention call as one kernel: read qkv, write out (no lse in inference)
    attn = [row for row in r.rows if row.module == f"{layer}.attn"]
    assert {row.kind for row in attn} == {"attention"}
    assert BF16 * (T * 3 * C + T * C) - len(attn) <= sum(row.bytes_fused for row in attn) <= BF16 * (T * 3 * C + T * C)


def test_attention_fused_bytes_match_design():
    """docs/DESIGN.md, "Performance model": Hiera-B's 24 attention calls read qkv and write out: 6.1 GB at batch 256 in bf16."""
    r = result("hiera_base_224", 1)
    expected, tokens = 0, 3136
    for s, depth in enumerate((2, 3, 16, 3)):
        dim = 96 * 2**s
        for j in range(depth):
            pooled = tokens // 4 if j == 0 and s > 0 else tokens
            expected += BF16 * (tokens * 3 * dim + pooled * dim)
            tokens = pooled
    assert r.attention_calls == 24
    assert r.attention_fused_bytes == expected
    assert 256 * expected / 1e9 == pytest.approx(6.1, abs=0.05)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_every_op_has_a_stage_and_a_kind(case):
    r = result(*case)
    assert r.rows and all(row.stage in rl.STAGES for row in r.rows)
    assert not [row.op for row in r.rows if row.kind == "unknown"]
    other = {(row.name, row.stage) for row in r.rows if row.kind == "other"}
    assert {name for name, _ in other} <= rl.OTHER_OPS and {stage for _, stage in other} <= {"stem"}
    for row in (row for row in r.rows if row.phase != "opt"):  # optimizer rows name their parameter's module
        parts = row.module.split(".")
        if "stages" in parts and "encoder" in parts:
            assert row.stage == f"stage{int(parts[parts.index('stages') + 1]) + 1}", row
        if "embeddings" in parts:
            assert row.stage == "stem", row
        if parts[0] in ("decoder", "multiscale_fusion", "encoder_norm"):
            assert row.stage == "decoder", row
        if row.kind == "attention":
            assert parts[-1] == "attn", row
    train, mae = case[2], case[0] == "small_mae"
    first_block = min(row.index for row in r.rows if row.stage == "stage1")
    for row in r.rows:  # outside the named modules: stem before the encoder (unroll, masking), head / decoder after
        if row.phase == "fwd" and row.module in ("", "hiera") and row.stage != "loss":
            assert row.stage == ("stem" if row.index < first_block else "decoder" if mae else "head"), row
    if not mae:
        assert [row.stage for row in r.rows if row.name == "mean" and row.phase == "fwd"] == ["head"]  # the pool
    stages = {row.stage for row in r.rows}
    assert stages >= {"stem", "stage1", "stage2", "stage3", "stage4", "decoder" if mae else "head"}
    assert ("loss" in stages) == (train or mae) and ("optimizer" in stages) == train
    if train:  # a backward op outside every tagged autograd node is only the loss gradient's seed
        assert [row.name for row in r.rows if row.module == rl.UNTAGGED] == ["ones_like"]
        assert {row.stage for row in r.rows if row.phase == "bwd"} >= {"stem", "stage1", "stage4", "loss"}
        params = rl.build_meta_model(HieraConfig(**(SMALL_MAE if mae else SMALL))).parameters()
        opt = [row for row in r.rows if row.kind == "optimizer"]
        assert sum(row.bytes for row in opt) == 28 * sum(p.numel() for p in params)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_fused_bytes_never_above_plain(case):
    r = result(*case)
    assert all(row.bytes_fused <= row.bytes for row in r.rows), [row for row in r.rows if row.bytes_fused > row.bytes]
    for bucket in r.by_stage() + r.by_kind() + [r.total()]:
        assert bucket.bytes_fused <= bucket.bytes, bucket.name
        assert bucket.floor_fused_s <= bucket.floor_s * (1 + 1e-9), bucket.name
    assert r.total_bytes_fused < r.total_bytes
    attention = next(b for b in r.by_kind() if b.name == "attention")
    assert attention.bytes_fused <= r.attention_fused_bytes < attention.bytes


@pytest.mark.parametrize("gpu", [rl.GPUS["h200"], rl.Gpu("slow GEMMs", 3e12, {"bf16": 1e12, "fp32": 1e12})],
                         ids=["h200", "compute-bound"])
def test_floors(gpu):
    r = result("small_mae", 2, True)
    plain, fused = r.row_floors(gpu)
    for row, t in zip(r.rows, plain):
        assert t == max(row.flops / gpu.rate(row.compute_dtype), row.bytes / gpu.bandwidth)
    total = r.total(gpu)
    assert total.floor_s == pytest.approx(sum(plain)) and total.floor_fused_s == pytest.approx(sum(fused))
    kernels = [max(k.flops / gpu.rate(k.compute_dtype), k.bytes / gpu.bandwidth) for k in r.kernels.values()]
    assert total.floor_fused_s == pytest.approx(sum(kernels))  # each kernel's floor, shared among its ops
    assert sum(b.floor_s for b in r.by_stage(gpu)) == pytest.approx(total.floor_s)
    assert sum(b.floor_fused_s for b in r.by_kind(gpu)) == pytest.approx(total.floor_fused_s)


def test_tables(capsys):
    assert rl.main(["--model", "hiera_tiny_224", "--batch", "2", "--markdown", "--gpu", "h100", "h200"]) == 0
    out = capsys.readouterr().out
    for text in ("| stage | GFLOP/img", "| kind | GFLOP/img", "| **total** |", "images/s", "H100", "H200"):
        assert text in out


class _TwiceLinear(torch.nn.Module):
    """One weight used twice in a forward: autocast casts it once (its cache)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.nn.functional.layer_norm(self.fc(x), (8,)))


def _forward_ops(model: torch.nn.Module, shape: tuple, device: str) -> list[tuple]:
    """(op, dtype, stage) of a training-mode forward of a meta ``model`` under bf16 autocast: real CUDA autocast on
    fake CUDA tensors, or the roofline's emulation on the meta device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True) if device == "cuda" else contextlib.nullcontext()
    with fake:
        if device == "cuda":
            model = model.to_empty(device="cuda")
        x = torch.empty(shape, device=device)
        recorder = rl._Recorder(model.train(), "decoder")
        with rl._module_hooks(recorder), recorder:
            if device == "meta":
                with rl._Tracer(recorder, torch.bfloat16):
                    model(x)
            else:  # torch.autocast refuses a machine without CUDA: set its state as it would
                state = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", torch.bfloat16)
                torch.autocast_increment_nesting()
                try:
                    with rl.GpuSdpa():
                        model(x)
                finally:
                    if torch.autocast_decrement_nesting() == 0:
                        torch.clear_autocast_cache()
                    torch.set_autocast_enabled("cuda", state[0])
                    torch.set_autocast_dtype("cuda", state[1])
    # fake tensors lift the masking's Python scalar (lift_fresh + fill_) where meta makes a scalar_tensor + copy_
    return [(op.name, op.dtype, op.ctx.stage) for op in recorder.ops
            if op.name not in ("lift_fresh", "fill_", "scalar_tensor", "copy_")]


@pytest.mark.parametrize("which", ["mae", "shared weight"])
def test_autocast_emulation_matches_cuda_autocast(which):
    config = HieraConfig(**SMALL_MAE)
    shape = (2, config.num_channels, *config.image_size)
    make = (lambda: rl.build_meta_model(config)) if which == "mae" else (lambda: _TwiceLinear().to("meta"))
    if which != "mae":
        shape = (4, 8)
    try:
        real = _forward_ops(make(), shape, "cuda")
    except (RuntimeError, AssertionError) as err:  # a torch built without CUDA cannot make fake CUDA tensors
        pytest.skip(f"no fake CUDA device here: {err}")
    emulated = _forward_ops(make(), shape, "meta")
    assert any(dtype == "bfloat16" for _, dtype, _ in real) and any(dtype == "float32" for _, dtype, _ in real)
    assert len(real) > (100 if which == "mae" else 5)
    assert emulated == real
