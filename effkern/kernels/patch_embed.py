"""Triton kernels of ``effkern.ops.patch_embed``: patch embedding fused with
ragged token dropout (gather-GEMM forward) and its weight gradient.

What
----
Forward, for T tokens with flat patch indices g[t] = b*N + n (or g[t] = t when
every patch is kept):

    out[t, d] = sum_k P[t, k] * W[d, k] + bias[d] + pos[n, d]          (T, D)
    P[t, (c*p + i)*p + j] = images[b, c, gy*p + i, gx*p + j],  n = gy*gw + gx

and the weight gradient dW[d, k] = sum_t dY[t, d] * P[t, k]            (D, K).
K = C*p*p in the conv's (c, i, j) order, so W is the (already resized) conv
weight viewed as (D, C*p*p).  The patch matrix P is never written to memory:
each K tile of it is loaded straight from the image (an im2col of the kept
patches only), so the dropped patches cost nothing and the image is read
about once per N block (L2-resident across the N blocks of a group).

Layout
------
images (B, C, H, W) any strides; weight (D, K) any strides; bias (D,);
pos (N, D) (the resampled position embedding, N = gh*gw); index (T,) int64;
out (T, D) contiguous, packed in token order (= the caller's cu_seqlens order).

Why this tiling
---------------
Forward: one program per (BLOCK_M tokens, BLOCK_N of D), a plain GEMM K loop.
Token -> (b, gy, gx) is decoded once per program (row offsets), the K index ->
(c, i, j) once per K step (column offsets): the A tile address is a sum of a
row and a column offset, the same as a strided GEMM with a gathered row
pointer.  Programs are ordered in GROUP_M groups along M so the N blocks of
the same tokens run together and reuse the gathered image rows from L2.
The epilogue adds bias and the pos row of each token and stores once.
dW: one program per (BLOCK_N of D, BLOCK_K of K) output tile, reducing over the
tokens in BLOCK_M steps (dY^T tile x re-gathered patch tile).  D*K tiles are
few for a ViT (768x768 -> 144 tiles of 64x64), so the token range is split in
SPLIT slices written to a float32 workspace and summed by the launcher.

fp32/f64 inputs use ``input_precision="ieee"`` (exact in the interpreter; on
CUDA fp32 uses tf32 only when torch.backends.cuda.matmul.allow_tf32 is set,
like torch.matmul).  bf16/fp16 accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effkern.backend import triton_interpret
from effkern.kernels._autotune import autotune, config

# ---------------------------------------------------------------------------
# configs: per architecture (effkern/kernels/_autotune.py); the sweep in
# benchmarks/results/gpu_compile_full.md shows each compiles without spilling.
# ---------------------------------------------------------------------------

_KEY = ["D", "K", "P", "HAS_IDX"]  # not T: ragged batches change it every step (no retuning)


def _dot_kind(args: dict) -> str:
    """tc: 16-bit inputs (tensor cores); tf32: fp32 with tf32 allowed; ieee: fp32/fp64 on CUDA cores."""
    if args["img_ptr"].dtype in (torch.float16, torch.bfloat16):
        return "tc"
    return "tf32" if args["PRECISION"] == "tf32" else "ieee"


def _fwd_configs(arch: int, args: dict) -> list:
    return [config(num_warps=w, num_stages=s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8)
            for (m, n, k, w, s) in _FWD_TILES[(_dot_kind(args), 90 if arch >= 90 else 80)]]


def _dw_configs(arch: int, args: dict) -> list:
    return [config(num_warps=w, num_stages=s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
            for (m, n, k, w, s) in _DW_TILES[(_dot_kind(args), 90 if arch >= 90 else 80)]]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).  Tensor-core lists: every dot M
# (BLOCK_M forward, BLOCK_N = the D tile in dW) >= 64, so sm_90 lowers them to wgmma;
# 128x256 tiles are out (255 registers and a spill on sm_90).  IEEE fp32 (CUDA cores):
# 32-deep K steps and at most 64x64 outputs per program.  tf32 (fp32 with
# torch.backends.cuda.matmul.allow_tf32) uses the tensor-core tiles with 32-deep K steps.
# Out after the sm_80 sweep (12 B spills each): fp32 32x64 with 4 warps, tf32 64x128 with 4 warps.
_FWD_TILES = {}
_DW_TILES = {}
for _arch in (90, 80):
    _FWD_TILES[("tc", _arch)] = [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                                 (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]
    _FWD_TILES[("tf32", _arch)] = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)]
    _FWD_TILES[("ieee", _arch)] = [(32, 32, 32, 4, 2), (64, 32, 32, 4, 2), (64, 64, 32, 8, 2)]
    _DW_TILES[("tc", _arch)] = [(64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
                                (32, 64, 64, 4, 4)]
    _DW_TILES[("tf32", _arch)] = [(32, 128, 64, 8, 3), (32, 64, 64, 4, 3), (32, 128, 32, 4, 3)]
    _DW_TILES[("ieee", _arch)] = [(32, 32, 32, 4, 2), (32, 64, 32, 4, 2), (32, 32, 64, 4, 2),
                                  (32, 64, 64, 8, 2)]


@triton.jit
def _token_patches(idx_ptr, offs_m, mask_m, NPATCH, GW, s_ib, s_ih, s_iw,
                   P: tl.constexpr, HAS_IDX: tl.constexpr):
    """Tokens offs_m -> (n: patch index in its image, row_off: image offset of the
    patch's top-left pixel); token t is patch idx[t] (flat b*NPATCH + n), or t."""
    if HAS_IDX:
        g = tl.load(idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        g = offs_m.to(tl.int64)
    b = g // NPATCH
    n = g % NPATCH
    row_off = b * s_ib + ((n // GW) * P) * s_ih + ((n % GW) * P) * s_iw  # int64
    return n, row_off


# ---------------------------------------------------------------------------
# forward: out = gather(images) @ W^T + bias + pos[n]
# ---------------------------------------------------------------------------

@autotune(_fwd_configs, key=_KEY, interpret=config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2))
@triton.jit
def _patch_embed_fwd_kernel(
    img_ptr, w_ptr, bias_ptr, pos_ptr, idx_ptr, out_ptr,
    T, D, K, NPATCH, GW,
    s_ib, s_ic, s_ih, s_iw,
    s_wd, s_wk,
    s_pn, s_pd,
    s_ot, s_od,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_IDX: tl.constexpr,
    ACC_F64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < D
    n, row_off = _token_patches(idx_ptr, offs_m, mask_m, NPATCH, GW, s_ib, s_ih, s_iw, P, HAS_IDX)

    if ACC_F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = offs_k // (P * P)
        r = offs_k % (P * P)
        col_off = c.to(tl.int64) * s_ic + (r // P) * s_ih + (r % P) * s_iw
        a = tl.load(img_ptr + row_off[:, None] + col_off[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * s_wd + offs_k[:, None] * s_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit tl.dot is wrong (triton 3.7); products are exact in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + n[:, None] * s_pn + offs_n[None, :] * s_pd,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc += pos.to(acc.dtype)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * s_ot + offs_n[None, :] * s_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------
# weight gradient: dW[d, k] = sum_t dY[t, d] * P[t, k]
# ---------------------------------------------------------------------------

@autotune(_dw_configs, key=_KEY, interpret=config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
@triton.jit
def _patch_embed_dw_kernel(
    grad_ptr, img_ptr, idx_ptr, out_ptr,
    T, D, K, NPATCH, GW, CHUNK,
    s_gt, s_gd,
    s_ib, s_ic, s_ih, s_iw,
    s_os, s_od, s_ok,
    P: tl.constexpr, HAS_IDX: tl.constexpr,
    ACC_F64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < D
    mask_k = offs_k < K
    c = offs_k // (P * P)
    r = offs_k % (P * P)
    col_off = c.to(tl.int64) * s_ic + (r // P) * s_ih + (r % P) * s_iw  # (BLOCK_K,)

    if ACC_F64:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, T)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        _, row_off = _token_patches(idx_ptr, offs_m, mask_m, NPATCH, GW, s_ib, s_ih, s_iw, P, HAS_IDX)
        dy_t = tl.load(grad_ptr + offs_m[None, :].to(tl.int64) * s_gt + offs_n[:, None] * s_gd,
                       mask=mask_n[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_N, BLOCK_M)
        a = tl.load(img_ptr + row_off[:, None] + col_off[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)   # (BLOCK_M, BLOCK_K)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(dy_t, a, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    out_ptrs = out_ptr + split * s_os + offs_n[:, None] * s_od + offs_k[None, :] * s_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------

def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _empty(shape, device, dtype) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _upcast(dtype: torch.dtype) -> bool:
    return triton_interpret() and dtype in (torch.float16, torch.bfloat16)


def patch_embed_fwd(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    pos: torch.Tensor | None, index: torch.Tensor | None, patch_size: int) -> torch.Tensor:
    """(T, D) = gather(images, index) @ weight^T + bias + pos[index % N].  weight (D, C*p*p)."""
    B, C, H, W = images.shape
    p = int(patch_size)
    gw = W // p
    npatch = (H // p) * gw
    D, K = weight.shape
    T = B * npatch if index is None else index.shape[0]
    out = _empty((T, D), images.device, images.dtype)
    if T == 0 or D == 0:
        return out
    dummy = out
    pos_s = pos.stride() if pos is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)

    _patch_embed_fwd_kernel[grid](
        images, weight, bias if bias is not None else dummy, pos if pos is not None else dummy,
        index if index is not None else dummy, out,
        T, D, K, npatch, gw,
        *images.stride(), *weight.stride(), *pos_s, *out.stride(),
        P=p, HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_IDX=index is not None,
        ACC_F64=images.dtype == torch.float64, PRECISION=_precision(images.dtype, images.device),
        UPCAST=_upcast(images.dtype))
    return out


def _num_splits(T: int, tiles: int, device: torch.device) -> int:
    if triton_interpret() or device.type != "cuda":
        return 1 if T <= 64 else 2  # exercise the split path on small interpreted shapes too
    sms = torch.cuda.get_device_properties(device).multi_processor_count  # pragma: no cover
    want = max(1, (2 * sms + tiles - 1) // max(tiles, 1))  # pragma: no cover
    return int(max(1, min(want, 32, T // 512)))  # pragma: no cover


def patch_embed_bwd_weight(grad: torch.Tensor, images: torch.Tensor, index: torch.Tensor | None,
                           patch_size: int) -> torch.Tensor:
    """dW (D, C*p*p) = grad^T @ gather(images, index), grad (T, D)."""
    B, C, H, W = images.shape
    p = int(patch_size)
    gw = W // p
    npatch = (H // p) * gw
    T, D = grad.shape
    K = C * p * p
    if T == 0:
        return torch.zeros((D, K), device=images.device, dtype=images.dtype)
    acc_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    # split the token range so that (D/128)*(K/128) tiles x split fill the GPU twice over
    tiles = triton.cdiv(D, 128) * triton.cdiv(K, 128)
    split = _num_splits(T, tiles, images.device)
    chunk = triton.cdiv(triton.cdiv(T, split), 64) * 64
    split = triton.cdiv(T, chunk)
    if split == 1 and acc_dtype == images.dtype:
        ws = _empty((1, D, K), images.device, images.dtype)
    else:
        ws = _empty((split, D, K), images.device, acc_dtype)

    def grid(meta):
        return (triton.cdiv(D, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), split)

    _patch_embed_dw_kernel[grid](
        grad, images, index if index is not None else grad, ws,
        T, D, K, npatch, gw, chunk,
        *grad.stride(), *images.stride(), *ws.stride(),
        P=p, HAS_IDX=index is not None,
        ACC_F64=images.dtype == torch.float64, PRECISION=_precision(images.dtype, images.device),
        UPCAST=_upcast(images.dtype))
    return (ws[0] if split == 1 else ws.sum(0)).to(images.dtype)
