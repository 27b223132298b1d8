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
Any head_dim from 8 to 256 runs: it is padded to BLOCK_D = max(16, next_pow2(head_dim))
in registers only (masked loads/stores; 16 is tl.dot's smallest K).  fp32 inputs use
IEEE fp32 dots (no tf32) so that fp32 results match a float64 oracle to ~1e-6, also in
the interpreter.

Block sizes are autotuned per (head_dim, power-of-two bucket of max_seqlen, dtype)
over per-architecture lists (_TILES, through effkern/kernels/_autotune.py): on sm_90
only tiles whose dots lower to wgmma, on both sm_90 and sm_80 only tiles that compile
without spilling for the launch's BLOCK_D (checked by `effkern doctor --compile-gpu`).
Under TRITON_INTERPRET=1 one small config is used (autotuning in the interpreter is
slow and meaningless).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effkern.backend import triton_interpret
from effkern.kernels._autotune import autotune, config

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256  # any head_dim in between: padded to BLOCK_D inside the kernel
SUPPORTED_HEAD_DIMS = range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1)  # what effkern.ops sends to these launchers


def block_d(head_dim: int) -> int:
    """The padded head_dim tile: the next power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, triton.next_power_of_2(int(head_dim)))


_KEY = ["HEAD_DIM", "SEQ_BUCKET"]
_INTERPRET = config(num_warps=1, num_stages=1, BLOCK_M=16, BLOCK_N=16)


def _tiles(arch: int, args: dict, kind: str) -> list:
    """Autotune candidates (BLOCK_M, BLOCK_N, warps, stages) of one kernel: see "Tiling"."""
    d, tensor_cores = args["BLOCK_D"], args["DOT_PREC"] is None
    table = _TILES[(kind, "tc" if tensor_cores else "ieee", 90 if arch >= 90 else 80)]
    return [config(num_warps=w, num_stages=s, BLOCK_M=m, BLOCK_N=n)
            for (m, n, w, s, max_d) in table if d <= max_d]


def _fwd_configs(arch, args):
    return _tiles(arch, args, "fwd")


def _dkdv_configs(arch, args):
    return _tiles(arch, args, "dkdv")


def _dq_configs(arch, args):
    return _tiles(arch, args, "dq")


# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest BLOCK_D the tile serves without spilling).
# Checked by effkern.tools.gpu_compile (benchmarks/results/gpu_compile_full.md): each tile
# compiles for its architecture with no spill and within shared memory for every BLOCK_D
# up to its bound; on sm_90 every 16-bit dot is a wgmma (dot M = BLOCK_M in fwd/dQ and
# BLOCK_N in dK/dV, so that one is >= 64).  ViT sequences are 50-600 tokens: 64-row
# tiles with 8 warps rather than 32-row tiles keep programs small without leaving wgmma.
_TILES = {
    ("fwd", "tc", 90): [(64, 32, 4, 3, 128), (64, 64, 4, 3, 128), (64, 32, 8, 2, 256), (64, 64, 8, 2, 256),
                        (128, 32, 8, 2, 256), (128, 64, 8, 3, 128)],
    ("dkdv", "tc", 90): [(32, 64, 4, 2, 64), (64, 64, 4, 2, 64), (64, 128, 8, 2, 64), (64, 64, 8, 2, 128),
                         (32, 128, 8, 2, 128), (32, 64, 8, 2, 256)],
    ("dq", "tc", 90): [(64, 32, 4, 2, 128), (64, 64, 4, 2, 128), (64, 32, 8, 2, 256), (64, 64, 8, 2, 256),
                       (128, 32, 8, 2, 256), (128, 64, 8, 2, 128)],
    ("fwd", "tc", 80): [(32, 32, 4, 2, 256), (32, 64, 4, 2, 256), (64, 32, 4, 2, 128), (64, 64, 4, 2, 64),
                        (64, 64, 8, 2, 256), (128, 32, 8, 2, 128), (128, 64, 8, 2, 64)],
    ("dkdv", "tc", 80): [(32, 32, 4, 2, 128), (32, 64, 4, 2, 64), (32, 32, 8, 2, 256), (64, 32, 8, 2, 256),
                         (32, 64, 8, 2, 128), (64, 64, 8, 2, 128)],
    ("dq", "tc", 80): [(32, 32, 4, 2, 256), (32, 64, 4, 2, 256), (64, 64, 4, 2, 64), (64, 32, 8, 2, 256),
                       (64, 64, 8, 2, 128), (128, 32, 8, 2, 128)],
}
# IEEE fp32 dots run on CUDA cores (FMA), which hold whole tiles in registers: 32-row
# tiles up to BLOCK_D 128 and 16x16 tiles for BLOCK_D 256; the same on both architectures.
_IEEE = {"fwd": [(32, 32, 4, 1, 64), (32, 32, 8, 1, 64), (64, 32, 8, 1, 64), (32, 64, 8, 1, 128),
                 (16, 16, 4, 1, 256)],
         "dkdv": [(32, 32, 4, 1, 64), (32, 32, 8, 1, 128), (16, 16, 8, 1, 256)],  # 16x16 w4 spills 56 B
         "dq": [(32, 32, 4, 1, 64), (64, 32, 8, 1, 64), (32, 32, 8, 1, 64), (32, 64, 8, 1, 128),
                (16, 16, 4, 1, 256)]}  # dq 32x32 w8 spills 24 B at BLOCK_D 128 on sm_80
for _kind, _table in _IEEE.items():
    for _arch in (90, 80):
        _TILES[(_kind, "ieee", _arch)] = _table


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


@autotune(_fwd_configs, key=_KEY, interpret=_INTERPRET)
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


@autotune(_dkdv_configs, key=_KEY, interpret=_INTERPRET)
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


@autotune(_dq_configs, key=_KEY, interpret=_INTERPRET)
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

def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(q, max_seqlen):
    head_dim = q.shape[-1]
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim),
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
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_T=block_t)
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
