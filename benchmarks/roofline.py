"""A whole-model roofline: every aten op of a Hiera inference forward or training step with its FLOPs and its least
HBM traffic, grouped by stage and kind, and the floor time on an H100 / H200. Runs on a CPU: the model is built and
run on the ``meta`` device (no memory, any batch).

    python -m benchmarks.roofline --model hiera_base_224 --batch 256 --dtype bf16 --gpu h100 [--markdown]
    python -m benchmarks.roofline --model mae_hiera_base_224 --batch 128 --dtype bf16 --gpu h100 h200 --train

:func:`roofline` returns a :class:`Roofline` (``.rows``, ``.by_stage()``, ``.by_kind()``, ``.total_flops``,
``.row_floors(gpu)``) so that a GPU profile can put measured times beside the floors.

**What runs.** ``mae_*`` presets build ``HieraForPreTraining``, the others ``HieraForImageClassification``, with
``fused=False``: attention is PyTorch SDPA on contiguous 4-D windows. Inference: ``eval()`` under ``no_grad``.
``--train``: forward + loss + backward + one AdamW step (a classifier's loss: cross-entropy on the fp32 logits, as
``hiera_fast.bench``'s training step). SDPA runs as the kernel CUDA picks (:class:`GpuSdpa`): FlashAttention for
fp16/bf16, memory-efficient attention for fp32 (the meta device would decompose it into bmm, softmax, bmm).

**Dtypes.** Inference casts the weights (``model.to(dtype)``, as the benchmark suites run inference: every tensor is
bf16); ``--precision autocast`` keeps fp32 weights under autocast instead. Training always runs under autocast with
fp32 weights; ``--dtype fp32`` runs everything in fp32. The meta device has no autocast (and a fake CUDA device cannot
run a backward without a GPU), so :class:`_Tracer` applies CUDA autocast's rules by function name: GEMMs, convs and
SDPA cast their floating inputs to the dtype (a weight once per forward, as autocast's cache does); CUDA autocast's
fp32 ops (``layer_norm``, ``softmax``, ``pow``, ``sum``, the losses, ...) cast to fp32, so LayerNorm outputs are fp32;
every other op follows type promotion (a residual add of an fp32 stream and a bf16 GEMM output is fp32). Each cast is
an op (``_to_copy``) and is counted. ``tests/test_roofline.py`` checks this op by op against real CUDA autocast on a
fake CUDA device.

**FLOPs**: ``torch.utils.flop_counter``'s registry (mm, addmm, bmm, convolution and their backward, SDPA: 4·b·h·q·k·d
forward; FlashAttention's backward 2.5x that, as it recomputes QK^T), so totals equal ``FlopCounterMode``'s on the
same kernels. Elementwise and optimizer FLOPs are not counted.

**Bytes** (plain column): an op reads each input tensor once and writes each output once, at its dtype. A tensor's
bytes are the elements it addresses (a stride-0 broadcast dimension counts once) times the element size; one view
passed twice is read once. Views (``view``, ``permute``, ``t``, ``expand``, ``_unsafe_view``, any output that shares
an input's storage) and uninitialised allocations cost nothing and are not listed (``Roofline.views`` counts them).
In-place ops read and write the mutated tensor (``copy_``, ``fill_``, ``zero_`` and random fills only write it).

**Optimizer**: one row per parameter, as ``torch.optim.AdamW(fused=True)`` moves it: read param, grad, exp_avg,
exp_avg_sq and write param, exp_avg, exp_avg_sq, all fp32 (28 bytes per parameter); the same in the fused column.

**Stages** by the module an op runs in: ``embeddings`` → stem; ``encoder.stages.{s}`` → stage{s+1}; ``pooler``,
``classifier`` → head; ``encoder_norm``, ``multiscale_fusion``, ``decoder`` and the MAE's ``reroll`` of the stage
outputs → decoder; ``HieraForPreTraining.loss`` and the classifier's cross-entropy → loss; AdamW → optimizer. An op
outside these (the unroll, the MAE masking, the token mean-pool) belongs to the stem before the encoder has run and
to the head / decoder after. A backward op belongs to the forward call that made the autograd node it runs (every
node is tagged when made); the loss gradient's seed (``ones_like``) belongs to loss.

**Kinds**: attention = every op of an ``ops.mask_unit_attention`` call (window copies, query max-pool, SDPA) and of
its backward; gemm = mm / addmm / bmm; conv = convolution and its backward; norm/elementwise = LayerNorm, GELU, add,
mul, the pooled residual's max, mean, sum, ...; copy = clone, ``_to_copy`` (the autocast casts), cat, stack, gather,
scatter, fills, interpolation; loss / optimizer = every op of those stages; other = :data:`OTHER_OPS` (the MAE
masking's rand and sort). Anything else would be ``unknown``; the tests forbid it.

**Fused bytes** (second column): the traffic if each GEMM were one kernel with its neighbours fused in and each
attention call one kernel. Ops are grouped into kernels in op order, forward and backward alike:

1. every GEMM / conv op (mm, addmm, bmm, convolution and their backward) starts a kernel;
2. a cast (``_to_copy``) that one op reads is done in that op's prologue; otherwise a pointwise or row-wise op
   (:data:`EPILOGUE_OPS`: add, mul, GELU, casts, GELU and LayerNorm backward, ...) whose newest input was made in a
   kernel joins it as an epilogue (GELU into fc1, the residual add into proj / fc2); any other cast joins the op that
   made its input (a LayerNorm writes bf16 directly);
3. a GEMM that reads an activation (GELU) made in a kernel joins it: the MLP hidden stays on chip;
4. a backward ``sum`` (a bias gradient) of a tensor that a GEMM reads joins that GEMM (cuBLASLt's BGRAD epilogue);
5. a LayerNorm forward (with the casts of rule 2) whose readers are all forward kernels is recomputed in each of
   their prologues (they read its input, not its output) when that is no dearer: for each of its ops, ``k`` reader
   kernels times its input bytes is at most its plain bytes. A norm whose output the backward reads (a training
   step: the weight-gradient GEMM) is written, not recomputed;
6. each attention call is one kernel (docs/DESIGN.md, "Performance model"): the forward reads qkv once and writes its
   output once (and the fp32 ``lse`` when training), the backward reads qkv, out, d_out and lse and writes d_qkv; those
   bytes are spread over the call's ops in proportion to their plain bytes.

A kernel reads each tensor made outside it once (a transposed view of a tensor is the same read) and writes each
tensor it makes that an op outside it reads (the backward included), that is a gradient (the optimizer reads it),
or that nothing reads and is its op's first output (a model output); unread by-products (max's indices, LayerNorm's
mean and rstd in inference) are not written. Bytes are charged to the op that reads or writes them (a recomputed
norm's reads to the norm), so per op, stage and kind the fused column is never above the plain one.

**Floors**: per op ``max(FLOPs / GEMM rate, bytes / bandwidth)``, summed; the fused floor takes the max per kernel
and shares it among the kernel's ops (by bytes when bandwidth bounds it, else by FLOPs). Rates (:data:`GPUS`,
measured): H100 3.0 TB/s and 800 TFLOP/s bf16 dense, H200 4.3 TB/s and 790 TFLOP/s. fp32 GEMMs are floored at the
TF32 rate, taken as half the bf16 rate (~400 TFLOP/s; this assumes ``torch.backends.cuda.matmul.allow_tf32``, without
which fp32 runs ~8x slower). Attention's FLOPs are floored at the GEMM rate too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from hiera_fast import HieraConfig, HieraForImageClassification, HieraForPreTraining
from hiera_fast.model import HieraEncoder, HieraMaskUnitAttention

# ---------------------------------------------------------------------------------------------- hardware
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Measured copy bandwidth (bytes/s) and dense GEMM rates (FLOP/s) by compute dtype."""

    name: str
    bandwidth: float
    gemm_rate: dict

    def rate(self, dtype: torch.dtype) -> float:
        return self.gemm_rate["fp32" if dtype in (torch.float32, torch.float64) else "bf16"]


GPUS = {
    "h100": Gpu("H100", 3.0e12, {"bf16": 800e12, "fp32": 400e12}),  # fp32 = TF32, half the bf16 rate
    "h200": Gpu("H200", 4.3e12, {"bf16": 790e12, "fp32": 395e12}),
}

# ---------------------------------------------------------------------------------------------- op classes
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4", "head", "decoder", "loss", "optimizer")
KINDS = ("attention", "gemm", "conv", "norm/elementwise", "copy", "loss", "optimizer", "other", "unknown")
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm"}
CONV_OPS = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution"}
SDPA_OPS = {f"_scaled_dot_product_{k}_attention{b}" for k in ("flash", "efficient", "cudnn") for b in ("", "_backward")}
NORM_OPS = {
    "native_layer_norm", "native_layer_norm_backward", "gelu", "gelu_backward", "relu", "threshold_backward", "silu",
    "silu_backward", "tanh", "sigmoid", "add", "sub", "rsub", "mul", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "log",
    "abs", "clamp", "where", "masked_fill", "max", "amax", "maximum", "mean", "sum", "var", "var_mean", "_softmax",
    "_softmax_backward_data", "_safe_softmax", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "bitwise_not",
}
COPY_OPS = {
    "clone", "_to_copy", "copy_", "cat", "stack", "index", "index_select", "gather", "scatter", "scatter_add",
    "scatter_reduce", "index_put", "index_add", "_unsafe_index", "slice_scatter", "select_scatter", "constant_pad_nd",
    "repeat", "repeat_interleave", "fill_", "fill", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full",
    "full_like", "new_zeros", "new_ones", "new_full", "scalar_tensor", "value_selecting_reduction_backward",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_bicubic2d", "upsample_linear1d",
    "upsample_trilinear3d", "lift_fresh_copy",
}
OTHER_OPS = {"rand", "randn", "randint", "uniform_", "normal_", "bernoulli", "bernoulli_", "sort", "argsort", "arange"}
EPILOGUE_OPS = {
    "add", "sub", "rsub", "mul", "div", "neg", "gelu", "gelu_backward", "relu", "threshold_backward", "silu",
    "silu_backward", "tanh", "sigmoid", "pow", "sqrt", "rsqrt", "clamp", "where", "native_layer_norm_backward",
    "_to_copy",
}
ACTIVATIONS = {"gelu", "relu", "silu", "tanh", "sigmoid"}
_WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "random_", "exponential_"}
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}

# CUDA autocast's op lists (PyTorch's "Autocast Op Reference"), by function name
_AUTOCAST_LOWER = {
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_tbc",
    "prelu", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "addmm", "addmv", "addr", "addbmm", "baddbmm",
    "chain_matmul", "multi_dot", "scaled_dot_product_attention",
}
_AUTOCAST_FP32 = {
    "pow", "__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log",
    "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan", "softplus", "layer_norm", "group_norm", "norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist",
    "cdist", "renorm", "logsumexp", "softmax", "log_softmax", "softmin", "cumprod", "cumsum", "prod", "sum",
    "cross_entropy", "normalize",
}


def kind_of(op: str) -> str:
    """The kind of an aten op by its name (``addmm``), outside the attention / loss / optimizer contexts."""
    for kind, names in (("gemm", GEMM_OPS), ("conv", CONV_OPS), ("attention", SDPA_OPS), ("norm/elementwise", NORM_OPS),
                        ("copy", COPY_OPS), ("other", OTHER_OPS)):
        if op in names:
            return kind
    return "unknown"


# ---------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class Row:
    """One aten op of the recorded step (bytes and FLOPs for the whole batch)."""

    index: int
    op: str  # aten overload, e.g. "aten.addmm.default"
    phase: str  # "fwd" | "bwd" | "opt"
    stage: str
    kind: str
    module: str  # innermost module (the parameter's, for optimizer rows)
    dtype: str  # dtype of the first output (or of the parameter)
    flops: int
    bytes: int
    bytes_fused: int
    kernel: int  # fused kernel (rule 1-6) this op belongs to; -1 when folded into other kernels (rule 5)
    compute_dtype: torch.dtype = torch.float32  # the dtype its FLOPs run in (first floating input)

    @property
    def name(self) -> str:
        return self.op.split(".")[1] if self.op.count(".") >= 2 else self.op


@dataclasses.dataclass
class Bucket:
    """A group of rows (a stage, a kind or everything): totals per batch; ``floor_s`` at one GPU's rates."""

    name: str
    flops: int = 0
    bytes: int = 0
    bytes_fused: int = 0
    floor_s: float = 0.0
    floor_fused_s: float = 0.0
    ops: int = 0


@dataclasses.dataclass
class Roofline:
    """The ops of one step of ``preset`` at ``batch`` with their FLOPs and bytes; floors need a :class:`Gpu`."""

    preset: str
    batch: int
    dtype: str
    train: bool
    precision: str  # "cast" (weights in dtype) | "autocast" | "fp32"
    rows: list[Row]
    views: int  # view / allocation ops seen (no bytes, not in rows)
    attention_calls: int
    attention_fused_bytes: int  # the attention kernels of rule 6, forward (+ backward when training)
    kernels: dict = dataclasses.field(repr=False)  # fused kernel -> (flops, bytes, compute dtype)
    charges: list = dataclasses.field(repr=False)  # per row: {kernel: fused bytes charged to it}

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def total_bytes_fused(self) -> int:
        return sum(r.bytes_fused for r in self.rows)

    def _gpu(self, gpu: str | Gpu) -> Gpu:
        return gpu if isinstance(gpu, Gpu) else GPUS[gpu.lower()]

    def row_floors(self, gpu: str | Gpu = "h100") -> tuple[list[float], list[float]]:
        """Per row: the plain floor ``max(flops / rate, bytes / bw)``, and its share of the fused floors of the kernels
        it is charged to (a kernel's floor ``max(its flops / rate, its bytes / bw)``, shared by bytes when bandwidth
        bounds it, else by FLOPs)."""
        g = self._gpu(gpu)
        plain = [max(r.flops / g.rate(r.compute_dtype), r.bytes / g.bandwidth) for r in self.rows]
        floors = {k: (k_.flops / g.rate(k_.compute_dtype), k_.bytes / g.bandwidth) for k, k_ in self.kernels.items()}
        fused = [0.0] * len(self.rows)
        for i, r in enumerate(self.rows):
            for k, charged in self.charges[i].items():
                t_flops, t_bytes = floors[k]
                if t_bytes >= t_flops:
                    fused[i] += t_bytes * charged / self.kernels[k].bytes if charged else 0.0
            if r.flops and r.kernel >= 0:
                t_flops, t_bytes = floors[r.kernel]
                if t_flops > t_bytes:
                    fused[i] += t_flops * r.flops / self.kernels[r.kernel].flops
        return plain, fused

    def _bucket(self, key: Callable[[Row], str], order: Sequence[str], gpu: str | Gpu) -> list[Bucket]:
        plain, fused = self.row_floors(gpu)
        buckets: dict[str, Bucket] = {}
        for r, tp, tf in zip(self.rows, plain, fused):
            b = buckets.setdefault(key(r), Bucket(key(r)))
            b.flops += r.flops
            b.bytes += r.bytes
            b.bytes_fused += r.bytes_fused
            b.floor_s += tp
            b.floor_fused_s += tf
            b.ops += 1
        return [buckets[n] for n in order if n in buckets] + [b for n, b in buckets.items() if n not in order]

    def by_stage(self, gpu: str | Gpu = "h100") -> list[Bucket]:
        return self._bucket(lambda r: r.stage, STAGES, gpu)

    def by_kind(self, gpu: str | Gpu = "h100") -> list[Bucket]:
        return self._bucket(lambda r: r.kind, KINDS, gpu)

    def by_phase(self, gpu: str | Gpu = "h100") -> list[Bucket]:
        return self._bucket(lambda r: r.phase, ("fwd", "bwd", "opt"), gpu)

    def total(self, gpu: str | Gpu = "h100") -> Bucket:
        return self._bucket(lambda r: "total", ("total",), gpu)[0]

    def table(self, gpu: str | Gpu = "h100", markdown: bool = False) -> str:
        """The by-stage and by-kind tables (per image) and the totals, as text or markdown."""
        g = self._gpu(gpu)
        total = self.total(g)
        what = "MAE step" if self.train and self.preset.startswith("mae") else "training step" if self.train else \
            "inference forward"
        title = (f"{self.preset}, {what}, batch {self.batch}, {self.dtype} ({self.precision}), {g.name} "
                 f"({g.bandwidth / 1e12:.1f} TB/s, {g.gemm_rate['bf16'] / 1e12:.0f} TFLOP/s bf16)")
        lines = [title, ""]
        groups = [("stage", self.by_stage(g)), ("kind", self.by_kind(g))]
        if self.train:
            groups.append(("phase", self.by_phase(g)))
        for title, buckets in groups:
            lines += _format(title, buckets + [total], total, self.batch, markdown) + [""]
        per = self.batch
        lines.append(f"total: {total.flops / per / 1e9:.2f} GFLOP/image, {total.bytes / per / 1e9:.3f} GB/image "
                     f"({total.bytes_fused / per / 1e9:.3f} fused), floor {total.floor_s / per * 1e6:.1f} µs/image "
                     f"({total.floor_fused_s / per * 1e6:.1f} fused) -> at most {per / total.floor_s:,.0f} images/s "
                     f"({per / total.floor_fused_s:,.0f} fused)")
        attn = [b for b in self.by_kind(g) if b.name == "attention"]
        if attn:
            eager, fused = attn[0].bytes, self.attention_fused_bytes
            lines.append(f"attention ({self.attention_calls} calls): eager SDPA on 4-D windows {eager / per / 1e6:.1f} "
                         f"MB/image ({eager / 1e9:.2f} GB per batch); as one fused kernel per call "
                         f"{fused / per / 1e6:.1f} MB/image ({fused / 1e9:.2f} GB, {fused / g.bandwidth * 1e3:.2f} ms "
                         f"per batch at {g.bandwidth / 1e12:.1f} TB/s)")
        if self.dtype == "fp32":
            lines.append("note: fp32 GEMMs are floored at the TF32 rate (half the bf16 rate)")
        return "\n".join(lines)


def _format(title: str, buckets: list[Bucket], total: Bucket, batch: int, markdown: bool) -> list[str]:
    head = [title, "GFLOP/img", "MB/img", "MB/img fused", "floor µs/img", "fused floor µs/img", "share"]
    per = batch
    body = [[b.name, f"{b.flops / per / 1e9:.2f}", f"{b.bytes / per / 1e6:.1f}", f"{b.bytes_fused / per / 1e6:.1f}",
             f"{b.floor_s / per * 1e6:.2f}", f"{b.floor_fused_s / per * 1e6:.2f}",
             f"{100 * b.floor_s / total.floor_s:.1f} %" if total.floor_s else "-"] for b in buckets]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return out + ["| " + " | ".join(f"**{c}**" if row[0] == "total" else c for c in row) + " |" for row in body]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]


# ---------------------------------------------------------------------------------------------- recording
class _Ctx(NamedTuple):
    stage: str
    module: str
    region: tuple | None  # (attention module, call number) inside an ops.mask_unit_attention call


@dataclasses.dataclass
class _Op:
    name: str  # overload packet, e.g. "addmm"
    overload: str
    phase: str
    ctx: _Ctx
    flops: int
    reads: list  # [(value, view key, bytes)]; value = (storage id, version)
    writes: list  # [(value, bytes, first output of the op)]
    dtype: str
    outputs: list  # output tensors' bytes in order (attention: lse is the second)
    compute_dtype: torch.dtype


def _plain_bytes(op: _Op) -> int:
    return sum(b for _, _, b in op.reads) + sum(b for _, b, _ in op.writes)


def _view_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a strided tensor addresses (a stride-0 dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _MetaFactories(TorchFunctionMode):
    """Build a model on the meta device: every factory without a device goes to meta, except ``torch.linspace``
    (the drop-path schedule, whose values the constructor reads)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and func is not torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


class _Recorder(TorchDispatchMode):
    """Logs every aten op with its context, FLOPs, reads and writes (tensor values tracked by storage + version)."""

    def __init__(self, model: nn.Module, head_stage: str):
        super().__init__()
        self.names = {id(m): name for name, m in model.named_modules()}
        self.attn = {id(m) for m in model.modules() if isinstance(m, HieraMaskUnitAttention)}
        self.encoder = {id(m) for m in model.modules() if isinstance(m, HieraEncoder)}
        self.head_stage = head_stage
        self.stack: list[nn.Module] = []
        self.override: list[str] = []  # explicit stages (loss)
        self.after_encoder = False
        self.calls: dict[int, int] = defaultdict(int)
        self.phase = "fwd"
        self.ops: list[_Op] = []
        self.views = 0
        self.version: dict[int, int] = defaultdict(int)
        self.keep: list = []  # storages stay alive so their ids are never reused
        self.grads: set[tuple] = set()  # the parameters' gradients after the backward (the optimizer reads them)

    # -- module context
    def pre_hook(self, module, args):
        if id(module) in self.names:
            self.stack.append(module)
            if id(module) in self.attn:
                self.calls[id(module)] += 1

    def post_hook(self, module, args, output):
        if id(module) in self.names and self.stack and self.stack[-1] is module:
            self.stack.pop()
            if id(module) in self.encoder:
                self.after_encoder = True

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.override.append(name)
        try:
            yield
        finally:
            self.override.pop()

    def context(self) -> _Ctx:
        module = self.names[id(self.stack[-1])] if self.stack else ""
        region = None
        if self.stack and id(self.stack[-1]) in self.attn:
            region = (module, self.calls[id(self.stack[-1])])
        if self.override:
            return _Ctx(self.override[-1], module, region)
        for m in reversed(self.stack):
            stage = _stage_of(self.names[id(m)])
            if stage is not None:
                return _Ctx(stage, module, region)
        return _Ctx(self.head_stage if self.after_encoder else "stem", module, region)

    def current(self) -> _Ctx:
        if self.phase == "fwd":
            return self.context()
        node = torch._C._current_autograd_node()
        ctx = node.metadata.get(_TAG) if node is not None else None
        return ctx if ctx is not None else _Ctx("loss", UNTAGGED, None)  # the loss gradient's seed

    # -- ops
    def _value(self, t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        sid = storage._cdata
        if sid not in self.version:
            self.keep.append(storage)
            self.version[sid] = 0
        return sid, self.version[sid]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        schema = func._schema
        mutated = _mutated_args(schema, args, kwargs)
        inputs = _tensors((args, kwargs))
        in_storages = {t.untyped_storage()._cdata for t in inputs}
        reads, seen = [], set()
        for t in inputs:
            if any(t is m for m in mutated) and name in _WRITE_ONLY:
                continue
            value = self._value(t)
            key = (value, t.storage_offset(), tuple(sorted(zip(t.stride(), t.shape))))  # a transpose: the same elements
            if key not in seen:
                seen.add(key)
                reads.append((value, key, _view_bytes(t)))
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        writes = []  # [(value, bytes, first output?)]
        for t in mutated:
            sid = t.untyped_storage()._cdata
            self._value(t)
            self.version[sid] += 1
            writes.append(((sid, self.version[sid]), _view_bytes(t), not writes))
        fresh = [t for t in outputs if t.untyped_storage()._cdata not in in_storages]
        if name in _ALLOCATIONS or (not mutated and not fresh):
            for t in fresh:
                self._value(t)
            self.views += 1
            return out
        for t in fresh:
            writes.append((self._value(t), _view_bytes(t), not writes))
        flops = 0
        if func._overloadpacket in flop_registry:
            flops = int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
        floating = [t.dtype for t in inputs if t.is_floating_point()]
        self.ops.append(_Op(name, str(func), self.phase, self.current(), flops, reads, writes,
                            _dtype_name(outputs[0].dtype if outputs else mutated[0].dtype),
                            [_view_bytes(t) for t in outputs], floating[0] if floating else torch.float32))
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _mutated_positions(schema: torch.FunctionSchema) -> tuple[tuple[int, str], ...]:
    return tuple((i, a.name) for i, a in enumerate(schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _mutated_args(schema: torch.FunctionSchema, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for i, name in _mutated_positions(schema):
        value = args[i] if i < len(args) else kwargs.get(name)
        out += _tensors(value)
    return out


def _stage_of(name: str) -> str | None:
    """The stage of a module by its qualified name (see the module docstring), or None."""
    parts = name.split(".")
    if "embeddings" in parts:
        return "stem"
    if "stages" in parts:
        i = parts.index("stages")
        if i > 0 and parts[i - 1] == "encoder" and i + 1 < len(parts):
            return f"stage{int(parts[i + 1]) + 1}"
    if parts[0] in ("encoder_norm", "multiscale_fusion", "decoder"):
        return "decoder"
    if "pooler" in parts or parts[0] == "classifier":
        return "head"
    return None


_TAG = "hiera_fast_roofline"
UNTAGGED = "(no forward node)"  # the module of a backward op that runs no tagged autograd node


class GpuSdpa(TorchFunctionMode):
    """Run ``F.scaled_dot_product_attention`` as the aten kernel CUDA would pick (see :func:`_gpu_sdpa`), on any
    device: FlopCounterMode then counts what it counts on the GPU (FlashAttention's backward: 2.5x the forward, as it
    recomputes QK^T; the meta device's math path: 2x)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _gpu_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _Tracer(TorchFunctionMode):
    """Autocast emulation (CUDA's rules, see the module docstring), SDPA as the GPU's fused kernel, and the forward
    context written onto every autograd node a call makes (so its backward ops land in the same stage)."""

    def __init__(self, recorder: _Recorder, autocast: torch.dtype | None):
        super().__init__()
        self.recorder = recorder
        self.autocast = autocast
        self.cache: dict[int, torch.Tensor] = {}

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if not isinstance(x, torch.Tensor) or x.dtype == dtype or x.dtype not in DTYPES.values():
            return x
        cacheable = dtype != torch.float32 and x.dtype == torch.float32 and x.is_leaf and x.requires_grad
        if cacheable and id(x) in self.cache:
            return self.cache[id(x)]
        y = x.to(dtype)
        if cacheable:
            self.cache[id(x)] = y
        return y

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast is not None:
            target = self.autocast if name in _AUTOCAST_LOWER else torch.float32 if name in _AUTOCAST_FP32 else None
            if target is not None:
                args = tuple(self._cast(a, target) for a in args)
                kwargs = {k: self._cast(v, target) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            out = _gpu_sdpa(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            ctx = None
            for t in _tensors(out):
                if t.grad_fn is not None:
                    ctx = ctx or self.recorder.context()
                    _tag(t.grad_fn, ctx)
        return out


def _tag(node, ctx: _Ctx) -> None:
    """Tag ``node`` and every untagged node behind it (made by the same call) with ``ctx``."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or _TAG in n.metadata:
            continue
        n.metadata[_TAG] = ctx
        stack.extend(f for f, _ in n.next_functions)


def _gpu_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as CUDA runs it for these inputs: FlashAttention (fp16/bf16, no mask), else memory-efficient attention;
    the meta device would decompose it into its math (bmm, softmax, bmm)."""
    if q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and not enable_gqa:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if q.dtype == torch.float64 or enable_gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, lse, dropout_p, is_causal,
                                                                  scale=scale)[0]


@contextlib.contextmanager
def _module_hooks(recorder: _Recorder) -> Iterator[None]:
    pre = nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook)
    post = nn.modules.module.register_module_forward_hook(recorder.post_hook, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


# ---------------------------------------------------------------------------------------------- the step
def _config(config_or_preset: HieraConfig | str) -> tuple[HieraConfig, str]:
    if isinstance(config_or_preset, HieraConfig):
        return config_or_preset, "custom"
    return HieraConfig.from_preset(config_or_preset), config_or_preset


def build_meta_model(config: HieraConfig) -> nn.Module:
    """The preset's model class (MAE configs: ``HieraForPreTraining``) with fp32 weights on the meta device."""
    cls = HieraForPreTraining if config.decoder_hidden_size is not None else HieraForImageClassification
    with _MetaFactories():
        return cls(config)


def record(model: nn.Module, batch: int, dtype: torch.dtype, train: bool, precision: str) -> _Recorder:
    """Run one step of ``model`` (on the meta device) under the recorder; returns it with its ops."""
    mae = isinstance(model, HieraForPreTraining)
    config = model.config
    autocast = dtype if precision == "autocast" and dtype != torch.float32 else None
    if precision == "cast":
        model = model.to(dtype)
    pixel_dtype = dtype if precision == "cast" else torch.float32
    x = torch.empty(batch, config.num_channels, *config.image_size, device="meta", dtype=pixel_dtype)
    recorder = _Recorder(model, "decoder" if mae else "head")
    tracer = _Tracer(recorder, autocast)
    if mae:  # the loss and the reroll of the stage outputs for the fusion heads run outside the decoder's modules
        loss_fn, reroll = model.loss, model.hiera.reroll
        model.loss = lambda *a, **k: _in_stage(recorder, "loss", loss_fn, *a, **k)
        model.hiera.reroll = lambda *a, **k: _in_stage(recorder, "decoder", reroll, *a, **k)
    model.train(train)
    try:
        with _module_hooks(recorder), recorder:
            with tracer, torch.set_grad_enabled(train):
                out = model(x)
                if mae:
                    loss = out.loss
                elif train:
                    with recorder.stage("loss"):
                        labels = torch.zeros(batch, dtype=torch.long, device="meta")
                        loss = F.cross_entropy(out.logits.float(), labels)
            if train:
                recorder.phase = "bwd"
                loss.backward()
        recorder.grads = {recorder._value(p.grad) for p in model.parameters() if p.grad is not None}
    finally:
        if mae:
            del model.loss, model.hiera.reroll
    return recorder


def _in_stage(recorder: _Recorder, stage: str, fn: Callable, *args, **kwargs):
    with recorder.stage(stage):
        return fn(*args, **kwargs)


def roofline(config_or_preset: HieraConfig | str, batch: int, dtype: str | torch.dtype = "bf16", train: bool = False,
             precision: str | None = None) -> Roofline:
    """Record one step (inference forward, or ``train``: forward + loss + backward + AdamW) of the preset's model at
    ``batch`` and ``dtype`` and count its FLOPs, bytes and fused bytes per aten op (see the module docstring).

    ``precision``: ``"cast"`` (weights in ``dtype``; the inference default) or ``"autocast"`` (fp32 weights; the only
    choice, and the default, for training). fp32 has neither.
    """
    config, preset = _config(config_or_preset)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        precision = "fp32"
    elif precision is None:
        precision = "autocast" if train else "cast"
    elif precision not in ("cast", "autocast"):
        raise ValueError(f"precision must be 'cast' or 'autocast', got {precision!r}")
    elif train and precision == "cast":
        raise ValueError("training runs under autocast with fp32 weights (precision='autocast')")
    model = build_meta_model(config)
    recorder = record(model, batch, dtype, train, precision)
    ops = recorder.ops
    fusion = _fuse(ops, recorder.grads)
    rows = [Row(i, op.overload, op.phase, op.ctx.stage, _kind(op), op.ctx.module, op.dtype, op.flops,
                _plain_bytes(op), fusion.fused[i], fusion.kernel_of[i], op.compute_dtype) for i, op in enumerate(ops)]
    kernels, charges = dict(fusion.kernels), list(fusion.charges)
    if train:
        names = {id(p): n for n, p in model.named_parameters()}
        for p in model.parameters():
            if p.requires_grad:
                nbytes = 7 * p.numel() * 4
                i = len(rows)
                rows.append(Row(i, "adamw (fused)", "opt", "optimizer", "optimizer", names[id(p)].rsplit(".", 1)[0],
                                "float32", 0, nbytes, nbytes, i))
                kernels[i] = _Kernel(0, nbytes, torch.float32)
                charges.append({i: nbytes})
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    return Roofline(preset, batch, dtype_name, train, precision, rows, recorder.views, fusion.attention_calls,
                    fusion.attention_bytes, kernels, charges)


def _kind(op: _Op) -> str:
    if op.ctx.stage in ("loss", "optimizer"):
        return op.ctx.stage
    if op.ctx.region is not None or op.name in SDPA_OPS:
        return "attention"
    return kind_of(op.name)


# ---------------------------------------------------------------------------------------------- fusion
class _Kernel(NamedTuple):
    flops: int
    bytes: int
    compute_dtype: torch.dtype


@dataclasses.dataclass
class _Fusion:
    fused: list[int]  # per op: fused bytes charged to it
    kernel_of: list[int]  # per op: its kernel (group root), -1 for a norm recomputed in its readers (rule 5)
    charges: list[dict]  # per op: {kernel: bytes charged to that kernel}
    kernels: dict  # kernel -> _Kernel
    attention_bytes: int
    attention_calls: int


class _Groups:
    """Union-find over op indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, into: int, i: int) -> None:
        self.parent[self.find(i)] = self.find(into)


class _Books:
    """Charges each fused kernel's bytes to its ops: every tensor made outside it read once, and every tensor it makes
    written if a later op outside it reads it, if it is kept (the gradients) or if it is its op's unread first output
    (a model output); a norm recomputed in the kernel (rule 5) reads its own inputs instead, charged to its rows."""

    def __init__(self, ops, groups, members, folded, producer, readers, kept):
        self.ops, self.groups, self.members, self.folded = ops, groups, members, folded
        self.producer, self.readers, self.kept = producer, readers, kept
        self.fused = [0] * len(ops)
        self.charges: list[dict] = [defaultdict(int) for _ in ops]

    def root_of(self, value: tuple) -> int | None:
        p = self.producer.get(value)
        return None if p is None else self.groups.find(p)

    def charge(self, i: int, kernel: int, nbytes: int) -> None:
        self.fused[i] += nbytes
        self.charges[i][kernel] += nbytes

    def kernel(self, root: int) -> None:
        seen: set = set()
        for i in self.members[root]:
            for value, key, nbytes in self.ops[i].reads:
                self._read(root, seen, i, value, key, nbytes)
            for value, nbytes, first in self.ops[i].writes:
                reader_kernels = set()
                for r in self.readers[value]:
                    g = self.groups.find(r)
                    reader_kernels |= self.folded.get(g, {g})
                if reader_kernels - {root} or value in self.kept or (first and not reader_kernels):
                    self.charge(i, root, nbytes)

    def _read(self, root: int, seen: set, i: int, value: tuple, key: tuple, nbytes: int) -> None:
        src = self.root_of(value)
        if src == root:
            return
        if src in self.folded and root in self.folded[src]:  # recompute the norm from its own inputs
            for m in self.members[src]:
                for v, k, b in self.ops[m].reads:
                    if self.root_of(v) != src:
                        self._read(root, seen, m, v, k, b)
            return
        if key not in seen:
            seen.add(key)
            self.charge(i, root, nbytes)


def _fuse(ops: list[_Op], kept: set[tuple] = frozenset()) -> _Fusion:
    """Group the ops into kernels by the fusion rules of the module docstring and charge each kernel's bytes;
    ``kept`` values (the gradients, which the optimizer reads) are always written."""
    n = len(ops)
    producer: dict[tuple, int] = {}
    readers: dict[tuple, list[int]] = defaultdict(list)
    for i, op in enumerate(ops):
        for value, _, _ in op.reads:
            readers[value].append(i)
        for value, _, _ in op.writes:
            producer[value] = i
    groups = _Groups(n)
    anchor = [op.name in GEMM_OPS or op.name in CONV_OPS for op in ops]
    region: dict[tuple, int] = {}  # (attention call, phase) -> its first op (rule 6)
    for i, op in enumerate(ops):
        if op.ctx.region is not None:
            key = (op.ctx.region, op.phase)
            groups.union(region.setdefault(key, i), i)
    attention = {groups.find(i) for i in region.values()}
    gemm_kernel: set[int] = set()  # roots of groups with a GEMM / conv (rule 1)
    through: dict[int, int | None] = {}  # a cast done in its reader's prologue -> the op that made its input

    def in_kernel(i: int) -> bool:
        return groups.find(i) in gemm_kernel

    for i, op in enumerate(ops):
        if op.ctx.region is not None:
            continue
        made = [through.get(producer[v], producer[v]) for v, _, _ in op.reads if v in producer]
        made = [p for p in made if p is not None]
        newest = max(made) if made else None
        if newest is not None and (ops[newest].phase != op.phase or ops[newest].ctx.region is not None):
            newest = None
        if anchor[i]:
            acts = [p for p in made if ops[p].name in ACTIVATIONS and ops[p].phase == op.phase and in_kernel(p)]
            if op.name in GEMM_OPS and acts:
                groups.union(acts[-1], i)  # rule 3: the MLP hidden stays on chip
            gemm_kernel.add(groups.find(i))
        elif op.name == "_to_copy" and len(cast_readers := {r for v, _, _ in op.writes for r in readers[v]}) == 1:
            groups.union(cast_readers.pop(), i)  # rule 2: a cast that one op reads, in that op's prologue
            through[i] = newest  # its reader sees the cast's input
        elif op.name in EPILOGUE_OPS and newest is not None and in_kernel(newest):
            groups.union(newest, i)  # rule 2: an epilogue
        elif op.name == "_to_copy" and newest is not None:
            groups.union(newest, i)  # rule 2: another cast, in whatever made its input
        elif op.name == "sum" and op.phase == "bwd" and len(op.reads) == 1:
            gemms = [r for r in readers[op.reads[0][0]] if ops[r].name in GEMM_OPS]
            if gemms:
                groups.union(gemms[-1], i)  # rule 4: the bias gradient in the weight-gradient GEMM
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[groups.find(i)].append(i)

    folded: dict[int, set[int]] = {}  # rule 5: norm group -> the kernels that recompute it
    books = _Books(ops, groups, members, folded, producer, readers, kept)
    root_of = books.root_of
    # rule 5: a LayerNorm forward (+ casts) recomputed in each reader kernel's prologue, when that moves fewer bytes
    for root, ms in members.items():
        names = {ops[m].name for m in ms}
        if root in gemm_kernel or root in attention or "native_layer_norm" not in names or \
                not names <= {"native_layer_norm", "_to_copy"}:
            continue
        reader_ops = {r for m in ms for v, _, _ in ops[m].writes for r in readers[v]} - set(ms)
        outside = {groups.find(r) for r in reader_ops}
        if not outside or not outside <= gemm_kernel or any(ops[r].phase != "fwd" for r in reader_ops):
            continue  # saved for the backward: written, not recomputed
        if all(len(outside) * sum(b for v, _, b in ops[m].reads if root_of(v) != root) <= _plain_bytes(ops[m])
               for m in ms):
            folded[root] = outside

    for root in members:
        if root not in attention and root not in folded:
            books.kernel(root)
    fused, charges = books.fused, books.charges

    # rule 6: one kernel per attention call
    attention_bytes, sizes = 0, {}
    for (call, phase), first in sorted(region.items(), key=lambda kv: kv[1]):
        root = groups.find(first)
        ms = members[root]
        sdpa = [m for m in ms if ops[m].name in SDPA_OPS]
        if phase == "fwd":
            qkv = sum(b for m in ms for v, _, b in ops[m].reads if root_of(v) != root)
            out = sum(b for m in ms for v, b, _ in ops[m].writes if any(ops[r].ctx.region != call for r in readers[v]))
            trained = (call, "bwd") in region
            lse = ops[sdpa[0]].outputs[1] if trained and sdpa and len(ops[sdpa[0]].outputs) > 1 else 0
            sizes[call] = (qkv, out, lse)
            nbytes = qkv + out + lse
        else:
            qkv, out, lse = sizes[call]
            nbytes = 2 * qkv + 2 * out + lse  # read qkv, out, d_out, lse; write d_qkv
        plain = [_plain_bytes(ops[m]) for m in ms]
        for m, b in zip(ms, plain):  # spread over the call's ops by their plain bytes
            books.charge(m, root, nbytes * b // sum(plain))
        attention_bytes += nbytes

    kernels: dict[int, _Kernel] = {}
    for root, ms in members.items():
        if root in folded:
            continue
        with_flops = [m for m in ms if ops[m].flops]
        kernels[root] = _Kernel(sum(ops[m].flops for m in ms), 0,
                                ops[with_flops[0]].compute_dtype if with_flops else torch.float32)
    for c in charges:
        for k, b in c.items():
            kernels[k] = kernels[k]._replace(bytes=kernels[k].bytes + b)
    kernel_of = [-1 if groups.find(i) in folded else groups.find(i) for i in range(n)]
    calls = sum(1 for _, phase in region if phase == "fwd")
    return _Fusion(fused, kernel_of, [dict(c) for c in charges], kernels, attention_bytes, calls)


# ---------------------------------------------------------------------------------------------- cli
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hiera_base_224", help="a preset, e.g. hiera_base_224, mae_hiera_base_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--gpu", default="h100", nargs="+", choices=sorted(GPUS))
    parser.add_argument("--train", action="store_true", help="forward + loss + backward + AdamW step")
    parser.add_argument("--precision", choices=("cast", "autocast"), default=None,
                        help="inference: weights cast to --dtype (default) or fp32 weights under autocast")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument("--top", type=int, default=0, help="also list the N ops with the largest floors")
    args = parser.parse_args(argv)
    result = roofline(args.model, args.batch, args.dtype, args.train, args.precision)
    for gpu in [args.gpu] if isinstance(args.gpu, str) else args.gpu:
        print(result.table(gpu, markdown=args.markdown))
        print()
        if args.top:
            plain, _ = result.row_floors(gpu)
            order = sorted(range(len(result.rows)), key=lambda i: -plain[i])[: args.top]
            for i in order:
                r = result.rows[i]
                print(f"{plain[i] / result.batch * 1e6:8.3f} µs/img  {r.phase} {r.stage:8} {r.kind:17} {r.op:45} "
                      f"{r.module}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
