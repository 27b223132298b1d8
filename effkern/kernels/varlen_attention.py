"""Ragged (packed) softmax attention in Triton: forward and non-causal backward.

What
----
For every sequence b (tokens cu_seqlens[b] .. cu_seqlens[b+1]-1) and head h:

    O   = softmax(scale * Q K^T) V                      (no mask inside a sequence)
    LSE = logsumexp(scale * Q K^T, dim=-1)              (natural log, saved for backward)

Backward (P = exp(scale Q K^T - LSE), Delta = rowsum(dO * O)):

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q

Layout
------
q, k, v, o, do, dq, dk, dv: (total, heads, head_dim) with any token/head strides and
unit stride on head_dim -- so the three (total, H, D) views of a timm-style packed
qkv (total, 3, H, D) are read in place and dq/dk/dv are written straight into one
(total, 3, H, D) dqkv buffer.  lse and delta: (heads, total) float32, contiguous.
cu_seqlens: int32 (B+1,).  Nothing is padded: a program finds its sequence's token
range in cu_seqlens and masks the tail of its last block.

Tiling
------
Grid = (cdiv(max_seqlen, BLOCK), heads, B): one program per (row block, head,
sequence); programs whose block starts past their sequence's end exit at once,
so the padding cost is only in the (cheap) grid, never in memory.
  forward   one query block, loops over the key blocks of its sequence with the
            online softmax in base 2 (exp2, scale folded with log2(e)).
  preprocess  Delta = rowsum(dO * O), one block of tokens per program.
  dK/dV     one key block, loops over the query blocks of the same sequence,
            recomputing P^T from LSE; dK and dV stay in registers.
  dQ        one query block, loops over the key blocks.
Each output element is written by exactly one program: no atomics, deterministic.
head_dim that is not a power of two (80, 96) is padded to BLOCK_D = next_pow2 in
registers only (masked loads/stores).  fp32 inputs use IEEE fp32 dots (no tf32)
so that fp32 results match a float64 oracle to ~1e-6, also in the interpreter.

Block sizes are autotuned per (head_dim, power-of-two bucket of max_seqlen, dtype);
under TRITON_INTERPRET=1 one small config is used (autotuning in the interpreter
is slow and meaningless).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effkern.backend import triton_interpret

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _configs(pairs, warps=(4, 8), stages=(2, 3)):
    if triton_interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in pairs for w in warps for s in stages]


# ViT sequences are short (50-600 tokens): small query blocks keep enough programs
# in flight; long sequences prefer the large ones.
_FWD_CONFIGS = _configs([(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)])
_DKDV_CONFIGS = _configs([(32, 32), (32, 64), (64, 64), (32, 128), (64, 128)])
_DQ_CONFIGS = _configs([(32, 32), (64, 32), (64, 64), (128, 32), (128, 64)])
_KEY = ["HEAD_DIM", "SEQ_BUCKET"]


@triton.jit
def _sequence(CU, b):
    """(first packed row, length) of sequence b."""
    start = tl.load(CU + b)
    return start, tl.load(CU + b + 1) - start


@triton.jit
def _load_tile(ptr, rows, s_row, h, s_head, offs_d, mask):
    """The (rows x head_dim) tile of a (total, heads, head_dim) tensor at head h; 0 where masked."""
    return tl.load(ptr + rows[:, None] * s_row + h * s_head + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, rows, s_row, h, s_head, offs_d, value, mask):
    tl.store(ptr + rows[:, None] * s_row + h * s_head + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats(LSE, DELTA, h, total, rows, mask):
    """Per query row: the forward's log-sum-exp in log2 units and delta = rowsum(O * dO)."""
    lse2 = tl.load(LSE + h * total + rows, mask=mask, other=0.0) * 1.4426950408889634
    return lse2, tl.load(DELTA + h * total + rows, mask=mask, other=0.0)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU,
                sqt, sqh, skt, skh, svt, svh, sot, soh, total,
                qk_scale, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start, seqlen = _sequence(CU, b)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM
    rows = (start + offs_m).to(tl.int64)
    q = _load_tile(Q, rows, sqt, h, sqh, offs_d, mask_m[:, None] & mask_d[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        keys = (start + cols).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_tile(K, keys, skt, h, skh, offs_d, kv_mask)
        v = _load_tile(V, keys, svt, h, svh, offs_d, kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))       # finite: every block has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    _store_tile(O, rows, sot, h, soh, offs_d, acc, mask_m[:, None] & mask_d[None, :])
    # natural-log LSE of the *unscaled-by-log2e* scores: (m + log2 l) * ln 2
    tl.store(LSE + h * total + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, sot, soh, sdt, sdh, total,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    r64 = rows.to(tl.int64)
    o = _load_tile(O, r64, sot, h, soh, offs_d, mask)
    do = _load_tile(DO, r64, sdt, h, sdh, offs_d, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * total + r64, delta, mask=rows < total)


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU,
                     sqt, sqh, skt, skh, svt, svh, sdot, sdoh,
                     sdkt, sdkh, sdvt, sdvh, total,
                     sm_scale, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start, seqlen = _sequence(CU, b)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen
    mask_d = offs_d < HEAD_DIM
    keys = (start + offs_n).to(tl.int64)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = _load_tile(K, keys, skt, h, skh, offs_d, kv_mask)
    v = _load_tile(V, keys, svt, h, svh, offs_d, kv_mask)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows_i = start_m + offs_m
        mask_m = rows_i < seqlen
        rows = (start + rows_i).to(tl.int64)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = _load_tile(Q, rows, sqt, h, sqh, offs_d, q_mask)
        do = _load_tile(DO, rows, sdot, h, sdoh, offs_d, q_mask)
        lse2, delta = _row_stats(LSE, DELTA, h, total, rows, mask_m)
        # transposed scores: (BLOCK_N keys) x (BLOCK_M queries)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.exp2(st - lse2[None, :])
        pt = tl.where(mask_m[None, :] & mask_n[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)

    dk = dk * sm_scale
    _store_tile(DK, keys, sdkt, h, sdkh, offs_d, dk, kv_mask)
    _store_tile(DV, keys, sdvt, h, sdvh, offs_d, dv, kv_mask)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU,
                   sqt, sqh, skt, skh, svt, svh, sdot, sdoh, sdqt, sdqh, total,
                   sm_scale, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start, seqlen = _sequence(CU, b)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < HEAD_DIM
    rows = (start + offs_m).to(tl.int64)
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = _load_tile(Q, rows, sqt, h, sqh, offs_d, q_mask)
    do = _load_tile(DO, rows, sdot, h, sdoh, offs_d, q_mask)
    lse2, delta = _row_stats(LSE, DELTA, h, total, rows, mask_m)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seqlen
        keys = (start + cols).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_tile(K, keys, skt, h, skh, offs_d, kv_mask)
        v = _load_tile(V, keys, svt, h, svh, offs_d, kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq = dq * sm_scale
    _store_tile(DQ, rows, sdqt, h, sdqh, offs_d, dq, q_mask)


# --------------------------------------------------------------------------- launchers

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, max_seqlen):
    head_dim = q.shape[-1]
    return dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                DOT_PREC="ieee" if q.dtype == torch.float32 else None,  # None: the default (tensor cores)
                SEQ_BUCKET=triton.next_power_of_2(max(int(max_seqlen), 16)))


def forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float, out, lse) -> None:
    """Fill ``out`` (total, H, D) and ``lse`` (H, total) float32.  q/k/v/out may be
    strided views (unit stride on head_dim)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    total, heads, _ = q.shape
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    _fwd_kernel[grid](q, k, v, out, lse, cu_seqlens,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), total, scale * LOG2E, **_common(q, max_seqlen))


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, dq, dk, dv) -> None:
    """Fill dq, dk, dv (each (total, H, D), possibly views into one dqkv buffer)."""
    dout, q, k, v, out = (_unit_last(t) for t in (dout, q, k, v, out))
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if total == 0:
        return
    if batch == 0 or max_seqlen <= 0:  # no sequence covers a token: impossible when total > 0
        return
    delta = torch.empty((heads, total), device=q.device, dtype=torch.float32)
    block_t = 16 if triton_interpret() else 64
    _bwd_preprocess_kernel[(triton.cdiv(total, block_t), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=block_t)
    common = _common(q, max_seqlen)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    grid_n = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), heads, batch)  # noqa: E731
    _bwd_dkdv_kernel[grid_n](q, k, v, dout, dk, dv, lse, delta, cu_seqlens, *strides,
                             dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), total,
                             scale, **common)
    grid_m = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    _bwd_dq_kernel[grid_m](q, k, v, dout, dq, lse, delta, cu_seqlens, *strides,
                           dq.stride(0), dq.stride(1), total, scale, **common)
