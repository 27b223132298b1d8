"""effkern.ops.patch_embed: variable-patch-size patch embedding fused with
ragged token dropout (FlexiViT resize + PatchDropout + pos add in one GEMM).

    out[t] = patches[t] @ resize(W)^T + bias + resample(pos)[n_t]

The weight/pos resampling (timm semantics, see effkern/reference/patch_embed.py)
runs here, in the differentiable wrapper; the custom ops below see the
already-resized weight (D, C*p*p) and pos (N, D).  Math and layout:
docs/ops_patch_embed.md.

Ops (torch.ops.effkern.*, declared here with torch.library: define, impl, fake, autograd)
------------------------------------------------------------------------------------------
patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos, Tensor? index, SymInt patch_size) -> Tensor
    (T, D); index (T,) int64 = flat patch index b*N + n of each kept token
    (None: every patch, T = B*N, token order b-major, row-major grid).
patch_embed_bwd_weight(Tensor grad, Tensor images, Tensor? index, SymInt patch_size) -> Tensor      (D, C*p*p)
patch_embed_bwd_images(Tensor grad, Tensor weight, Tensor? index, SymInt patch_size, SymInt[] image_size) -> Tensor

Backends (effkern.backend.select over {"triton", "reference"}): CUDA -> Triton
(effkern/kernels/patch_embed.py); CPU -> the PyTorch reference (gather, one
matmul, add); forced "triton" on CPU under TRITON_INTERPRET=1 -> the raw
Triton launchers (interpreted).  The image gradient (col2im) is the PyTorch
path on every backend: dY @ W on cuBLAS plus one index_add.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from effkern.backend import select
from effkern.ops import _checks
from effkern.ops._registration import PT2_COMPLIANT, forbid_double_backward
from effkern.reference import patch_embed as _ref
from effkern.ops.resize_pos_embed import resize_pos_embed

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _backend(device: torch.device) -> str:
    return select(device, {"triton", "reference"})


def _kernels():
    from effkern.kernels import patch_embed as kernels

    return kernels


def _kernel_index(index: Optional[torch.Tensor], images: torch.Tensor) -> Optional[torch.Tensor]:
    """The guard in front of every kernel, also for direct torch.ops.effkern calls: the
    flat index is int64, 1-D, on the images' device and contiguous (the Triton kernels
    read it as a dense int64 array)."""
    if index is None:
        return None
    return _checks.index_tensor("index", index, dtypes=(torch.int64,), device=images.device)


# ---------------------------------------------------------------------------
# ops: per op its schema, implementation, fake kernel (and autograd)
# ---------------------------------------------------------------------------

_lib = torch.library.Library("effkern", "FRAGMENT")

# -- effkern::patch_embed_fwd ------------------------------------------------

_lib.define("patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? pos, Tensor? index, "
            "SymInt patch_size) -> Tensor", tags=PT2_COMPLIANT)


def _fwd_impl(images, weight, bias, pos, index, patch_size):
    index = _kernel_index(index, images)
    if _backend(images.device) == "triton":
        return _kernels().patch_embed_fwd(images, weight, bias, pos, index, patch_size)
    return _ref.patch_embed_fwd(images, weight, bias, pos, index, patch_size)


_lib.impl("patch_embed_fwd", _fwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("effkern::patch_embed_fwd")
def _fwd_fake(images, weight, bias, pos, index, patch_size):
    B, C, H, W = images.shape
    T = B * (H // patch_size) * (W // patch_size) if index is None else index.shape[0]
    return images.new_empty((T, weight.shape[0]))


# -- effkern::patch_embed_bwd_weight -----------------------------------------

_lib.define("patch_embed_bwd_weight(Tensor grad, Tensor images, Tensor? index, SymInt patch_size) -> Tensor",
            tags=PT2_COMPLIANT)


def _bwd_weight_impl(grad, images, index, patch_size):
    index = _kernel_index(index, images)
    if _backend(images.device) == "triton":
        return _kernels().patch_embed_bwd_weight(grad, images, index, patch_size)
    return _ref.patch_embed_bwd_weight(grad, images, index, patch_size)


_lib.impl("patch_embed_bwd_weight", _bwd_weight_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("effkern::patch_embed_bwd_weight")
def _bwd_weight_fake(grad, images, index, patch_size):
    return images.new_empty((grad.shape[1], images.shape[1] * patch_size * patch_size))


# -- effkern::patch_embed_bwd_images -----------------------------------------

_lib.define("patch_embed_bwd_images(Tensor grad, Tensor weight, Tensor? index, SymInt patch_size, "
            "SymInt[] image_size) -> Tensor", tags=PT2_COMPLIANT)


def _bwd_images_impl(grad, weight, index, patch_size, image_size):
    return _ref.patch_embed_bwd_images(grad, weight, index, patch_size, image_size)


_lib.impl("patch_embed_bwd_images", _bwd_images_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("effkern::patch_embed_bwd_images")
def _bwd_images_fake(grad, weight, index, patch_size, image_size):
    return grad.new_empty(tuple(image_size))


# -- autograd of effkern::patch_embed_fwd (through the two backward ops) ------

def _setup_context(ctx, inputs, output):
    images, weight, bias, pos, index, patch_size = inputs
    ctx.patch_size = patch_size
    ctx.image_size = tuple(images.shape)
    ctx.num_patches = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
    ctx.pos_shape = None if pos is None else tuple(pos.shape)
    ctx.save_for_backward(images if ctx.needs_input_grad[1] else None,
                          weight if ctx.needs_input_grad[0] else None, index)


def _backward(ctx, grad):
    images, weight, index = ctx.saved_tensors
    grad = grad.contiguous()
    p = ctx.patch_size
    d_images = d_weight = d_bias = d_pos = None
    if ctx.needs_input_grad[0]:
        d_images = torch.ops.effkern.patch_embed_bwd_images(grad, weight, index, p, list(ctx.image_size))
    if ctx.needs_input_grad[1]:
        d_weight = torch.ops.effkern.patch_embed_bwd_weight(grad, images, index, p)
    if ctx.needs_input_grad[2]:
        d_bias = grad.sum(0)
    if ctx.needs_input_grad[3]:
        n = ctx.num_patches
        if index is None:
            d_pos = grad.reshape(-1, n, grad.shape[-1]).sum(0)
        else:
            d_pos = grad.new_zeros(ctx.pos_shape).index_add_(0, index % n, grad)
    return d_images, d_weight, d_bias, d_pos, None, None


torch.library.register_autograd("effkern::patch_embed_fwd", _backward, setup_context=_setup_context)


forbid_double_backward("patch_embed", "patch_embed_bwd_weight", "patch_embed_bwd_images")


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _same(name: str, t: torch.Tensor, images: torch.Tensor, check_dtype: bool) -> None:
    if t.device != images.device:
        raise ValueError(f"{name} is on {t.device} but images is on {images.device}")
    if check_dtype and t.dtype != images.dtype:
        raise ValueError(f"{name} has dtype {_dtype_name(t.dtype)} but images has dtype "
                         f"{_dtype_name(images.dtype)} (cast them to one dtype, or use torch.autocast)")


def _check_indices(keep_idx: torch.Tensor, cu_seqlens: torch.Tensor, num_patches: int) -> None:
    """Data checks (they read the values: free on CPU, a host sync on CUDA)."""
    cu = cu_seqlens.to(torch.int64)
    total = keep_idx.shape[0]
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0].item()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1].item() != total:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1].item()}) must equal the length of keep_idx ({total})")
    if total == 0:
        return
    if bool(((keep_idx < 0) | (keep_idx >= num_patches)).any()):
        raise ValueError(f"keep_idx has values outside [0, {num_patches}) (the number of patches per image)")
    if total > 1:
        bad = keep_idx[1:] <= keep_idx[:-1]
        starts = torch.zeros(total, dtype=torch.bool, device=keep_idx.device)
        inner = cu[1:-1]
        starts[inner[inner < total]] = True
        if bool((bad & ~starts[1:]).any()):
            raise ValueError("keep_idx must be strictly increasing (sorted, unique) within each image")


def _validate(images, weight, bias, patch_size, pos_embed, keep_idx, cu_seqlens, check_dtype: bool):
    _checks.tensor("images", images, ndim=4, dtypes=FLOAT_DTYPES)
    p = _checks.positive_int("patch_size", patch_size)
    B, C, H, W = images.shape
    if H == 0 or W == 0:
        raise ValueError(f"images has spatial size (H, W) = {(H, W)}: no patches to embed")
    if H % p or W % p:
        raise ValueError(f"patch_size {p} must divide the image size (H, W) = {(H, W)}")
    _checks.tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES)
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be a square conv kernel (D, C, p0, p0), got shape {tuple(weight.shape)}")
    if weight.shape[1] != C:
        raise ValueError(f"weight has {weight.shape[1]} input channels but images has {C} channels")
    _same("weight", weight, images, check_dtype)
    D = weight.shape[0]
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=FLOAT_DTYPES)
        if tuple(bias.shape) != (D,):
            raise ValueError(f"bias must have shape ({D},) (one value per output channel), got {tuple(bias.shape)}")
        _same("bias", bias, images, check_dtype)
    if pos_embed is not None:
        _checks.tensor("pos_embed", pos_embed, ndim=3, dtypes=FLOAT_DTYPES)
        L = pos_embed.shape[1]
        g0 = math.isqrt(L)
        if pos_embed.shape[0] != 1 or g0 * g0 != L or L == 0 or pos_embed.shape[2] != D:
            raise ValueError(f"pos_embed must have shape (1, g0*g0, {D}) (square grid, no prefix tokens), "
                             f"got {tuple(pos_embed.shape)}")
        _same("pos_embed", pos_embed, images, check_dtype)
    if (keep_idx is None) != (cu_seqlens is None):
        raise ValueError("keep_idx and cu_seqlens must be given together (or neither)")
    if keep_idx is not None:
        keep_idx = _checks.index_tensor("keep_idx", keep_idx, dtypes=INDEX_DTYPES, device=images.device)
        cu_seqlens = _checks.index_tensor("cu_seqlens", cu_seqlens, dtypes=INDEX_DTYPES, device=images.device)
        if cu_seqlens.shape[0] != B + 1:
            raise ValueError(f"cu_seqlens must have B+1 = {B + 1} entries, got {cu_seqlens.shape[0]}")
        if not torch.compiler.is_compiling() and (
                images.device.type == "cpu" or os.environ.get("EFFKERN_DEBUG", "0") == "1"):
            _check_indices(keep_idx, cu_seqlens, (H // p) * (W // p))
    return p, keep_idx, cu_seqlens


# ---------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------

def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], patch_size: int,
                pos_embed: Optional[torch.Tensor] = None, keep_idx: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch-embed ``images`` at ``patch_size`` with a timm PatchEmbed weight, keeping only ``keep_idx``.

    images (B, C, H, W) float; weight (D, C, p0, p0) (PI-resized to p x p like
    timm.layers.resample_patch_embed); bias (D,) or None; pos_embed (1, g0*g0, D)
    or None (resampled to (H/p, W/p) like timm.layers.resample_abs_pos_embed).
    keep_idx (total,) int64/int32 row-major patch indices, sorted within each
    image, with cu_seqlens (B+1,) int32 (see effkern.ops.sample_keep): returns
    (total, D) packed; without them (B, N, D), N = (H/p)*(W/p).
    Differentiable in images, weight, bias and pos_embed.  Under torch.autocast
    every input is cast to the autocast dtype (the resizes run in fp32 first).
    """
    device_type = images.device.type if isinstance(images, torch.Tensor) else "cpu"
    # like torch's autocast for conv/linear: float64 inputs are left alone
    amp = (device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
           and isinstance(images, torch.Tensor) and images.dtype != torch.float64)
    p, keep_idx, cu_seqlens = _validate(images, weight, bias, patch_size, pos_embed, keep_idx, cu_seqlens,
                                        check_dtype=not amp)
    B, C, H, W = images.shape
    gh, gw = H // p, W // p
    n = gh * gw
    # autocast exists for cpu/cuda only; meta (shape inference) and other devices run as is
    no_autocast = (torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda")
                   else contextlib.nullcontext())
    with no_autocast:
        w2d = _ref.resize_weight(weight, p)
        pos = None if pos_embed is None else resize_pos_embed(pos_embed, (gh, gw))
        if amp:
            dt = torch.get_autocast_dtype(device_type)
            images, w2d = images.to(dt), w2d.to(dt)
            bias = None if bias is None else bias.to(dt)
            pos = None if pos is None else pos.to(dt)
        index = None if keep_idx is None else _ref.flat_index(keep_idx, cu_seqlens, n)
        out = torch.ops.effkern.patch_embed_fwd(images, w2d, bias, pos, index, p)
    return out if index is not None else out.reshape(B, n, w2d.shape[0])
