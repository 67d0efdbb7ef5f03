"""Eager PyTorch references of the fused ops: the executable spec the Triton kernels are tested against.

Layout contract (see DESIGN.md §1). ``qkv`` is the qkv Linear's output ``[B, N, 3 * C]`` with channels
ordered ``(3, heads, head_dim)`` and tokens in Hiera's *unrolled* order ``n = t * nw + w``: ``w`` is the
window (mask unit), ``t`` the token inside it, so a window's tokens are strided by ``nw`` in memory.
With ``T = N // nw`` tokens per window and query stride ``s``, pooled query ``r < T // s`` of window ``w``
is the max over ``j < s`` of query row ``(j * T // s + r) * nw + w``; the output ``[B, N // s, C]`` holds
it at row ``r * nw + w``, channels ``h * head_dim + d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_unit_attention_official(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """The official 5-D formulation (``hiera/hiera.py: MaskUnitAttention``) with an explicit softmax.

    Works in any dtype, float64 included; used as the ground truth in tests.
    qkv: ``[B, N, 3 * C]`` → ``[B, N // q_stride, C]``.
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    # [B, T, nw, 3, H, hd] -> [3, B, H, nw, T, hd]
    T = N // num_windows
    qkv = qkv.reshape(B, T, num_windows, 3, num_heads, head_dim).permute(3, 0, 4, 2, 1, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if q_stride > 1:
        # [B, H, nw, s, T // s, hd] -> max over s
        q = q.reshape(B, num_heads, num_windows, q_stride, T // q_stride, head_dim).max(dim=3).values
    attn = (q * head_dim**-0.5) @ k.transpose(-1, -2)
    x = attn.softmax(dim=-1) @ v  # [B, H, nw, T', hd]
    return x.transpose(1, 3).reshape(B, N // q_stride, C)  # [B, T' * nw, C]


def mask_unit_attention_eager(qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int) -> torch.Tensor:
    """The best eager form: contiguous 4-D windows ``[B * nw, heads, T, hd]`` so SDPA can pick its fused kernels.

    Same contract as :func:`mask_unit_attention_official`. Query ties in the max-pool route the gradient to one
    element, as ``torch.max(dim).values`` does in the official code.
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    T = N // num_windows
    # [B, T, nw, 3, H, hd] -> [3, B, nw, H, T, hd] -> [3, B * nw, H, T, hd]
    qkv = qkv.reshape(B, T, num_windows, 3, num_heads, head_dim).permute(3, 0, 2, 4, 1, 5)
    qkv = qkv.reshape(3, B * num_windows, num_heads, T, head_dim)
    q, k, v = qkv.unbind(0)
    if q_stride > 1:
        # [B * nw, H, s, T // s, hd] -> max over s
        q = q.reshape(B * num_windows, num_heads, q_stride, T // q_stride, head_dim).max(dim=2).values
    x = F.scaled_dot_product_attention(q, k, v)  # [B * nw, H, T', hd]
    # [B, nw, H, T', hd] -> [B, T', nw, H, hd] -> [B, T' * nw, C]
    x = x.reshape(B, num_windows, num_heads, T // q_stride, head_dim).permute(0, 3, 1, 2, 4)
    return x.reshape(B, N // q_stride, C)


def unrolled_max_pool_eager(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Max-pool over the most significant unroll level: ``[B, N, C]`` → ``[B, N // stride, C]``.

    Because of the unrolled layout this is a max over the leading index of ``x.view(B, stride, N // stride, C)``
    (see the official ``Unroll`` docstring).
    """
    if stride == 1:
        return x
    B, N, C = x.shape
    return x.reshape(B, stride, N // stride, C).max(dim=1).values


def _windows_4d(t: torch.Tensor, B: int, num_windows: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """Unrolled ``[B, T * nw, H * hd]`` → contiguous windows ``[B * nw, H, T, hd]``."""
    T = t.shape[1] // num_windows
    t = t.reshape(B, T, num_windows, num_heads, head_dim).permute(0, 2, 3, 1, 4)
    return t.reshape(B * num_windows, num_heads, T, head_dim)


def mask_unit_attention_backward_eager(
    grad_out: torch.Tensor, qkv: torch.Tensor, num_heads: int, q_stride: int, num_windows: int
) -> torch.Tensor:
    """Analytic backward of :func:`mask_unit_attention_eager`: ``d_qkv [B, N, 3C]`` in qkv's unrolled layout.

    Recomputes P; ``dV = Pᵀ dO``, ``dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))``, ``dQ = scale · dS K``,
    ``dK = scale · dSᵀ Q``; the pooled-query gradient goes to the candidate ``torch.max(dim).indices`` picked
    (the same element the official code's autograd routes it to). Written out (not via autograd) so it can run
    inside a custom op's body, where autograd does not record.
    """
    B, N, three_c = qkv.shape
    C = three_c // 3
    head_dim = C // num_heads
    T = N // num_windows
    scale = head_dim**-0.5
    q, k, v = (_windows_4d(t, B, num_windows, num_heads, head_dim) for t in qkv.split(C, dim=-1))
    BW = q.shape[0]
    if q_stride > 1:
        q, index = q.reshape(BW, num_heads, q_stride, T // q_stride, head_dim).max(dim=2)
    p = ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1)  # [BW, H, T', T]
    d_out = _windows_4d(grad_out, B, num_windows, num_heads, head_dim)  # [BW, H, T', hd]
    out = p @ v
    d_v = p.transpose(-1, -2) @ d_out
    d_p = d_out @ v.transpose(-1, -2)
    d_s = p * (d_p - (d_out * out).sum(dim=-1, keepdim=True))
    d_q = (d_s @ k) * scale
    d_k = (d_s.transpose(-1, -2) @ q) * scale
    if q_stride > 1:
        d_q_full = d_q.new_zeros(BW, num_heads, q_stride, T // q_stride, head_dim)
        d_q = d_q_full.scatter_(2, index.unsqueeze(2), d_q.unsqueeze(2)).reshape(BW, num_heads, T, head_dim)
    d_qkv = torch.stack((d_q, d_k, d_v))  # [3, B * nw, H, T, hd]
    # [3, B, nw, H, T, hd] -> [B, T, nw, 3, H, hd] -> [B, N, 3C]
    d_qkv = d_qkv.reshape(3, B, num_windows, num_heads, T, head_dim).permute(1, 4, 2, 0, 3, 5)
    return d_qkv.reshape(B, N, three_c)


def unrolled_max_pool_backward_eager(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """Backward of :func:`unrolled_max_pool_eager`: the gradient goes to ``torch.max(dim).indices``' element."""
    B, N, C = x.shape
    index = x.reshape(B, stride, N // stride, C).max(dim=1).indices  # [B, N // stride, C]
    grad_x = grad_out.new_zeros(B, stride, N // stride, C)
    return grad_x.scatter_(1, index.unsqueeze(1), grad_out.unsqueeze(1)).reshape(B, N, C)
