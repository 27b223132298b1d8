"""fft_crop as two real matrix products (the math of the GEMM path of csrc/cpu/fft_crop_cpu.cpp).

One axis of the crop, input length N -> output length n, keeps the frequencies
K = {-floor(n/2), ..., ceil(n/2)-1} and maps x to
    y[a] = (1/N) sum_{k in K} sum_m x[m] exp(2 pi i k (a/n - m/N)).
Its matrix A = Ar + i Ai has Ar[a, m] = (1/N) sum_k cos(k theta), theta = 2 pi (a/n - m/N);
Ai is zero for odd n (K symmetric) and, for even n, rank one (only the unpaired
frequency -n/2 contributes): Ai = u v^T, u[a] = (-1)^a / N, v[m] = sin(pi n m / N).
The 2-D crop is Re(A_h x A_w^T) = Ar_h x Ar_w^T - u_h (v_h^T x v_w) u_w^T.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _axis64(n_in: int, n_out: int):
    a = torch.arange(n_out, dtype=torch.float64)[:, None]
    m = torch.arange(n_in, dtype=torch.float64)[None, :]
    theta = 2 * math.pi * (a / n_out - m / n_in)
    ar = torch.zeros(n_out, n_in, dtype=torch.float64)
    for k in range(-(n_out // 2), (n_out + 1) // 2):
        ar += torch.cos(k * theta)
    ar /= n_in
    if n_out % 2 == 0:
        u = torch.tensor([(-1.0) ** i for i in range(n_out)], dtype=torch.float64) / n_in
        v = torch.sin(math.pi * n_out * torch.arange(n_in, dtype=torch.float64) / n_in)
    else:
        u = v = None
    return ar, u, v


def crop_axis(n_in: int, n_out: int, dtype: torch.dtype = torch.float64, device=None):
    """(Ar, u, v) for one axis; u, v are None when n_out is odd."""
    ar, u, v = _axis64(int(n_in), int(n_out))
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(ar), conv(u), conv(v)


def _channel_affine(x_dtype, mean, std, channels, dtype, device):
    """(scale, shift) per channel so that y = crop(x) * scale + shift, or None."""
    if mean is None:
        return None
    mean = mean.to(device=device, dtype=dtype).reshape(channels, 1, 1)
    std = std.to(device=device, dtype=dtype).reshape(channels, 1, 1)
    base = 1.0 / 255.0 if not x_dtype.is_floating_point else 1.0
    return base / std, -mean / std


def fft_crop(x: torch.Tensor, size, mean=None, std=None) -> torch.Tensor:
    h, w = size
    H, W = x.shape[-2:]
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    xf = x.to(compute)
    ar_h, u_h, v_h = crop_axis(H, h, compute, x.device)
    ar_w, u_w, v_w = crop_axis(W, w, compute, x.device)
    y = ar_h @ (xf @ ar_w.T)
    if u_h is not None and u_w is not None:
        s = torch.einsum("m,ncmk,k->nc", v_h, xf, v_w)
        y = y - s[:, :, None, None] * torch.outer(u_h, u_w)
    affine = _channel_affine(x.dtype, mean, std, x.shape[1], compute, x.device)
    if affine is not None:
        y = y * affine[0] + affine[1]
    return y.to(dtype)


def fft_crop_backward(grad: torch.Tensor, input_size, std=None) -> torch.Tensor:
    """Adjoint of the crop applied to grad / std (per channel)."""
    H, W = input_size
    h, w = grad.shape[-2:]
    compute = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    g = grad.to(compute)
    if std is not None:
        g = g / std.to(device=g.device, dtype=compute).reshape(-1, 1, 1)
    ar_h, u_h, v_h = crop_axis(H, h, compute, grad.device)
    ar_w, u_w, v_w = crop_axis(W, w, compute, grad.device)
    dx = ar_h.T @ g @ ar_w
    if u_h is not None and u_w is not None:
        s = torch.einsum("a,ncab,b->nc", u_h, g, u_w)
        dx = dx - s[:, :, None, None] * torch.outer(v_h, v_w)
    return dx.to(grad.dtype)
