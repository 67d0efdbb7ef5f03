"""Eager PyTorch references of the fused ops: the executable spec the Triton kernels are tested against.

Layout contract (docs/DESIGN.md, "The unrolled layout"). ``qkv`` is the qkv Linear's output ``[B, N, 3 * C]`` with
channels ordered ``(3, heads, head_dim)`` and tokens in Hiera's *unrolled* order ``n = t * nw + w``: ``w`` is the window
(mask unit), ``t`` the token inside it, so a window's tokens are strided by ``nw`` in memory. With ``T = N // nw``
tokens per window and query stride ``s``, pooled query ``r < T // s`` of window ``w`` is the max over ``j < s`` of query
row ``(j * T // s + r) * nw + w``; the output ``[B, N // s, C]`` holds it at row ``r * nw + w``, channels ``h * head_dim
+ d``.
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


def window_attention_bhwc_reference(qkv: torch.Tensor, bias: torch.Tensor | None, num_heads: int, window_size: int,
                                    q_stride: int) -> torch.Tensor:
    """SAM 2's windowed attention on a BHWC map, computed the official way (``sam2/modeling/backbones/hieradet.py``:
    ``window_partition``, the attention's query ``MaxPool2d``, SDPA, ``window_unpartition``); the spec of
    ``hiera_fast.kernels.window_attention``. Any float dtype (float64: the ground truth), with autograd.

    Args:
        qkv: ``[B, H, W, 3 * C]``, the qkv Linear applied to the *unpadded* map, channels ``(3, heads, head_dim)``.
        bias: ``[3 * C]``, that Linear's bias, or None (zeros). The official block zero-pads the normed map before
            the Linear, so a padded token's q, k, v are exactly the bias (in qkv's dtype).
        num_heads: heads; ``C % num_heads == 0``.
        window_size: ``ws``; the map is padded at the bottom / right to multiples of it.
        q_stride: 1, or the queries' ``q_stride x q_stride`` max-pool inside each window (floor).

    Returns:
        ``[B, H // q_stride, W // q_stride, C]``: the windows of ``ws // q_stride`` put back on the grid padded from
        the pooled size, cropped (what the official block adds to its pooled residual).
    """
    B, H, W, three_c = qkv.shape
    C, ws = three_c // 3, window_size
    head_dim = C // num_heads
    pad_h, pad_w = (-H) % ws, (-W) % ws
    x = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))  # [B, Hp, Wp, 3C]: zero rows, then the Linear's bias on them
    Hp, Wp = H + pad_h, W + pad_w
    if bias is not None:
        pad = torch.ones(Hp, Wp, dtype=torch.bool, device=qkv.device)
        pad[:H, :W] = False
        x = torch.where(pad[:, :, None], bias.to(x.dtype), x)
    nh, nw = Hp // ws, Wp // ws
    x = x.reshape(B, nh, ws, nw, ws, three_c).permute(0, 1, 3, 2, 4, 5)  # [B, nH, nW, ws, ws, 3C]
    x = x.reshape(B * nh * nw, ws * ws, 3, num_heads, head_dim)  # [B * nW, ws * ws, 3, heads, hd]
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # each [B * nW, heads, ws * ws, hd]
    wo = ws
    if q_stride > 1:
        q = q.transpose(1, 2).reshape(B * nh * nw, ws, ws, C).permute(0, 3, 1, 2)  # [B * nW, C, ws, ws]
        q = F.max_pool2d(q, q_stride, q_stride)  # [B * nW, C, wo, wo]
        wo = q.shape[-1]
        q = q.reshape(B * nh * nw, num_heads, head_dim, wo * wo).transpose(2, 3)  # [B * nW, heads, wo * wo, hd]
    out = F.scaled_dot_product_attention(q, k, v)  # [B * nW, heads, wo * wo, hd]
    # window_unpartition: windows of wo on the grid padded from the pooled map's size, cropped to it
    Ho, Wo = H // q_stride, W // q_stride
    Hq, Wq = Ho + (-Ho) % wo, Wo + (-Wo) % wo
    out = out.transpose(1, 2).reshape(B, Hq // wo, Wq // wo, wo, wo, C)  # [B, nH, nW, wo, wo, C]
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, Wq, C)  # [B, Hq, Wq, C]
    return out[:, :Ho, :Wo]
