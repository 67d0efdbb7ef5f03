"""The attention calls of a model, and the least traffic one needs: what the op benchmarks time and report against.

Bytes model of one attention call (docs/DESIGN.md, "Performance model"): the least traffic any implementation
needs. The forward reads qkv ``[B, N, 3C]`` once and writes out ``[B, N / q_stride, C]`` once; the backward reads
qkv, out and d_out and writes d_qkv (the fused kernel's 4-byte-per-row log-sum-exp is left out). Achieved bandwidth
is that byte count over the median time, reported next to the fraction of the GPU's measured copy bandwidth
(:data:`MEASURED_COPY_BANDWIDTH`, :func:`peak_bandwidth`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from hiera_fast import bench
from hiera_fast.config import HieraConfig

PEAK_BANDWIDTH = 3.0e12  # bytes/s: the H100's measured copy bandwidth, for a GPU not in the table below
# device-to-device copy bandwidth (bytes read + written per second) measured on the GPUs this project is lent
MEASURED_COPY_BANDWIDTH = {"H200": 4.3e12, "H100": 3.0e12}
L2_BYTES = 50 * 2**20


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
    from hiera_fast.model import HieraEncoder, HieraLayer

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
    name = bench.device_name(device)
    return next((bw for key, bw in MEASURED_COPY_BANDWIDTH.items() if re.search(rf"\b{key}\b", name)), PEAK_BANDWIDTH)


def bandwidth(bytes_moved: float, ms: float, peak: float = PEAK_BANDWIDTH) -> dict:
    """``{"gb_per_s", "pct_of_peak", "peak_tbps"}`` for a byte count moved in ``ms`` milliseconds against ``peak``
    bytes/s (:func:`peak_bandwidth` of the device)."""
    per_s = bytes_moved / (ms * 1e-3)
    return {"gb_per_s": per_s / 1e9, "pct_of_peak": 100.0 * per_s / peak, "peak_tbps": peak / 1e12}
