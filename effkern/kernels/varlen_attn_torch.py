"""The ``flash`` backend of ``effkern.ops.varlen_attention``: PyTorch's own varlen
FlashAttention-2 (``torch.nn.attention.varlen``, torch >= 2.10) behind effkern's contract.

What
----
The same four launchers' contract as the Triton kernels (effkern/kernels/varlen_attention.py):

    forward(q, k, v, cu_seqlens, max_seqlen, scale, out, lse)      fills out (total, H, D), lse (H, total) fp32
    backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)

q/k/v may be the strided views of a packed qkv (FlashAttention reads any token/head
strides with a unit head_dim stride); dq/dk/dv may be views into one dqkv buffer
(the backward's results are copied into them).  The forward is the public
``varlen_attn(..., return_aux=AuxRequest(lse=True))``; its lse is already
``(heads, total)`` float32 natural-log, effkern's layout.  The backward is
``torch.ops.torch_attn._varlen_attn_backward``, the op ``varlen_attn``'s own
autograd formula calls, given our saved out and lse (no recomputation).

When it applies (``supports``)
------------------------------
CUDA tensors of dtype float16/bfloat16 on compute capability >= 8.0 with head_dim a
multiple of 8 up to 256 (FlashAttention-2's limits), and a torch that has both
ops.  Everything else (fp32, head_dim 12, pre-Ampere GPUs, older torch) runs the
Triton kernels, also when ``flash`` is the selected backend.

Differences from the Triton kernels: FlashAttention-2's backward accumulates dQ
with atomics, so reruns are not bitwise identical (the Triton backward is); the
results are equally close to the float64 oracle.  ``auto`` picks this backend where
it applies: on an H200 it measured as fast as the Triton kernels on full 197-token
ViT-B sequences (forward+backward) and 1.8x faster after token dropout
(docs/ops_attention.md); ``EFFKERN_BACKEND=triton`` gives reproducible backwards.
"""

from __future__ import annotations

import functools

import torch

DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def torch_has_varlen() -> bool:
    """torch.nn.attention.varlen.varlen_attn and its backward op are present (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import AuxRequest, varlen_attn  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops, "torch_attn") and hasattr(torch.ops.torch_attn, "_varlen_attn_backward")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def supports(x: torch.Tensor) -> bool:
    """True when FlashAttention-2 can run this (total, heads, head_dim) tensor."""
    head_dim = x.shape[-1]
    return (x.device.type == "cuda" and x.dtype in DTYPES and head_dim % 8 == 0 and 8 <= head_dim <= 256
            and torch_has_varlen() and _capability(x.device.index or 0) >= (8, 0))


def selected(x: torch.Tensor) -> bool:
    """The backend switch picks ``flash`` for this tensor and FlashAttention-2 can run it."""
    from effkern.backend import select

    return select(x.device, {"flash", "triton", "reference"}) == "flash" and supports(x)


def forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, out, lse) -> None:
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    if q.shape[0] == 0:
        return
    o, l = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                       return_aux=AuxRequest(lse=True), scale=scale)
    out.copy_(o)
    lse.copy_(l if l.shape == lse.shape else l.transpose(0, 1))  # (heads, total) in torch 2.13


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, dq, dk, dv) -> None:
    if q.shape[0] == 0:
        return
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: unused
    grads = torch.ops.torch_attn._varlen_attn_backward(
        dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        False, rng_state, scale, [-1, -1])
    for dst, src in zip((dq, dk, dv), grads):
        dst.copy_(src)
