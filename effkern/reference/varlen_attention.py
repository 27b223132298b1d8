"""Ragged attention in plain PyTorch: the ``reference`` backend (and the CPU path).

Same contract as effkern/kernels/varlen_attention.py: q, k, v (total, H, D), cu_seqlens
int32 (B+1,), non-causal softmax attention inside each sequence; lse (H, total) is the
natural-log logsumexp of the scaled scores (float64 for float64 inputs, else float32).

Sequences of equal length form one (n, H, L, D) batch, so nothing of size
total x total is ever built and the work is exactly the real tokens' (no padding).
When each distinct length occupies ONE contiguous run of sequences (all lengths
equal -- keep None or a ratio -- or views packed view-major by forward_views), every
run is a zero-copy strided view of the packed tensors: (n*L, H, D) -> (n, L, H, D)
-> transposed to (n, H, L, D), which ATen's CPU kernel reads in place, and results
are written back with one slice copy.  Otherwise (per-sample ragged lengths) the
sequences of one length are gathered by index and scattered back.  On CPU each batch runs ATen's fused CPU attention
(aten._scaled_dot_product_flash_attention_for_cpu[_backward]: exact fp32/fp64
arithmetic, returns the logsumexp); elsewhere, or if that private op is missing,
plain batched matmuls + softmax.  fp16/bf16 are computed in float32.  Reads cu_seqlens on
the host (a sync on CUDA: this path is for CPU, tests and debugging).

NaN and inf propagate as in torch's math attention path (a NaN in q[t] makes out[t]
NaN; a NaN in k[s] or v[s] reaches every row of s's sequence).  ATen's fused CPU
forward differs in one case only -- it turns a query row holding a NaN into zeros
(NaN / inf in k or v and inf in q give the math path's pattern) -- so the forward
sums q once (NaN and inf propagate into the sum; a single read, no temporaries) and
a q that is not all finite takes the plain-matmul path.  Given the same out and lse,
the fused backward propagates NaN / inf like the math path for bad q, k, v, out or
dout, so the backward needs no test (tests/test_varlen_attention.py and
tests/test_bad_input.py hold both claims to the oracle).
"""

from __future__ import annotations

import functools

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return _compute_dtype(dtype)


_CHUNK_ELEMENTS = 1 << 25  # bound on n * heads * L * L score elements per batched matmul


def length_groups(cu_seqlens: torch.Tensor, heads: int):
    """Yield (length, start offsets (n,) CPU int64) per distinct non-zero length, in
    increasing length and, inside a length, in sequence order; split into chunks whose
    (n, heads, length, length) score tensor stays below _CHUNK_ELEMENTS."""
    cu = cu_seqlens.to("cpu", torch.int64)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        s = starts[lengths == length]
        yield from ((length, c) for c in s.split(max(1, _CHUNK_ELEMENTS // (heads * length * length))))


def _groups(cu_seqlens: torch.Tensor, device: torch.device, heads: int):
    """Yield (length, index (n, length) long tensor) per chunk of :func:`length_groups`."""
    for length, chunk in length_groups(cu_seqlens, heads):
        yield length, (chunk[:, None] + torch.arange(length)[None, :]).to(device)


def _gather(x: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(total, H, D)[idx (n, L)] -> (n, H, L, D) in ``dtype``."""
    return x[idx].to(dtype).permute(0, 2, 1, 3)


def _scatter(dst: torch.Tensor, idx: torch.Tensor, value: torch.Tensor) -> None:
    """dst[idx] = value (n, H, L, D); ``dst`` may be a strided view."""
    dst[idx] = value.permute(0, 2, 1, 3).to(dst.dtype)


def _flash_cpu(x: torch.Tensor):
    """ATen's fused CPU attention (exact fp32/fp64 math, O(L) memory), when present."""
    if x.device.type != "cpu":
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or inf: one sum (float32 for half types), into which
    NaN and inf propagate; an overflow to inf (|values| ~ 1e32 and up) only sends
    finite data to the exact plain-matmul path too."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32 if t.element_size() < 4 else None)))


def contiguous_runs(cu_seqlens: torch.Tensor):
    """((first token, sequences n, length L), ...) of the maximal runs of consecutive
    non-empty sequences of equal length, when every distinct length forms ONE run
    (so there are at most as many runs as lengths); None otherwise (ragged lengths:
    gather by length instead).  Cached by the boundaries' values: every block of a
    forward (and its backward) asks with the same cu_seqlens."""
    return _runs_of(tuple(cu_seqlens.tolist()))


@functools.lru_cache(maxsize=256)
def _runs_of(cu: tuple):
    runs: list[tuple[int, int, int]] = []
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length <= 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        else:
            runs.append((start, 1, length))
    if len({length for _, _, length in runs}) != len(runs):
        return None
    return tuple(runs)


def _run_view(x: torch.Tensor, t0: int, n: int, length: int) -> torch.Tensor:
    """Rows [t0, t0 + n*L) of (total, H, D) as (n, H, L, D), no copy."""
    return x[t0:t0 + n * length].unflatten(0, (n, length)).transpose(1, 2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (ATen's fused CPU attention reads
    the other dims through their strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _group_forward(qg, kg, vg, scale, fused: bool = True):
    """(n, H, L, D) -> out (n, H, L, D), lse (n, H, L)."""
    flash = _flash_cpu(qg) if fused else None
    if flash is not None:  # reads any strides with a unit-stride last dim
        return flash(_unit_last(qg), _unit_last(kg), _unit_last(vg), scale=scale)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale              # (n, H, L, L)
    m = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(s - m), vg), m[..., 0]


def _group_backward(dog, qg, kg, vg, og, lg, scale, fused: bool = True):
    if fused and _flash_cpu(qg) is not None:
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dog, qg, kg, vg, og = (_unit_last(t) for t in (dog, qg, kg, vg, og))
        return bwd(dog, qg, kg, vg, og, lg.contiguous(), 0.0, False, scale=scale)
    p = torch.exp(torch.matmul(qg, kg.transpose(-1, -2)) * scale - lg[..., None])
    delta = (og * dog).sum(-1, keepdim=True)                        # (n, H, L, 1)
    ds = p * (torch.matmul(dog, vg.transpose(-1, -2)) - delta)
    return torch.matmul(ds, kg) * scale, torch.matmul(ds.transpose(-1, -2), qg) * scale, \
        torch.matmul(p.transpose(-1, -2), dog)


def forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, out=None, lse=None):
    """Returns (out (total, H, D), lse (H, total)); fills ``out``/``lse`` when given."""
    total, heads, head_dim = q.shape
    ct = _compute_dtype(q.dtype)
    fused = q.device.type == "cpu" and _flash_cpu(q) is not None and all_finite(q)
    runs = contiguous_runs(cu_seqlens) if fused and q.dtype == ct else None
    lse = torch.empty((heads, total), device=q.device, dtype=ct) if lse is None else lse
    if runs is not None:  # zero-copy views in, one slice copy out
        # one run of equal lengths (keep None / a ratio) and no buffer given: ATen's (n, H, L,
        # D) output is laid out (n, L, H, D) in memory -- exactly (total, H, D): returned as is
        own = out is None and len(runs) == 1 and runs[0][1] * runs[0][2] == total
        if out is None and not own:
            out = torch.empty((total, heads, head_dim), device=q.device, dtype=q.dtype)
        for t0, n, length in runs:
            og, lg = _group_forward(*(_run_view(t, t0, n, length) for t in (q, k, v)), scale, True)
            if own:
                out = og.transpose(1, 2).reshape(total, heads, head_dim)
            else:
                _run_view(out, t0, n, length).copy_(og)
            lse[:, t0:t0 + n * length].unflatten(1, (n, length)).copy_(lg.transpose(0, 1))
        return out, lse
    out = torch.empty((total, heads, head_dim), device=q.device, dtype=q.dtype) if out is None else out
    for _, idx in _groups(cu_seqlens, q.device, heads):
        og, lg = _group_forward(*(_gather(t, idx, ct) for t in (q, k, v)), scale, fused)
        _scatter(out, idx, og)
        lse[:, idx] = lg.permute(1, 0, 2).to(lse.dtype)             # (H, n, L)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float,
             dq=None, dk=None, dv=None):
    """Returns (dq, dk, dv); fills the given buffers (which may be views of one dqkv)."""
    ct = _compute_dtype(q.dtype)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype) if dq is None else dq
    dk = torch.empty(q.shape, device=q.device, dtype=q.dtype) if dk is None else dk
    dv = torch.empty(q.shape, device=q.device, dtype=q.dtype) if dv is None else dv
    fused = q.device.type == "cpu" and _flash_cpu(q) is not None
    runs = contiguous_runs(cu_seqlens) if fused and q.dtype == ct else None
    if runs is not None:  # zero-copy views in, one slice copy per gradient out
        for t0, n, length in runs:
            views = [_run_view(t, t0, n, length) for t in (q, k, v, out, dout)]
            lg = lse[:, t0:t0 + n * length].unflatten(1, (n, length)).transpose(0, 1).to(ct)   # (n, H, L)
            grads = _group_backward(views[4], *views[:4], lg, scale, True)
            for dst, g in zip((dq, dk, dv), grads):
                _run_view(dst, t0, n, length).copy_(g)
        return dq, dk, dv
    for _, idx in _groups(cu_seqlens, q.device, q.shape[1]):
        qg, kg, vg, og, dog = (_gather(t, idx, ct) for t in (q, k, v, out, dout))
        lg = lse[:, idx].permute(1, 0, 2).to(ct).contiguous()          # (n, H, L)
        for dst, g in zip((dq, dk, dv), _group_backward(dog, qg, kg, vg, og, lg, scale, fused)):
            _scatter(dst, idx, g)
    return dq, dk, dv
