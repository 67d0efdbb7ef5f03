"""Timing, throughput and model-building helpers shared by ``hiera-fast bench`` and ``benchmarks/``.

Timing. On CUDA, :func:`time_ms` is ``triton.testing.do_bench`` (median of ``rep`` ms of runs after ``warmup`` ms,
L2 flushed before each run; the host's launch cost counts where it exceeds the GPU work), :func:`time_graph_ms` the
GPU time alone (runs captured in a CUDA graph), and :func:`time_iterations` records a pair of CUDA events around
each iteration (so a progress bar can tick); on a CPU :func:`time_ms` and :func:`time_iterations` use
``time.perf_counter``. Peak memory is measured in a separate run, because
``do_bench`` allocates its own 256 MB L2-flush buffer.

Bytes model of one attention call (DESIGN.md §5): the least traffic any implementation needs. The forward reads
qkv ``[B, N, 3C]`` once and writes out ``[B, N / q_stride, C]`` once; the backward reads qkv, out and d_out and
writes d_qkv (the fused kernel's 4-byte-per-row log-sum-exp is left out). Achieved bandwidth is that byte count
over the median time, reported next to the fraction of the GPU's measured copy bandwidth (H100 3.0 TB/s, H200
4.3 TB/s; :func:`peak_bandwidth`).
"""

from __future__ import annotations

import copy
import datetime
import functools
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, ops
from .config import PRESETS, HieraConfig

PEAK_BANDWIDTH = 3.0e12  # bytes/s: H100 copy bandwidth measured for DESIGN.md §5
# device-to-device copy bandwidth (bytes read + written per second) measured on the GPUs this project is lent
MEASURED_COPY_BANDWIDTH = {"H200": 4.3e12, "H100": 3.0e12}
L2_BYTES = 50 * 2**20

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

MODEL_IMPLS = ("eager", "fused", "fused+compile", "fused+cudagraphs")
# torch.compile mode of our compiled variants: "reduce-overhead" captures forward and backward in CUDA graphs
COMPILE_MODES = {"fused+compile": "default", "fused+cudagraphs": "reduce-overhead"}
PEER_IMPLS = ("transformers", "official", "timm", "hiera-optim")


def uses_cuda_graphs(impl: str) -> bool:
    """Whether ``impl`` is compiled with ``mode="reduce-overhead"`` (CUDA graphs): its replays allocate from the
    graphs' pool, so its peak memory is read on the first run."""
    return COMPILE_MODES.get(impl) == "reduce-overhead"


# ---------------------------------------------------------------------------------------------- dtypes, devices
def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``fp16``/``bf16`` (or ``float32``, ``half``, ``bfloat16``) → torch dtype; ValueError otherwise."""
    key = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine() or 'unknown'}, {os.cpu_count()} cores)"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def environment(device: torch.device | str) -> dict:
    """What every result row records: device, versions, date."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "hiera_fast": __version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------- attention geometry
@dataclass(frozen=True)
class AttentionGeometry:
    """One attention call of a model: the fused op's arguments minus the batch."""

    tokens: int  # N, rows of qkv
    dim: int  # C (the block's dim_out); qkv has 3 * C channels
    num_heads: int
    q_stride: int
    window_size: int
    use_mask_unit_attn: bool
    where: str = ""  # first block with this geometry, e.g. "stage2.0"
    calls: int = 1  # blocks of the model with this geometry

    @property
    def num_windows(self) -> int:
        return self.tokens // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def tokens_out(self) -> int:
        return self.tokens // self.q_stride

    @property
    def q_per_window(self) -> int:
        return self.tokens_out // self.num_windows

    @property
    def kv_per_window(self) -> int:
        return self.tokens // self.num_windows

    @property
    def label(self) -> str:
        """e.g. ``stage2.0 3136->784 mask-unit x49 q16/kv64 h2x96``."""
        kind = f"mask-unit x{self.num_windows}" if self.use_mask_unit_attn else "global"
        n = f"{self.tokens}->{self.tokens_out}" if self.q_stride > 1 else str(self.tokens)
        return (f"{self.where} {n} {kind} q{self.q_per_window}/kv{self.kv_per_window} "
                f"h{self.num_heads}x{self.head_dim}").strip()

    @property
    def id(self) -> str:
        """A pytest id: ``n3136-w49-q16kv64-h2d96``."""
        return (f"n{self.tokens}-w{self.num_windows}-q{self.q_per_window}kv{self.kv_per_window}"
                f"-h{self.num_heads}d{self.head_dim}")

    def qkv_shape(self, batch: int) -> tuple[int, int, int]:
        return (batch, self.tokens, 3 * self.dim)

    def bytes_moved(self, batch: int, dtype: torch.dtype, backward: bool = False) -> int:
        """The minimum traffic (module docstring); ``backward=True`` is forward + backward."""
        size = torch.tensor([], dtype=dtype).element_size()
        qkv, out = batch * self.tokens * 3 * self.dim * size, batch * self.tokens_out * self.dim * size
        fwd = qkv + out
        return fwd + (2 * qkv + 2 * out if backward else 0)

    def flops(self, batch: int, backward: bool = False) -> float:
        """Matmul FLOPs: ``QK^T`` and ``PV`` forward; the backward adds ``dV, dP, dQ, dK`` (2.5x the forward with the
        recomputation of ``QK^T`` counted, as FlashAttention counts it)."""
        fwd = 4.0 * batch * self.num_heads * self.num_windows * self.q_per_window * self.kv_per_window * self.head_dim
        return fwd * (3.5 if backward else 1.0)


_SCHEDULES: dict[str, tuple[AttentionGeometry, ...]] = {}


def _layer_schedule(config: HieraConfig) -> tuple[AttentionGeometry, ...]:
    key = repr(config)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = _read_schedule(config)
    return _SCHEDULES[key]


def _read_schedule(config: HieraConfig) -> tuple[AttentionGeometry, ...]:
    from .model import HieraEncoder, HieraLayer

    encoder = HieraEncoder(config)  # the real block schedule (lag rule, pooling), read off the modules
    tokens = math.prod(config.tokens_spatial_shape)
    out = []
    for s, stage in enumerate(encoder.stages):
        for j, layer in enumerate(stage.layers):
            assert isinstance(layer, HieraLayer)
            attn = layer.attn
            out.append(AttentionGeometry(tokens, layer.dim_out, attn.num_heads, attn.query_stride, attn.window_size,
                                         attn.use_mask_unit_attn, where=f"stage{s + 1}.{j}"))
            tokens //= attn.query_stride
    return tuple(out)


def attention_geometries(config: HieraConfig | str) -> list[AttentionGeometry]:
    """The distinct attention calls of a model's encoder, in model order, with how many blocks share each."""
    if isinstance(config, str):
        config = HieraConfig.from_preset(config)
    layers = _layer_schedule(config)
    distinct: dict[tuple, AttentionGeometry] = {}
    for g in layers:
        key = (g.tokens, g.dim, g.num_heads, g.q_stride, g.window_size, g.use_mask_unit_attn)
        if key in distinct:
            first = distinct[key]
            distinct[key] = AttentionGeometry(*key, where=first.where, calls=first.calls + 1)
        else:
            distinct[key] = g
    return list(distinct.values())


def batch_past_l2(geometry: AttentionGeometry, base: int, dtype: torch.dtype, cap: int,
                  min_bytes: int = 4 * L2_BYTES) -> int:
    """``base``, doubled until one forward call moves at least ``min_bytes`` (well past the 50 MB L2), at most
    ``cap``."""
    batch = base
    while batch < cap and geometry.bytes_moved(batch, dtype) < min_bytes:
        batch *= 2
    return min(batch, cap)


def peak_bandwidth(device: torch.device | str) -> float:
    """Bytes/s to compare a kernel with: the measured copy bandwidth of this GPU model (H200 4.3 TB/s, H100 3.0 TB/s),
    the H100's for any other device. The model is matched as a word: a GH200 is not an H200."""
    name = device_name(device)
    return next((bw for key, bw in MEASURED_COPY_BANDWIDTH.items() if re.search(rf"\b{key}\b", name)), PEAK_BANDWIDTH)


def bandwidth(bytes_moved: float, ms: float, peak: float = PEAK_BANDWIDTH) -> dict:
    """``{"gb_per_s", "pct_of_peak", "peak_tbps"}`` for a byte count moved in ``ms`` milliseconds against ``peak``
    bytes/s (:func:`peak_bandwidth` of the device)."""
    per_s = bytes_moved / (ms * 1e-3)
    return {"gb_per_s": per_s / 1e9, "pct_of_peak": 100.0 * per_s / peak, "peak_tbps": peak / 1e12}


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 25, rep: int = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None, cpu_iters: int = 5) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (``warmup``/``rep`` in ms), else the
    median of ``cpu_iters`` ``perf_counter`` runs after one warm-up run."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):  # its events and L2-flush buffer belong to the current device
            return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
    return statistics.median(time_iterations(fn, device, iters=cpu_iters, warmup=1, grad_to_none=grad_to_none))


def time_graph_ms(fn: Callable[[], object], device: torch.device | str, *, rep: int = 20,
                  grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn()`` as GPU time alone: ``triton.testing.do_bench_cudagraph``, which captures many
    runs of ``fn`` in one CUDA graph and times its replays, so the host's cost of launching (Python, dispatch,
    autograd) is not in the number. :func:`time_ms` measures with the launches: when the host is slower than the GPU
    work of a call, that is host time. L2 is not flushed between the captured runs (the op benchmarks size their
    inputs past L2). CUDA only; raises whatever capture raises for an ``fn`` that cannot be captured."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"time_graph_ms needs a CUDA device, got {device}")
    from triton.testing import do_bench_cudagraph

    with torch.cuda.device(device):  # its side stream and graph belong to the current device
        return float(do_bench_cudagraph(fn, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def time_iterations(fn: Callable[[], object], device: torch.device | str, *, iters: int, warmup: int,
                    on_step: Callable[[], None] | None = None,
                    grad_to_none: Sequence[torch.Tensor] | None = None) -> list[float]:
    """Milliseconds of each of ``iters`` runs after ``warmup`` runs; ``on_step()`` after every run (progress bars).

    CUDA: a pair of events around each run, read after one synchronize at the end (the host runs ahead, as in a
    real loop). CPU: ``perf_counter``.
    """
    device = torch.device(device)

    def clear():
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(warmup):
        clear()
        fn()
        if on_step:
            on_step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            clear()
            start.record()
            fn()
            end.record()
            if on_step:
                on_step()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        clear()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if on_step:
            on_step()
    return times


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated by torch on ``device`` during one run of ``fn`` (weights included); None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ---------------------------------------------------------------------------------------------- models
class Unavailable(Exception):
    """A variant that cannot run here; the message says why (a skip reason)."""


def preset_config(name: str) -> HieraConfig:
    """``HieraConfig.from_preset`` with a one-line error naming the close matches."""
    try:
        return HieraConfig.from_preset(name)
    except ValueError:
        import difflib

        key = name.removeprefix("facebook/").replace("-", "_")
        close = difflib.get_close_matches(key, PRESETS, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose from {', '.join(sorted(PRESETS))}") from None


def preset_key(name: str) -> str:
    return name.removeprefix("facebook/").replace("-", "_")


def is_mae(name: str) -> bool:
    return preset_key(name).startswith("mae_")


def item_unit(config: HieraConfig) -> str:
    return "clips/s" if config.spatial_dims == 3 else "images/s"


def _our_class(name: str):
    from .model import HieraForImageClassification, HieraForPreTraining

    return HieraForPreTraining if is_mae(name) else HieraForImageClassification


@functools.lru_cache(maxsize=1)
def reference_model(name: str, seed: int = 0) -> nn.Module:
    """Our model of preset ``name`` with seeded random weights, fp32 on the CPU: every variant of a benchmark starts
    from these weights (ours by copy, the peers through the checkpoint key maps), so all run the same model. Cached
    (one preset at a time)."""
    config = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _our_class(name)(config).eval()


def reference_state(name: str) -> dict[str, torch.Tensor]:
    """:func:`reference_model`'s weights, transformers' names."""
    return {k: v.detach() for k, v in reference_model(preset_key(name)).state_dict().items()}


def _state_for_peer(peer: nn.Module, ours: dict[str, torch.Tensor], config: HieraConfig) -> dict:
    """Our (transformers-named) weights renamed to an official/timm model's keys, via the key map the loader uses."""
    from .weights import official_to_transformers_keys

    base = {k.removeprefix("hiera."): v for k, v in ours.items()}
    names = official_to_transformers_keys({k: k for k in peer.state_dict()}, config)  # ours -> theirs
    missing = [k for k in names if k not in base]
    if missing:
        raise Unavailable(f"weights do not map onto the peer model (e.g. {missing[:3]})")
    return {theirs: base[k] for k, theirs in names.items()}


def _alias_mae_symbols() -> None:
    """hiera-optim 0.2.1 is written against the FAIR repository's layout: it looks up ``MaskedAutoencoderHiera`` and
    ``apply_fusion_head`` in ``hiera.hiera`` when it is imported (PyPI's hiera-transformer 0.1.4 defines them in
    ``hiera.hiera_mae``; without them its adapter matches no model), and its patched forward reads
    ``model._grad_checkpointing`` (set in :func:`build_variant`)."""
    import importlib

    module, mae = importlib.import_module("hiera.hiera"), importlib.import_module("hiera.hiera_mae")
    for name in ("MaskedAutoencoderHiera", "apply_fusion_head"):
        if not hasattr(module, name) and hasattr(mae, name):
            setattr(module, name, getattr(mae, name))


@dataclass
class Variant:
    """A model ready to time: ``forward(x)`` returns a tensor (logits, or the MAE loss); ``loss(x)`` a scalar."""

    impl: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""


def build_variant(name: str, impl: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
                  train: bool = False, mask_ratio: float = 0.6) -> Variant:
    """Build ``impl`` (one of :data:`MODEL_IMPLS` + :data:`PEER_IMPLS`) of preset ``name`` on ``device`` with the
    weights of :func:`reference_state`. ``dtype`` casts the weights (inference); None keeps fp32 (training under
    autocast). Raises :class:`Unavailable` with the reason when the variant cannot run here."""
    device = torch.device(device)
    config = preset_config(name)
    mae, video = is_mae(name), config.spatial_dims == 3
    state = reference_state(preset_key(name))
    labels: dict[tuple, torch.Tensor] = {}

    def ce(logits, x):  # cross-entropy against fixed random labels
        key = (x.shape[0], x.device)
        if key not in labels:
            gen = torch.Generator(x.device).manual_seed(0)
            labels[key] = torch.randint(0, config.num_labels, (x.shape[0],), device=x.device, generator=gen)
        return F.cross_entropy(logits.float(), labels[key])

    if impl in MODEL_IMPLS:
        fused = impl != "eager"
        if fused:
            backend, reason = ops.routing.device_backend(device)
            if backend == "eager":
                raise Unavailable(f"fused=True would run the eager path here: {reason}")
        model = copy.deepcopy(reference_model(preset_key(name)))
        model.fused = fused
        model = model.to(device=device, dtype=dtype).train(train)
        module = model
        if impl in COMPILE_MODES:
            # a fresh dynamo cache per compiled model: compiles of earlier models count towards dynamo's recompile
            # limit on the shared forward code, past which it would silently run eager
            torch._dynamo.reset()
            module = torch.compile(model, mode=COMPILE_MODES[impl])
        cuda_graphs = uses_cuda_graphs(impl)

        def run(x):
            if cuda_graphs:  # each call is a new step: the graphs' outputs of the last one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            out = module(x)
            return out.loss if mae else out.logits

        note = "torch.compile(mode='reduce-overhead'): CUDA graphs" if cuda_graphs and device.type == "cuda" else ""
        return Variant(impl, model, run, run if mae else lambda x: ce(run(x), x), note)

    if impl in ("official", "hiera-optim"):
        try:
            with warnings.catch_warnings():  # it imports timm.models.layers (deprecated)
                warnings.simplefilter("ignore", FutureWarning)
                import hiera
        except ImportError as err:
            raise Unavailable(f"the official package is not installed (pip install hiera-transformer): {err}")
        ctor = getattr(hiera, preset_key(name), None)
        if ctor is None:
            raise Unavailable(f"the official package has no {preset_key(name)}")
        model = ctor(pretrained=False)
        model.load_state_dict(_state_for_peer(model, state, config))
        note = ""
        if impl == "hiera-optim":
            _alias_mae_symbols()
            try:
                from hiera_optim import optimize
            except ImportError:
                raise Unavailable("hiera-optim is not installed (pip install hiera-optim)") from None
            try:
                optimize(model, verbose=False)
                if not hasattr(model, "_grad_checkpointing"):
                    model._grad_checkpointing = False
            except Exception as err:  # a peer's failure is a skip with its reason, not a crash of our suite
                raise Unavailable(f"hiera_optim.optimize failed: {type(err).__name__}: {err}") from None
            note = "hiera_optim.optimize(official model), two compatibility shims (see hiera_fast.bench)"
        model = model.to(device=device, dtype=dtype).train(train)
        if mae:
            fwd = lambda x: model(x, mask_ratio=mask_ratio)[0]  # noqa: E731
            return Variant(impl, model, fwd, fwd, note)
        # the official head applies softmax in eval (a few µs); train mode returns logits
        return Variant(impl, model, model, lambda x: ce(model(x), x), note)

    if impl == "transformers":
        try:
            import transformers
        except ImportError as err:
            raise Unavailable(f"transformers is not installed: {err}")
        if video:
            raise Unavailable("transformers' Hiera has no video model")
        tconfig = transformers.HieraConfig.from_dict(config.to_dict())
        model = (transformers.HieraForPreTraining if mae else transformers.HieraForImageClassification)(tconfig)
        model.load_state_dict(state)
        model = model.to(device=device, dtype=dtype).train(train)
        if mae:
            fwd = lambda x: model(pixel_values=x).loss  # noqa: E731
            return Variant(impl, model, fwd, fwd)
        fwd = lambda x: model(pixel_values=x).logits  # noqa: E731
        return Variant(impl, model, fwd, lambda x: ce(fwd(x), x))

    if impl == "timm":
        try:
            import timm
        except ImportError as err:
            raise Unavailable(f"timm is not installed: {err}")
        if mae or video:
            raise Unavailable("timm's Hiera has image classifiers only (no MAE, no video)")
        try:
            model = timm.create_model(preset_key(name), pretrained=False, num_classes=config.num_labels)
        except RuntimeError as err:  # unknown model name in this timm version
            raise Unavailable(f"timm has no {preset_key(name)}: {err}")
        model.load_state_dict(_state_for_peer(model, state, config))
        model = model.to(device=device, dtype=dtype).train(train)
        return Variant(impl, model, model, lambda x: ce(model(x), x))

    raise ValueError(f"unknown implementation {impl!r}; choose from {MODEL_IMPLS + PEER_IMPLS}")


def make_input(config: HieraConfig, batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> torch.Tensor:
    """Random pixels ``[B, C, *image_size]``."""
    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(batch, config.num_channels, *config.image_size, generator=gen, device=device, dtype=dtype)


def inference_step(variant: Variant, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step():
        with torch.no_grad():
            return variant.forward(x)

    return step


def train_step(variant: Variant, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """forward + backward + AdamW step, under autocast to ``dtype`` (no autocast for fp32)."""
    device = x.device
    params = [p for p in variant.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = dtype != torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = variant.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def free_memory() -> None:
    """Drop compiled graphs, collect garbage and give cached CUDA memory back (call after dropping a variant).

    ``torch._dynamo.reset()`` comes first: dynamo's cache keeps a compiled model's graphs alive after the model is
    dropped, and with them a ``mode="reduce-overhead"`` model's CUDA-graph trees and memory pool, which
    ``empty_cache`` cannot free (the next variant would run, and have its peak memory read, beside them)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
