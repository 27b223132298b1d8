"""effkern::resize_pos_embed: timm's absolute position-embedding resample as an opaque
op, so that torch.compile can trace it with symbolic image sizes.

    resize_pos_embed(pos (1, g0*g0, D), gh, gw) -> (gh*gw, D)

is ``timm.layers.resample_abs_pos_embed`` without prefix tokens (bicubic,
antialias=True, align_corners=False, in float32 -- float64 for float64 -- and cast
back; effkern.reference.patch_embed.resize_pos).  Called directly, PyTorch's
antialiased bicubic resize has no backward for symbolic sizes: under
``torch.compile(dynamic=True)`` -- and under the default automatic dynamic shapes,
once a second image size is seen -- tracing the packed ViT failed at the second
resolution (an internal assert in the upsample backward).  As a custom op with
SymInt sizes, a fake kernel and its own backward op, the resize is opaque to the
tracer and runs eagerly with real sizes.  The resize is linear, out = R pos with
R (gh*gw, g0*g0) the interpolation of the basis images; the backward is R^T grad
(R cached per sizes, device and dtype).  Double backward through it is not
supported: it raises a RuntimeError.
"""

from __future__ import annotations

import torch

from effkern.ops._registration import PT2_COMPLIANT, forbid_double_backward
from effkern.reference import patch_embed as _ref

_lib = torch.library.Library("effkern", "FRAGMENT")
_lib.define("resize_pos_embed(Tensor pos, SymInt gh, SymInt gw) -> Tensor", tags=PT2_COMPLIANT)
_lib.define("resize_pos_embed_backward(Tensor grad, Tensor pos, SymInt gh, SymInt gw) -> Tensor",
            tags=PT2_COMPLIANT)


def _forward(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    return _ref.resize_pos(pos, (int(gh), int(gw))).clone()


_MATRICES: dict = {}


def _resize_matrix(g0: int, gh: int, gw: int, device, dtype) -> torch.Tensor:
    """R (gh*gw, g0*g0): the resize is linear, out = R @ pos; column i is the resized
    i-th basis image.  Built in float64, cached per (g0, gh, gw, device, dtype)."""
    key = (g0, gh, gw, torch.device(device), dtype)
    mat = _MATRICES.get(key)
    if mat is None:
        mat = _ref.resize_matrix64(g0, gh, gw).to(device=device, dtype=dtype).contiguous()
        _MATRICES[key] = mat
    return mat


def _backward_impl(grad: torch.Tensor, pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    _, L, D = pos.shape
    g0 = int(round(L ** 0.5))
    dtype = _ref._intermediate_dtype(pos.dtype)
    R = _resize_matrix(g0, int(gh), int(gw), pos.device, dtype)
    return (R.t() @ grad.to(dtype).reshape(int(gh) * int(gw), D)).reshape(1, L, D).to(pos.dtype)


_lib.impl("resize_pos_embed", _forward, "CompositeExplicitAutograd")
_lib.impl("resize_pos_embed_backward", _backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("effkern::resize_pos_embed")
def _forward_fake(pos, gh, gw):
    return pos.new_empty((gh * gw, pos.shape[2]))


@torch.library.register_fake("effkern::resize_pos_embed_backward")
def _backward_fake(grad, pos, gh, gw):
    return pos.new_empty(pos.shape)


def _setup_context(ctx, inputs, output):
    pos, gh, gw = inputs
    ctx.gh, ctx.gw = gh, gw
    ctx.save_for_backward(pos)


def _backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    return torch.ops.effkern.resize_pos_embed_backward(grad.contiguous(), pos, ctx.gh, ctx.gw), None, None


torch.library.register_autograd("effkern::resize_pos_embed", _backward, setup_context=_setup_context)
forbid_double_backward("resize_pos_embed", "resize_pos_embed_backward")


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, g0*g0, D) -> (gh*gw, D); the identity reshape when the grid already matches."""
    _, L, D = pos_embed.shape
    g0 = int(round(L ** 0.5))
    gh, gw = grid
    if (g0, g0) == (gh, gw):
        return pos_embed.reshape(L, D)
    return torch.ops.effkern.resize_pos_embed(pos_embed, gh, gw)
