"""effkern.ops.varlen_attention: ragged (packed) non-causal softmax attention.

    out[t] = softmax(scale * q[t] . k[s]^T over tokens s of t's sequence) v

Layout: tokens of all sequences concatenated on dim 0, cu_seqlens int32 (B+1,),
max_seqlen a Python int (the caller's bound; used for the launch grid so the op
never syncs).  Docs: docs/ops_attention.md.

Ops (all under torch.ops.effkern, schemas below, defined here in Python):
  varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse)
  varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale) -> (dq, dk, dv)
  varlen_attention_qkvpacked_fwd(qkv, cu_seqlens, max_seqlen, scale) -> (out, lse)
  varlen_attention_qkvpacked_bwd(dout, qkv, out, lse, cu_seqlens, max_seqlen, scale) -> dqkv
lse is (heads, total), natural log, float32 (float64 for float64 inputs); it is
an output of the forward so the backward need not recompute the softmax statistics,
and it is not differentiable.

The ops are opaque custom ops (not ``triton_op``): their CPU kernel needs the
cu_seqlens values (grouping sequences by length), which cannot be traced, and the
CUDA kernel then runs the very launcher that CI exercises under TRITON_INTERPRET=1.
torch.compile(fullgraph=True) sees them as extern calls with fake kernels.

Kernels: Triton effkern/kernels/varlen_attention.py (CUDA; CPU tensors when
EFFKERN_BACKEND=triton and TRITON_INTERPRET=1), PyTorch effkern/reference/varlen_attention.py
(CPU, float64 anywhere, and the ``reference`` backend).
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch

from effkern.backend import select, triton_available
from effkern.kernels import varlen_attn_torch as _flash  # the "flash" backend: torch's FlashAttention-2
from effkern.ops import _checks
from effkern.ops._registration import PT2_COMPLIANT, forbid_double_backward
from effkern.reference import varlen_attention as _ref

HEAD_DIM_RANGE = (8, 256)  # every head_dim in this range, inclusive, on every backend
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

SCHEMAS = {
    "varlen_attention_fwd": "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, "
                            "SymInt max_seqlen, float scale) -> (Tensor, Tensor)",
    "varlen_attention_bwd": "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
                            "Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, float scale) "
                            "-> (Tensor, Tensor, Tensor)",
    "varlen_attention_qkvpacked_fwd": "varlen_attention_qkvpacked_fwd(Tensor qkv, Tensor cu_seqlens, "
                                      "SymInt max_seqlen, float scale) -> (Tensor, Tensor)",
    "varlen_attention_qkvpacked_bwd": "varlen_attention_qkvpacked_bwd(Tensor dout, Tensor qkv, Tensor out, "
                                      "Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, float scale) -> Tensor",
}

_lib = torch.library.Library("effkern", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    if not hasattr(torch.ops.effkern, _name):  # defined once per process
        _lib.define(_schema, tags=PT2_COMPLIANT)


def _debug() -> bool:
    return os.environ.get("EFFKERN_DEBUG", "0") == "1"


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Output buffer; NaN-poisoned under EFFKERN_DEBUG=1 so unwritten elements show."""
    dtype = like.dtype if dtype is None else dtype
    if _debug():
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _use_triton(x: torch.Tensor) -> bool:
    # head dims the Triton launchers do not take run on the reference path
    return (x.dtype in TRITON_DTYPES and triton_available()
            and select(x.device, {"triton", "reference"}) == "triton"
            and x.shape[-1] in _kernels().SUPPORTED_HEAD_DIMS)


def _kernels():
    from effkern.kernels import varlen_attention as kernels

    return kernels


# ------------------------------------------------------------------ implementations

def _launch_args(q, cu_seqlens, max_seqlen):
    """The guard in front of every kernel (Triton or reference), also for direct
    torch.ops.effkern calls: cu_seqlens int32, 1-D, on q's device and contiguous
    (the kernels read it as a dense array); max_seqlen clamped to the token count
    (a looser bound only grows the launch grid, up to a hang for huge values)."""
    cu_seqlens = _checks.index_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), device=q.device)
    return cu_seqlens, max(0, min(int(max_seqlen), q.shape[0]))


def _fwd_into(q, k, v, cu_seqlens, max_seqlen, scale):
    total, heads, head_dim = q.shape
    cu_seqlens, max_seqlen = _launch_args(q, cu_seqlens, max_seqlen)
    flash, triton = _flash.selected(q), _use_triton(q)
    if not (flash or triton or _debug()):
        # the reference allocates: one equal-length run returns ATen's output itself
        return _ref.forward(q, k, v, cu_seqlens, int(max_seqlen), scale)
    out = _alloc((total, heads, head_dim), q)
    lse = _alloc((heads, total), q, _ref.lse_dtype(q.dtype))
    if flash:
        _flash.forward(q, k, v, cu_seqlens, int(max_seqlen), scale, out, lse)
    elif triton:
        _kernels().forward(q, k, v, cu_seqlens, int(max_seqlen), scale, out, lse)
    else:
        _ref.forward(q, k, v, cu_seqlens, int(max_seqlen), scale, out, lse)
    return out, lse


def _bwd_into(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv):
    cu_seqlens, max_seqlen = _launch_args(q, cu_seqlens, max_seqlen)
    if _flash.selected(q):
        _flash.backward(dout, q, k, v, out, lse, cu_seqlens, int(max_seqlen), scale, dq, dk, dv)
    elif _use_triton(q):
        _kernels().backward(dout, q, k, v, out, lse, cu_seqlens, int(max_seqlen), scale, dq, dk, dv)
    else:
        _ref.backward(dout, q, k, v, out, lse, cu_seqlens, int(max_seqlen), scale, dq, dk, dv)


def _fwd_impl(q, k, v, cu_seqlens, max_seqlen, scale):
    return _fwd_into(q, k, v, cu_seqlens, max_seqlen, scale)


def _bwd_impl(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    dq, dk, dv = _alloc(q.shape, q), _alloc(q.shape, q), _alloc(q.shape, q)
    _bwd_into(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)
    return dq, dk, dv


def _packed_fwd_impl(qkv, cu_seqlens, max_seqlen, scale):
    q, k, v = qkv.unbind(1)  # strided views, read in place
    return _fwd_into(q, k, v, cu_seqlens, max_seqlen, scale)


def _packed_bwd_impl(dout, qkv, out, lse, cu_seqlens, max_seqlen, scale):
    dqkv = _alloc(qkv.shape, qkv)
    q, k, v = qkv.unbind(1)
    dq, dk, dv = dqkv.unbind(1)  # the kernels write straight into the packed buffer
    _bwd_into(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)
    return dqkv


for _dev in ("CPU", "CUDA"):
    _lib.impl("varlen_attention_fwd", _fwd_impl, _dev)
    _lib.impl("varlen_attention_bwd", _bwd_impl, _dev)
    _lib.impl("varlen_attention_qkvpacked_fwd", _packed_fwd_impl, _dev)
    _lib.impl("varlen_attention_qkvpacked_bwd", _packed_bwd_impl, _dev)


# ------------------------------------------------------------------ fake kernels

def _fwd_fake_outputs(x, total, heads, head_dim):
    return (x.new_empty((total, heads, head_dim)),
            x.new_empty((heads, total), dtype=_ref.lse_dtype(x.dtype)))


@torch.library.register_fake("effkern::varlen_attention_fwd")
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    return _fwd_fake_outputs(q, *q.shape)


@torch.library.register_fake("effkern::varlen_attention_bwd")
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


@torch.library.register_fake("effkern::varlen_attention_qkvpacked_fwd")
def _packed_fwd_fake(qkv, cu_seqlens, max_seqlen, scale):
    return _fwd_fake_outputs(qkv, qkv.shape[0], qkv.shape[2], qkv.shape[3])


@torch.library.register_fake("effkern::varlen_attention_qkvpacked_bwd")
def _packed_bwd_fake(dout, qkv, out, lse, cu_seqlens, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


# ------------------------------------------------------------------ autograd

def _fwd_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dq, dk, dv = torch.ops.effkern.varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens,
                                                        ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


def _packed_setup(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _packed_backward(ctx, dout, _dlse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    dqkv = torch.ops.effkern.varlen_attention_qkvpacked_bwd(dout, qkv, out, lse, cu_seqlens,
                                                            ctx.max_seqlen, ctx.scale)
    return dqkv, None, None, None


torch.library.register_autograd("effkern::varlen_attention_fwd", _fwd_backward, setup_context=_fwd_setup)
torch.library.register_autograd("effkern::varlen_attention_qkvpacked_fwd", _packed_backward,
                                setup_context=_packed_setup)
forbid_double_backward("varlen_attention", "varlen_attention_bwd", "varlen_attention_qkvpacked_bwd")


# ------------------------------------------------------------------ validation + public API

def _validate_seqlens(cu_seqlens, max_seqlen, total: int, device: torch.device):
    """-> (cu_seqlens made contiguous, max_seqlen clamped to total).  Any strides are
    accepted (the kernels get a contiguous copy); max_seqlen above the token count is
    clamped to it on the host (no sync): a sequence cannot be longer than all tokens."""
    cu_seqlens = _checks.index_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), device=device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have B+1 >= 1 elements (cu_seqlens[0] == 0)")
    max_seqlen = _checks.positive_int("max_seqlen", max_seqlen, minimum=0)
    if torch.compiler.is_compiling():
        return cu_seqlens, max_seqlen  # values are data: not inspectable while tracing
    max_seqlen = min(max_seqlen, int(total))
    if cu_seqlens.device.type != "cpu" and not _debug():
        return cu_seqlens, max_seqlen  # checking values would sync the GPU; EFFKERN_DEBUG=1 enables it
    _check_boundaries(tuple(cu_seqlens.detach().tolist()), int(total), max_seqlen)  # one host read
    return cu_seqlens, max_seqlen


@functools.lru_cache(maxsize=256)
def _check_boundaries(cu: tuple, total: int, max_seqlen: int) -> None:
    """The values of cu_seqlens, checked once per distinct (boundaries, total, max_seqlen):
    every block of a forward asks with the same ones."""
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if lengths and min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1]}) must equal the number of tokens ({total})")
    longest = max(lengths) if lengths else 0
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is smaller than the longest sequence ({longest})")


def _validate_head(name: str, x: torch.Tensor, scale) -> float:
    head_dim = x.shape[-1]
    if x.shape[-2] == 0:
        raise ValueError(f"{name} has 0 heads (shape {tuple(x.shape)}); heads must be >= 1")
    lo, hi = HEAD_DIM_RANGE
    if not lo <= head_dim <= hi:
        raise ValueError(f"{name} has head_dim {head_dim} (last dim); supported head_dim: {lo} to {hi}")
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise _checks.ArgumentTypeError(f"scale must be a finite float or None, got {scale!r}")
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces float module attributes (timm's
        # Attention.scale) symbolically: the value is unknown while tracing (the
        # op's float argument specialises it); eager calls check it.
        return scale
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention inside each packed sequence.

    q, k, v: (total, heads, head_dim), same shape/dtype/device; dtype float16/bfloat16/
    float32/float64; head_dim in 8..256; heads >= 1.  cu_seqlens: int32 (B+1,), any
    strides, 0 = cu_seqlens[0] <= ... <= cu_seqlens[-1] = total (empty sequences allowed).
    max_seqlen: int >= the longest sequence (values above total are clamped to total).
    scale: default head_dim**-0.5.  A NaN in q, k or v propagates (docs/ops_attention.md).
    Returns (total, heads, head_dim) in q's dtype; differentiable in q, k, v.
    """
    _checks.tensor("q", q, ndim=3, dtypes=DTYPES)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=3, device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}: "
                             "q, k, v must all be (total, heads, head_dim)")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    scale = _validate_head("q", q, scale)
    cu_seqlens, max_seqlen = _validate_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device)
    out, _ = torch.ops.effkern.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale)
    return out


def varlen_attention_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                               scale: float | None = None) -> torch.Tensor:
    """varlen_attention on a packed qkv (total, 3, heads, head_dim) -- timm's
    ``qkv(x).reshape(total, 3, heads, head_dim)``.  The backward writes one
    (total, 3, heads, head_dim) gradient (no concatenation).  Returns (total, heads, head_dim).
    """
    _checks.tensor("qkv", qkv, ndim=4, dtypes=DTYPES)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total, 3, heads, head_dim), got shape {tuple(qkv.shape)}")
    scale = _validate_head("qkv", qkv, scale)
    cu_seqlens, max_seqlen = _validate_seqlens(cu_seqlens, max_seqlen, qkv.shape[0], qkv.device)
    out, _ = torch.ops.effkern.varlen_attention_qkvpacked_fwd(qkv, cu_seqlens, max_seqlen, scale)
    return out
