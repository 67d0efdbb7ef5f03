"""GPU lane: bf16 parity (the interpreter cannot check bf16), full-size Hiera geometries, CUDA graphs.

Skipped without CUDA. Run on a GPU machine with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hiera_fast as H
from hiera_fast import ops
from hiera_fast.ops import reference
from helpers import max_abs, peaky_attention_, randomize_, tiny_image_config, tiny_mae_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Hiera-B's attention calls at 224² and Hiera-B-16x224's global call, batch 8 (B, T, nw, q_stride, heads, hd)
FULL_SIZE = [
    (8, 64, 49, 1, 1, 96), (8, 64, 49, 4, 2, 96), (8, 16, 49, 1, 2, 96), (8, 16, 49, 4, 4, 96),
    (8, 196, 1, 1, 4, 96), (8, 196, 1, 4, 8, 96), (8, 49, 1, 1, 8, 96),
    (2, 1568, 1, 1, 4, 96), (2, 64, 392, 4, 2, 96), (8, 64, 49, 1, 2, 56), (8, 64, 49, 1, 2, 72),
]


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


@pytest.mark.default_global_attention
def test_bf16_model_fused_within_twice_eager_error():
    """Hiera-B at 224², bf16 autocast, fused=True's default route (our kernels for mask-unit attention, SDPA for
    global attention): logits and every stage's output within twice eager bf16's error against float64 (+ 1e-2),
    attention peaked so that a wrong window or pooled candidate shows (tests/test_fused_model.py runs the same rule
    with our kernels everywhere)."""
    config = H.HieraConfig.from_preset("hiera_base_224")
    base = peaky_attention_(H.HieraForImageClassification(config)).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        gold = copy.deepcopy(base).double()(x.double(), output_hidden_states=True)
        gold = (gold.logits, *gold.hidden_states)
        errors, launched = {}, None
        for fused in (False, True):
            model = copy.deepcopy(base)
            model.fused = fused
            before = ops.kernel_launches.copy()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, output_hidden_states=True)
            if fused:
                launched = ops.kernel_launches - before
            errors[fused] = [_err(a, b) / b.abs().max().item() for a, b in
                             zip((out.logits, *out.hidden_states), gold, strict=True)]
    windowed = sum(m.use_mask_unit_attn for m in base.modules() if isinstance(m, H.model.HieraMaskUnitAttention))
    assert 0 < windowed < sum(config.depths)
    assert launched["mask_unit_attention_fwd"] == windowed  # global attention runs SDPA on CUDA by default
    assert launched["global_attention_sdpa"] == sum(config.depths) - windowed
    for i, (ours, eager) in enumerate(zip(errors[True], errors[False], strict=True)):
        assert ours <= 2 * eager + 1e-2, f"output {i}: fused {ours:.2e} > 2 x eager {eager:.2e} + 1e-2"


@pytest.mark.parametrize("global_attention", [
    "triton",  # pinned by tests/conftest.py: every attention call runs our kernels
    pytest.param("sdpa", marks=pytest.mark.default_global_attention),  # what fused=True runs by default on CUDA
])
def test_cuda_graphs_training_step(global_attention):
    """torch.compile(mode="reduce-overhead") captures the fused forward+backward in CUDA graphs, with global attention
    by our kernel and by the default SDPA route; losses and gradients equal eager's."""
    # mask ratio 0.5 keeps 2 of the 4 mask units, so the windowed blocks are windowed (one kept window is global
    # attention, which fused=True runs by SDPA on CUDA unless pinned to our kernel, as tests/conftest.py does)
    eager = randomize_(H.HieraForPreTraining(tiny_mae_config(mask_ratio=0.5)), std=0.05).cuda()
    fused = copy.deepcopy(eager)
    fused.fused = True
    step = torch.compile(lambda m, x, n: m(x, noise=n).loss, mode="reduce-overhead", fullgraph=True)
    x, noise = torch.randn(4, 3, 64, 64, device="cuda"), torch.rand(4, 4, device="cuda")
    for p in fused.parameters():  # accumulate into our own buffers: a first-step .grad taken over from the graphs'
        p.grad = torch.zeros_like(p)  # memory pool is freed when the next generation starts
    before = ops.kernel_launches.copy()
    for i in range(3):  # the first runs record; later ones replay the graphs, which the launch counter cannot see
        torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # one trace: no guard fails on the next step
            loss = step(fused, x, noise)
        loss.backward()
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] > 0 and launched["mask_unit_attention_bwd"] > 0
    for _ in range(3):  # the same gradient accumulation, eager
        ref = eager(x, noise=noise).loss
        ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for (name, p), q in zip(fused.named_parameters(), eager.parameters(), strict=True):
        if q.grad is not None:
            assert (p.grad - q.grad).abs().max().item() <= 1e-3 * max(q.grad.abs().max().item(), 1e-6), name
    # the route this model takes, eager (SDPA calls are counted outside torch.compile only: ops._count)
    before = ops.kernel_launches.copy()
    with torch.no_grad():
        fused(x, noise=noise)
    assert ((ops.kernel_launches - before)["global_attention_sdpa"] > 0) == (global_attention == "sdpa")


@pytest.mark.parametrize("kind, global_attention", [
    ("mae", "triton"), pytest.param("mae", "sdpa", marks=pytest.mark.default_global_attention),
    ("classifier", "triton"), ("mae-checkpointed", "triton")])
def test_fused_training_step_has_no_host_sync(kind, global_attention):
    """A fused forward + backward never waits for the GPU (``torch.cuda.set_sync_debug_mode("error")`` raises at any
    sync): a sync per step would stall an eager training loop, which is host-bound at Hiera-B's sizes."""
    if kind == "classifier":
        model = H.HieraForImageClassification(tiny_image_config(), fused=True)
    else:
        model = H.HieraForPreTraining(tiny_mae_config(mask_ratio=0.5), fused=True)
    model = randomize_(model, std=0.05).cuda().train()
    if kind == "mae-checkpointed":
        model.gradient_checkpointing_enable()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    labels = torch.zeros(4, dtype=torch.long, device="cuda")

    def step():
        out = model(x, labels=labels) if kind == "classifier" else model(x)
        out.loss.backward()

    step()  # compiles the kernels first
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        before = ops.kernel_launches.copy()
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    launched = ops.kernel_launches - before
    assert launched["mask_unit_attention_fwd"] > 0 and launched["mask_unit_attention_bwd"] > 0
    assert (launched["global_attention_sdpa"] > 0) == (global_attention == "sdpa"), launched


def test_inductor_fullgraph_mae_forward_backward(monkeypatch):
    """Inductor, fullgraph: masking, the custom ops and their autograd trace without graph breaks, and the compiled
    loss, prediction and every gradient equal eager's. (GPU lane: on a CPU the compile tests use aot_eager, which
    traces the same graph; inductor's CPU code generation takes about a minute there.)"""
    device = "cuda"
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compile for real, not from disk
    model = randomize_(H.HieraForPreTraining(tiny_mae_config(), fused=True), std=0.1).to(device)
    x, noise = torch.randn(2, 3, 64, 64, device=device), torch.rand(2, 4, device=device)
    ref = model(x, noise=noise)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, noise=noise)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    assert max_abs(out.logits, ref.logits) <= 1e-5 * ref.logits.abs().max().item()
    for p, g in zip(model.parameters(), ref_grads, strict=True):
        assert max_abs(p.grad, g) <= 1e-4 * max(g.abs().max().item(), 1e-6)


GLOBAL_CASES = [g for g in FULL_SIZE if g[2] == 1]


@pytest.mark.default_global_attention
@pytest.mark.parametrize("dtype, B, T, nw, s, heads, hd",
                         [(dt, *g) for dt in (torch.bfloat16, torch.float16) for g in GLOBAL_CASES],
                         ids=[f"{n}-B{g[0]}T{g[1]}s{g[3]}h{g[4]}d{g[5]}" for n in ("bf16", "fp16") for g in GLOBAL_CASES])
def test_global_attention_sdpa_within_twice_eager_error(dtype, B, T, nw, s, heads, hd):
    """fused=True's default for global attention on CUDA: SDPA on views of qkv, the query pooled by our max-pool."""
    qkv = torch.randn(B, T, 3 * heads * hd, device="cuda", dtype=dtype)
    grad = torch.randn(B, T // s, heads * hd, device="cuda", dtype=dtype)
    ref_in = qkv.double().requires_grad_(True)
    ref = reference.mask_unit_attention_official(ref_in, heads, s, 1)
    (d_ref,) = torch.autograd.grad(ref, ref_in, grad.double())
    results = {}
    for fused in (True, False):
        x = qkv.clone().requires_grad_(True)
        before = ops.kernel_launches.copy()
        out = ops.mask_unit_attention(x, heads, s, 0, False, fused=fused)
        (d_x,) = torch.autograd.grad(out, x, grad)
        launched = ops.kernel_launches - before
        assert launched["global_attention_sdpa"] == fused and launched["mask_unit_attention_fwd"] == 0
        results[fused] = (_err(out, ref), _err(d_x, d_ref))
    floor = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    (out_err, grad_err), (eager_out_err, eager_grad_err) = results[True], results[False]
    assert out_err <= 2 * eager_out_err + floor * ref.abs().max().item()
    assert grad_err <= 2 * eager_grad_err + floor * d_ref.abs().max().item()


# last, the long parity sweep, dtype-major: bf16 first (what only a GPU can check), then fp32 (its compiled path,
# 3xTF32 dots with a register budget, differs most from what the interpreter lane runs), so a time-limited run
# loses fp16 first
@pytest.mark.parametrize("dtype, B, T, nw, s, heads, hd",
                         [(dt, *g) for dt in (torch.bfloat16, torch.float32, torch.float16) for g in FULL_SIZE],
                         ids=[f"{n}-B{g[0]}T{g[1]}nw{g[2]}s{g[3]}h{g[4]}d{g[5]}" for n in ("bf16", "fp32", "fp16")
                              for g in FULL_SIZE])
def test_forward_backward_within_twice_eager_error(dtype, B, T, nw, s, heads, hd):
    """Our kernels (global attention too: tests/conftest.py pins them) vs float64; eager's own error sets the bar."""
    qkv = torch.randn(B, T * nw, 3 * heads * hd, device="cuda", dtype=dtype)
    grad = torch.randn(B, T // s * nw, heads * hd, device="cuda", dtype=dtype)
    ref_in = qkv.double().requires_grad_(True)
    ref = reference.mask_unit_attention_official(ref_in, heads, s, nw)
    (d_ref,) = torch.autograd.grad(ref, ref_in, grad.double())
    results = {}
    for fused in (True, False):
        x = qkv.clone().requires_grad_(True)
        before = ops.kernel_launches.copy()
        out = ops.mask_unit_attention(x, heads, s, T // s if nw > 1 else 0, nw > 1, fused=fused)
        (d_x,) = torch.autograd.grad(out, x, grad)
        launched = ops.kernel_launches - before
        assert launched == ({"mask_unit_attention_fwd": 1, "mask_unit_attention_bwd": 1} if fused else {})
        results[fused] = (_err(out, ref), _err(d_x, d_ref))
    floor = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    (out_err, grad_err), (eager_out_err, eager_grad_err) = results[True], results[False]
    assert out_err <= 2 * eager_out_err + floor * ref.abs().max().item()
    assert grad_err <= 2 * eager_grad_err + floor * d_ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kernels_are_deterministic(dtype):
    """Two forward + backward runs of every Hiera-B call (windowed and global, our kernels) and of the pooled residual
    give bitwise-equal outputs and gradients: the kernels use no atomics, so a training run replays exactly."""
    for B, T, nw, s, heads, hd in FULL_SIZE:
        qkv = torch.randn(B, T * nw, 3 * heads * hd, device="cuda", dtype=dtype)
        grad = torch.randn(B, T // s * nw, heads * hd, device="cuda", dtype=dtype)
        runs = []
        for _ in range(2):
            x = qkv.clone().requires_grad_(True)
            out = ops.mask_unit_attention(x, heads, s, T // s if nw > 1 else 0, nw > 1, fused=True)
            (d_x,) = torch.autograd.grad(out, x, grad)
            runs.append((out, d_x))
        (out_a, d_a), (out_b, d_b) = runs
        assert torch.equal(out_a, out_b) and torch.equal(d_a, d_b), (B, T, nw, s, heads, hd)
    x = torch.randn(8, 3136, 192, device="cuda", dtype=dtype)
    grads = []
    for _ in range(2):
        y = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ops.unrolled_max_pool(y, 4, fused=True), y, torch.ones(8, 784, 192, device="cuda",
                                                                                          dtype=dtype))
        grads.append(g)
    assert torch.equal(*grads)


def test_aot_inductor_packages_a_fused_model(tmp_path):
    """``torch.export`` + ``torch._inductor.aoti_compile_and_package`` package a fused model (our ops are custom ops
    in the exported graph), and the loaded package gives the model's logits."""
    model = randomize_(H.HieraForImageClassification(tiny_image_config(), fused=True), std=0.1).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    ep = torch.export.export(model, (x,))
    assert any("hiera_fast.mask_unit_attention_fwd" in str(n.target) for n in ep.graph.nodes)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "hiera.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        ref = model(x).logits
        out = loaded(x)
    logits = out.logits if hasattr(out, "logits") else torch.utils._pytree.tree_leaves(out)[0]
    assert (logits - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_bf16_sam2_trunk_fused_within_twice_eager_error():
    """SAM 2.1 base_plus's trunk at 1024², batch 1, bf16 autocast, qkv biases and position embeddings ~ N(0, 1) (so
    padded tokens and wrong windows show): every stage output and every parameter's gradient with fused=True (the
    window kernels in every windowed block, forward and backward) within twice eager bf16's error against float64
    (+ 1e-2 of the largest entry)."""
    from hiera_fast.sam2 import HieraDetConfig, HieraDetModel

    base = HieraDetModel(HieraDetConfig.from_preset("sam2.1_hiera_base_plus")).cuda()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("qkv.bias") or "pos_embed" in name:
                p.normal_(0.0, 1.0)
    x = torch.randn(1, 3, 1024, 1024, device="cuda")

    def run(model, x):
        model.zero_grad(set_to_none=True)
        outs = model(x)
        sum((o.float() * torch.linspace(-1, 2, o.numel(), device="cuda").view_as(o)).sum() for o in outs).backward()
        return [o.detach().double() for o in outs] + [p.grad.double() for p in model.parameters()]

    gold = run(copy.deepcopy(base).double(), x.double())
    errors, launched = {}, None
    for fused in (False, True):
        model = copy.deepcopy(base)
        model.fused = fused
        before = ops.kernel_launches.copy()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = run(model, x)
        if fused:
            launched = ops.kernel_launches - before
        errors[fused] = [_err(a, b) / b.abs().max().clamp_min(1e-30).item() for a, b in zip(got, gold, strict=True)]
    windowed = sum(1 for spec in base.config.block_specs() if spec.window_size)
    assert (launched["window_attention_fwd"], launched["window_attention_bwd"]) == (windowed, windowed)
    names = [f"level {i}" for i in range(len(gold) - len(list(base.parameters())))] + [n for n, _ in
                                                                                      base.named_parameters()]
    for name, ours, eager in zip(names, errors[True], errors[False], strict=True):
        assert ours <= 2 * eager + 1e-2, f"{name}: fused {ours:.2e} > 2 x eager {eager:.2e} + 1e-2"
