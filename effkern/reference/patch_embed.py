"""Patch embedding in plain PyTorch: the ``reference`` backend of
``effkern.ops.patch_embed`` and the shared pieces every backend uses.

Resizing (done once per call in the differentiable wrapper, for every backend)
-----------------------------------------------------------------------------
* weight (D, C, p0, p0) -> (D, C*p*p): FlexiViT's pseudo-inverse resize, exactly
  ``timm.layers.resample_patch_embed``: R (p*p, p0*p0) is the matrix of
  ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` from
  p0 x p0 to p x p (column i = the resized i-th basis image), and the new
  kernel is ``w_flat @ pinv(R)``.  The antialiased bicubic resize is separable,
  R = kron(R1, R1) with R1 (p, p0) the 1-D resize (exactly, in float64), and the
  pseudo-inverse of a Kronecker product is the Kronecker product of the
  pseudo-inverses, so ``w_flat @ pinv(R)`` is, per (d, c) kernel,
  ``pinv(R1)^T @ w[d, c] @ pinv(R1)``: two batched matmuls of
  D*C*p0*p*(p0 + p) multiply-adds instead of D*C*p0^2*p^2 (ViT-Ti 16 -> 32:
  14 M instead of 151 M, forward and again backward, every step).  pinv(R1)
  (p0, p) is built once per (p0, p, device, dtype) in float64 and cached
  (float32 for fp32/fp16/bf16 weights: timm's intermediate dtype; float64 for
  float64 weights); autograd carries gradients to the base weight.
* pos_embed (1, g0*g0, D) -> (gh*gw, D): ``timm.layers.resample_abs_pos_embed``
  with no prefix tokens: bicubic, antialias=True, align_corners=False, computed
  in float32 (float64 for float64 input) and cast back.

Kernel math (the op ``effkern::patch_embed_fwd`` and its backward ops)
-----------------------------------------------------------------------
Token t has a flat patch index g[t] = b*N + n (N = gh*gw, n = gy*gw + gx
row-major).  Its patch vector has K = C*p*p entries in the conv's (c, i, j)
order: P[t, (c*p + i)*p + j] = images[b, c, gy*p + i, gx*p + j].

    out[t] = P[t] @ W^T + bias + pos[n]           (T, D)
    dW     = dY^T @ P                             (D, K)
    dP     = dY @ W, scattered back (col2im)      (B, C, H, W)
    dbias  = sum_t dY[t];  dpos = index_add over n
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_PINV_CACHE: dict = {}
_PINV_LOCK = threading.Lock()


def _intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resize_matrix64(old: int, new_h: int, new_w: int) -> torch.Tensor:
    """R (new_h*new_w, old*old) in float64: the bicubic antialiased resize of an old x old
    grid as a matrix, column i the resized i-th basis image (timm's _compute_resize_matrix)."""
    eye = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(eye, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    return resized.squeeze(1).permute(1, 2, 0).reshape(new_h * new_w, old * old)


def resize_matrix1d64(old: int, new: int) -> torch.Tensor:
    """R1 (new, old) in float64: the same resize along one axis; resize_matrix64(old, new,
    new) == kron(R1, R1)."""
    eye = torch.eye(old, dtype=torch.float64).reshape(old, 1, 1, old)
    resized = F.interpolate(eye, size=(1, new), mode="bicubic", antialias=True, align_corners=False)
    return resized.reshape(old, new).t().contiguous()


def _pinv1d(old: int, new: int) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return torch.linalg.pinv(resize_matrix1d64(old, new))


def resize_pinv(old: int, new: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """pinv(R1) (old, new) for weights of ``dtype``, cached per (old, new, device, dtype)."""
    mdtype = _intermediate_dtype(dtype)
    key = (int(old), int(new), torch.device(device), mdtype)
    mat = _PINV_CACHE.get(key)
    if mat is None and torch.compiler.is_compiling():
        # Traced: never store a traced tensor in the cache; compute inline
        # (an eager call, or warm_resize_cache, fills the cache for next time).
        return _pinv1d(int(old), int(new)).to(device=key[2], dtype=mdtype)
    if mat is None:
        with _PINV_LOCK:
            mat = _PINV_CACHE.get(key)
            if mat is None:
                mat = _pinv1d(int(old), int(new)).to(device=key[2], dtype=mdtype).contiguous()
                _PINV_CACHE[key] = mat
    return mat


def warm_resize_cache(old: int, new: int, device, dtype: torch.dtype) -> None:
    """Fill the pinv cache eagerly (e.g. before torch.compile traces a new patch size)."""
    resize_pinv(old, new, torch.device(device), dtype)


def resize_weight(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(D, C, p0, p0) -> (D, C*p*p), as timm.layers.resample_patch_embed (flattened):
    pinv(R1)^T @ w[d, c] @ pinv(R1) for every (d, c)."""
    D, C, p0, _ = weight.shape
    p = patch_size
    if p0 == p:
        return weight.reshape(D, C * p0 * p0)
    pinv = resize_pinv(p0, p, weight.device, weight.dtype)
    w = weight.reshape(D * C, p0, p0).to(pinv.dtype)
    out = torch.matmul(pinv.t(), torch.matmul(w, pinv))   # (D*C, p, p)
    return out.to(weight.dtype).reshape(D, C * p * p)


def resize_pos(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, g0*g0, D) -> (gh*gw, D), as timm.layers.resample_abs_pos_embed(num_prefix_tokens=0)."""
    _, L, D = pos_embed.shape
    g0 = int(round(L ** 0.5))
    if (g0, g0) == tuple(grid):
        return pos_embed.reshape(L, D)
    x = pos_embed.to(_intermediate_dtype(pos_embed.dtype)).reshape(1, g0, g0, D).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], D).to(pos_embed.dtype)


def flat_index(keep_idx: torch.Tensor, cu_seqlens: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Per-token flat patch index b*N + keep_idx (int64), without a host sync."""
    total = keep_idx.shape[0]
    t = torch.arange(total, device=keep_idx.device, dtype=torch.int64)
    b = torch.searchsorted(cu_seqlens[1:].to(torch.int64), t, right=True)
    return b * num_patches + keep_idx.to(torch.int64)


def _patch_view(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> a (B, gh, gw, C, p, p) view (no copy)."""
    B, C, H, W = images.shape
    return images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)


def gather_patches(images: torch.Tensor, index: torch.Tensor | None, p: int) -> torch.Tensor:
    """(T, C*p*p) patch vectors of the flat patch indices ``index`` (all patches if None)."""
    B, C, H, W = images.shape
    view = _patch_view(images, p)
    if index is None:
        return view.reshape(B * (H // p) * (W // p), C * p * p)
    gh, gw = H // p, W // p
    n = gh * gw
    b, r = index // n, index % n
    return view[b, r // gw, r % gw].reshape(index.shape[0], C * p * p)


def patch_embed_fwd(images, weight, bias, pos, index, patch_size: int) -> torch.Tensor:
    """(T, D): gathered patches @ weight^T + bias + pos rows.  weight is (D, C*p*p)."""
    B, C, H, W = images.shape
    n = (H // patch_size) * (W // patch_size)
    patches = gather_patches(images, index, patch_size)
    out = patches @ weight.t()
    if bias is not None:
        out = out + bias
    if pos is not None:
        if index is None:
            out = (out.reshape(B, n, out.shape[-1]) + pos).reshape(B * n, out.shape[-1])
        else:
            out = out + pos.index_select(0, index % n)
    return out.contiguous()


def patch_embed_bwd_weight(grad: torch.Tensor, images: torch.Tensor, index, patch_size: int) -> torch.Tensor:
    """dW (D, C*p*p) = grad^T @ patches."""
    patches = gather_patches(images, index, patch_size)
    return (grad.t() @ patches).contiguous()


def patch_embed_bwd_images(grad: torch.Tensor, weight: torch.Tensor, index, patch_size: int,
                           image_size) -> torch.Tensor:
    """d images (B, C, H, W): (grad @ W) scattered back to the patches' pixels (col2im)."""
    B, C, H, W = image_size
    p = patch_size
    gh, gw = H // p, W // p
    dpatch = grad @ weight  # (T, K)
    if index is None:
        buf = dpatch.reshape(B, gh, gw, C, p, p)
    else:
        buf = dpatch.new_zeros(B * gh * gw, C * p * p)
        buf.index_add_(0, index, dpatch)
        buf = buf.reshape(B, gh, gw, C, p, p)
    return buf.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W).contiguous()
