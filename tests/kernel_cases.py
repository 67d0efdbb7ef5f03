"""Shapes and helpers shared by the kernel tests (forward: test_kernels_fwd.py; backward tests import these too).

Shapes keep Hiera's per-block geometry (tokens per window, q_stride, window count, head dim) and shrink only the
batch and head count, so the interpreter lane stays fast on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnCase:
    """One mask-unit attention call: ``qkv [batch, num_windows * tokens_per_window, 3 * num_heads * head_dim]``."""

    batch: int
    num_windows: int
    tokens_per_window: int
    q_stride: int
    num_heads: int
    head_dim: int
    label: str = ""

    @property
    def num_tokens(self) -> int:
        return self.num_windows * self.tokens_per_window

    @property
    def channels(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def id(self) -> str:
        q = self.tokens_per_window // self.q_stride
        return (f"{self.label}-b{self.batch}-{q}of{self.tokens_per_window}x{self.num_windows}"
                f"-s{self.q_stride}-h{self.num_heads}x{self.head_dim}")


# docs/DESIGN.md's 224² table (q/kv per window), video, MAE-masked window counts, odd shapes. Keep it small: every case
# runs under the interpreter in fp32 and fp16.
ATTENTION_CASES = [
    AttnCase(2, 4, 64, 1, 1, 96, "stage1-64/64"),
    AttnCase(1, 5, 64, 4, 2, 56, "stage2pool-16/64"),
    AttnCase(3, 6, 16, 1, 1, 72, "stage2-16/16"),
    AttnCase(1, 7, 16, 4, 2, 112, "stage3pool-4/16"),
    AttnCase(1, 1, 196, 1, 2, 64, "stage3-global-196/196"),
    AttnCase(1, 1, 196, 4, 1, 96, "stage4pool-global-49/196"),
    AttnCase(3, 1, 49, 1, 2, 128, "stage4-global-49/49"),
    AttnCase(1, 19, 64, 4, 1, 64, "mae-19win-16/64"),
    AttnCase(1, 7, 16, 1, 2, 32, "mae-7win-16/16"),
    AttnCase(1, 3, 64, 8, 1, 40, "qstride8"),
    AttnCase(1, 19, 8, 8, 1, 24, "one-query-per-window"),
    AttnCase(1, 7, 12, 1, 1, 24, "odd-12tok"),
    AttnCase(1, 3, 49, 1, 1, 8, "odd-49tok-hd8"),
    AttnCase(1, 4, 128, 2, 1, 56, "big-windows-loop"),
    AttnCase(1, 1, 1, 1, 1, 16, "single-token"),
    AttnCase(1, 2, 64, 1, 1, 256, "hd256"),
    AttnCase(1, 4, 18, 3, 1, 24, "qstride3"),  # a query stride that is not a power of two (query_stride (3, 1))
    AttnCase(1, 1, 54, 9, 1, 16, "global-qstride9"),
]
VIDEO_CASES = [
    AttnCase(1, 1, 1568, 4, 1, 64, "video-stage4pool-392/1568"),
    AttnCase(1, 1, 600, 1, 1, 40, "long-global-600"),  # >= 512 queries: the 128-row tile of video's stage 3
]
VIDEO_CASES_GPU = [AttnCase(2, 1, 1568, 1, 2, 96, "video-stage3-1568/1568")]  # ~40 s in the interpreter: GPU only
# (B, N, C, stride); stride 3 is not a power of two
MAX_POOL_CASES = [(1, 64, 96, 4), (3, 8 * 50, 40, 8), (2, 36, 200, 2), (1, 16, 24, 1), (2, 30, 24, 3)]


def make_qkv(case: AttnCase, dtype: torch.dtype, seed: int, *, layout: str = "contiguous",
             device: str = "cpu") -> torch.Tensor:
    """Random qkv; ``layout``: ``contiguous``, ``sliced`` (a column slice of a wider tensor, odd storage offset) or
    ``token-major`` (``[N, B, 3C]`` storage, so the batch stride is smaller than the token stride)."""
    g = torch.Generator().manual_seed(seed)
    B, N, C3 = case.batch, case.num_tokens, 3 * case.channels
    if layout == "contiguous":
        x = torch.randn(B, N, C3, generator=g)
    elif layout == "sliced":
        x = torch.randn(B, N, C3 + 13, generator=g)[:, :, 5 : 5 + C3]
    elif layout == "token-major":
        x = torch.randn(N, B, C3, generator=g).transpose(0, 1)
    else:
        raise ValueError(layout)
    return x.to(device=device, dtype=dtype)


def reference_lse(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """``[B, heads, N // q_stride]``: natural-log log-sum-exp over keys of ``q_pooled . k / sqrt(head_dim)``, in
    qkv's dtype (pass float64), indexed by output row ``r * nw + w`` — the official formulation."""
    B, _, three_c = qkv.shape
    head_dim = three_c // 3 // num_heads
    # [B, T, nw, 3, H, hd] -> [3, B, H, nw, T, hd]
    qkv = qkv.reshape(B, -1, num_windows, 3, num_heads, head_dim).permute(3, 0, 4, 2, 1, 5)
    q, k = qkv[0], qkv[1]
    if q_stride > 1:
        q = q.reshape(B, num_heads, num_windows, q_stride, -1, head_dim).max(dim=3).values
    lse = ((q * head_dim**-0.5) @ k.transpose(-1, -2)).logsumexp(-1)  # [B, H, nw, T']
    return lse.transpose(-1, -2).reshape(B, num_heads, -1)  # [B, H, T' * nw]


def max_abs(x: torch.Tensor) -> float:
    return x.detach().double().abs().max().item()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x - ref| / max|ref|``."""
    return max_abs(x.double() - ref.double()) / max(max_abs(ref), 1e-30)


def low_precision_bound(eager_lowp: torch.Tensor, ref64: torch.Tensor, floor: float = 1e-3) -> float:
    """The flash-attention rule: our max error may be 2x eager PyTorch's in the same dtype, plus a floor."""
    return 2 * max_abs(eager_lowp.double() - ref64) + floor


def poisoned_like(shape, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """A NaN-filled buffer: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
