"""CPU emulation of the fused tensor-core fft_crop kernel (csrc/cuda/fft_crop_tc_kernel.cu).

The kernel was written without a GPU to run it on.  This module repeats its
arithmetic step for step on the CPU, so that the float64 oracle can check the
numerics the GPU will produce:

- the crop matrices in float32 as the plan cache holds them (the half-precision
  paths get them rounded once from float32 to their operand type), the rank-one
  vectors and the per-channel affine of the fused normalisation as the C++
  prepare step makes them;
- stage 1 T = X Lw^T and stage 2 Y = Lh T, each a chain of tensor-core
  instructions in increasing k (wmma k-steps of 8 for TF32, each two SASS
  HMMA.1684 of k = 4; k-steps of 16 for fp16/bf16, one HMMA.16816 each); one
  instruction is modelled as acc = fp32(acc + exact dot product of the rounded
  operands) (the products of tf32/bf16/fp16 operands are exact in float64), rounded
  to nearest (``accumulate="nearest"``, the default) or toward zero
  (``accumulate="toward_zero"``).  Measured on an H200 (2026-12-04): the tensor
  cores' fp32 accumulation lies between the two -- the kernel's distance from the
  round-to-nearest emulation was 0.7-0.8x the round-toward-zero emulation's distance
  on every failing three-pass shape (fp32: 1.4e-6..3.9e-6, uint8 8.8e-6) and 1.0x
  with one TF32 pass (1.2e-5); the nearest model alone is 2e-7..7e-7 from the
  float64 oracle -- the truncating alignment of
  products that tensor cores are known for.  So the two roundings bracket the
  hardware, and tests/test_fft_crop_tensorcore.py checks the kernel against that
  bracket;
- operand rounding: TF32 with cvt.rna (round to nearest, ties away from zero),
  fp16/bf16 round to nearest even;
- fp32 input, three passes per k-step in the kernel's order on split operands
  a = a_hi + a_lo: acc += a_lo b_hi; acc += a_hi b_lo; acc += a_hi b_hi, or one
  pass of a_hi b_hi when torch's CUDA matmul precision is "tf32"
  (``tf32_single_pass=True``);
- uint8 input: x is exact in fp16, so stage 1 runs on fp16 m16n16k16 with Lw split
  into fp16(Lw) + fp16(Lw - fp16(Lw)): acc += x Lw_lo; acc += x Lw_hi; stage 2
  as fp32 (three TF32 passes); with ``tf32_single_pass`` both stages one TF32 pass;
- fp16 / bf16 input: stage 1 in the input dtype (x exact, Lw rounded), T rounded
  to bf16, stage 2 in bf16 (Lh rounded);
- the epilogue in fp32: y = (acc - lu_h[i] s lu_w[j]) * scale[c] + shift[c], then
  the cast to the output dtype.

How rows and columns are split into tiles does not change any rounding (each
output element sees the same k-ordered chain), so ``apply_tensorcore`` models only
the k order.
The rank-one scalar s follows the kernel's SIMT order (per-thread fmaf in staging
order, xor-shuffle butterfly, warps in order).  Assumed, not known: that nvcc
contracts the epilogue's v - (lu_h s) lu_w into one FMA (modelled so); that
differs from two roundings by far less than the mma rounding.

``kernel_walk`` goes further: it executes the kernel's blocking literally -- the
grid of 64-column blocks, the slice loop, shared-memory buffers with the kernel's
leading dimensions and offsets (filled with NaN, so that reading anything the
kernel has not written shows up), each warp's row tiles and fragments, the
staging index arithmetic and the bounds -- with the same per-instruction
arithmetic.  It must agree bit for bit with the vectorised emulation; the tests
check that on shapes that exercise partial blocks, partial fragments and padding.

The kernel handles H and the output height up to 256 (``FUSED_MAX_ROWS``); larger
calls use the SIMT fallback, which this does not emulate.
"""

from __future__ import annotations

import torch

from .fft_crop import crop_axis

FUSED_MAX_ROWS = 256  # kMaxRows in fft_crop_tc_kernel.cu
_THREADS, _WARPS, _BN, _BK = 256, 8, 64, 32  # kThreads, kWarps, kBN, kBK


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest tf32 value (10 mantissa bits), ties away from zero (cvt.rna.tf32.f32)."""
    bits = t.to(torch.float32).contiguous().view(torch.int32)
    # Adding half an ulp of tf32 to the magnitude bits and truncating rounds half away
    # from zero for both signs (the sign bit is untouched for finite inputs).
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32)


def _split_tf32(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = round_tf32(t)
    return hi, round_tf32(t - hi)


def to_float32_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the float32 next to it on the side of zero (round toward zero)."""
    f = x.float()
    past = f.double().abs() > x.abs()  # round-to-nearest went away from zero
    return torch.where(past, torch.nextafter(f, torch.zeros_like(f)), f)


ACCUMULATE = ("nearest", "toward_zero")


def _mma_chain(a_passes, b_passes, k_step: int, k_instr: int, acc=None,
               accumulate: str = "nearest") -> torch.Tensor:
    """fp32 accumulation of sum_p a_p @ b_p as the kernel issues it, onto acc (None: zero).

    For each wmma k-step of k_step (ascending), for each pass p (in order), one
    instruction per k_instr slice (ascending) does acc = fp32(acc + exact dot), the
    rounding to fp32 to nearest or toward zero (``accumulate``).  a_p (..., M, K) and
    b_p (..., K, N) broadcast like torch.matmul and hold operand-rounded values.
    """
    to32 = to_float32_toward_zero if accumulate == "toward_zero" else (lambda t: t.float())
    K = a_passes[0].shape[-1]
    for k0 in range(0, K, k_step):
        for a, b in zip(a_passes, b_passes):
            for ki in range(k0, min(k0 + k_step, K), k_instr):
                k1 = min(ki + k_instr, K)
                dot = a[..., ki:k1].double() @ b[..., ki:k1, :].double()
                acc = to32(dot) if acc is None else to32(acc.double() + dot)
    return acc


# wmma k-step and the k of one SASS instruction: a TF32 m16n16k8 wmma is two
# HMMA.1684 (k = 4) per 16x8 half, an fp16/bf16 m16n16k16 one HMMA.16816 per half.
_K = {"tf32": (8, 4), "fp16": (16, 16), "bf16": (16, 16), "fp16split": (16, 16)}


def _split_fp16(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 b -> (fp16(b), fp16(b - fp16(b))) as float (the subtraction is exact in fp32)."""
    hi = b.to(torch.float16).float()
    return hi, (b - hi).to(torch.float16).float()


def _product(a: torch.Tensor, b: torch.Tensor, op: str, single_pass: bool, accumulate: str) -> torch.Tensor:
    """a @ b as the kernel's mma chain (a is its matrix_a operand); op is 'tf32', 'fp16', 'bf16' or
    'fp16split' (a exact in fp16, b split into two fp16 parts: acc += a b_lo; acc += a b_hi)."""
    k_step, k_instr = _K[op]
    if op == "fp16split":
        a16 = a.to(torch.float16).float()
        b_hi, b_lo = _split_fp16(b)
        return _mma_chain([a16, a16], [b_lo, b_hi], k_step, k_instr, accumulate=accumulate)
    if op == "tf32":
        if single_pass:
            return _mma_chain([round_tf32(a)], [round_tf32(b)], k_step, k_instr, accumulate=accumulate)
        a_hi, a_lo = _split_tf32(a)
        b_hi, b_lo = _split_tf32(b)
        return _mma_chain([a_lo, a_hi, a_hi], [b_hi, b_lo, b_hi], k_step, k_instr, accumulate=accumulate)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[op]
    return _mma_chain([a.to(dtype).float()], [b.to(dtype).float()], k_step, k_instr, accumulate=accumulate)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fmaf(a, b, c): the fp32 product is exact in float64, one rounding at the end."""
    return (a.double() * b.double() + c.double()).float()


def _rank_one_partials(tile: torch.Tensor, weight: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """Each thread's running fmaf over one staged tile, in the kernel's element order.

    tile, weight: (..., rows_pad, 32) fp32 (zero where the kernel stages a zero, which
    adds nothing); element e = r * 32 + c belongs to thread e % 256 and a thread visits
    its elements in increasing e.  partial: (..., 256) fp32.
    """
    flat_v = tile.reshape(*tile.shape[:-2], -1)
    flat_w = weight.reshape(*weight.shape[:-2], -1).expand_as(flat_v)
    for e0 in range(0, flat_v.shape[-1], _THREADS):
        v, w = flat_v[..., e0:e0 + _THREADS], flat_w[..., e0:e0 + _THREADS]
        n = v.shape[-1]
        partial = partial.clone()
        partial[..., :n] = _fma32(v, w, partial[..., :n])
    return partial


def _rank_one_reduce(partial: torch.Tensor) -> torch.Tensor:
    """The kernel's block reduction: xor-shuffle butterfly per warp, then warps 0..7 in order (fp32)."""
    lanes = partial.reshape(*partial.shape[:-1], _THREADS // 32, 32)
    lane = torch.arange(32)
    for off in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[..., lane ^ off]
    total = torch.zeros(partial.shape[:-1], dtype=torch.float32)
    for w in range(_THREADS // 32):
        total = total + lanes[..., w, 0]
    return total


def _rank_one_scalar(xs: torch.Tensor, lv_h: torch.Tensor, lv_w: torch.Tensor) -> torch.Tensor:
    """s = lv_h^T X lv_w per slice (xs (S, Hi, Wi) fp32), summed in the kernel's order."""
    S, hi, wi = xs.shape
    rows_pad = -(-hi // _BK) * _BK
    partial = torch.zeros(S, _THREADS, dtype=torch.float32)
    for k0 in range(0, wi, _BK):
        k1 = min(k0 + _BK, wi)
        tile = torch.zeros(S, rows_pad, _BK)
        tile[:, :hi, :k1 - k0] = xs[:, :, k0:k1]
        weight = torch.zeros(rows_pad, _BK)
        weight[:hi, :k1 - k0] = lv_h[:, None] * lv_w[None, k0:k1]  # fp32 product, as vrow[r] * vcol[gc]
        partial = _rank_one_partials(tile, weight, partial)
    return _rank_one_reduce(partial)


def _epilogue(acc: torch.Tensor, s, lu_h, lu_w, scale, shift, out_dtype) -> torch.Tensor:
    """acc (S, Ho, Wo) fp32 -> out: v = acc - lu_h[i] s lu_w[j] (one fused rounding), then
    fmaf(v, scale[c], shift[c]) and the cast; slices s belong to channel s % C (C = len(scale))."""
    v = acc
    if s is not None:
        t1 = lu_h[None, :, None] * s[:, None, None]  # fp32 product lu_h[i] * s
        v = (acc.double() - t1.double() * lu_w.double()[None, None, :]).float()
    if scale is not None:
        c = scale.shape[0]
        sh = torch.zeros_like(scale) if shift is None else shift
        idx = torch.arange(v.shape[0]) % c
        v = _fma32(v, scale[idx][:, None, None], sh[idx][:, None, None])
    return v.to(out_dtype)


def _axis32(n_in: int, n_out: int, adjoint: bool):
    """(L, lu, lv) in float32 as the plan cache builds them (adjoint: L = Ar^T, lu = v, lv = u)."""
    if adjoint:  # the map n_out -> n_in is the transpose of the crop n_in -> n_out
        ar, u, v = crop_axis(n_in, n_out, torch.float64)
        ar, lu, lv = ar.T, v, u
    else:
        ar, lu, lv = crop_axis(n_in, n_out, torch.float64)
    f = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    return f(ar), f(lu), f(lv)


def apply_tensorcore(x: torch.Tensor, rows, cols, scale, shift, out_dtype: torch.dtype,
                     tf32_single_pass: bool = False, accumulate: str = "nearest") -> torch.Tensor:
    """The kernel's map on x (N, C, Hi, Wi): rows = (Lh, lu_h, lv_h), cols = (Lw, lu_w, lv_w) float32."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    Lh, lu_h, lv_h = rows
    Lw, lu_w, lv_w = cols
    n, c, hi, wi = x.shape
    ho, wo = Lh.shape[0], Lw.shape[0]
    if hi > FUSED_MAX_ROWS or ho > FUSED_MAX_ROWS:
        raise ValueError(f"x: H={hi} and output height {ho} must be <= {FUSED_MAX_ROWS} for the fused kernel")
    if x.dtype in (torch.float16, torch.bfloat16):
        op1, op2 = ("fp16" if x.dtype == torch.float16 else "bf16"), "bf16"
    elif x.dtype == torch.float32 or (x.dtype == torch.uint8 and tf32_single_pass):
        op1 = op2 = "tf32"
    elif x.dtype == torch.uint8:  # x exact in fp16: stage 1 as two fp16 passes on the split Lw
        op1, op2 = "fp16split", "tf32"
    else:
        raise TypeError(f"x: the tensor-core kernel takes float32/float16/bfloat16/uint8, got {x.dtype}")
    xs = x.reshape(n * c, hi, wi).float()  # exact widening of every input dtype
    t = _product(xs, Lw.T, op1, tf32_single_pass, accumulate)
    if op2 == "bf16":
        t = t.to(torch.bfloat16).float()  # T is staged in shared memory as bf16
    y = _product(Lh, t, op2, tf32_single_pass, accumulate)  # stage 2: matrix_a = Lh (all slices), matrix_b = T
    s = _rank_one_scalar(xs, lv_h, lv_w) if lu_h is not None and lu_w is not None else None
    return _epilogue(y, s, lu_h, lu_w, scale, shift, out_dtype).reshape(n, c, ho, wo)


def _affine(x_dtype: torch.dtype, mean, std, channels: int):
    """(scale, shift) float32 as fft_crop_args.cpp's channel_affine computes them."""
    if mean is None:
        return None, None
    inv_std = 1.0 / std.float()
    scale = inv_std * (1.0 / 255.0 if not x_dtype.is_floating_point else 1.0)
    shift = -mean.float() * inv_std
    return scale.reshape(channels), shift.reshape(channels)


def fft_crop_tensorcore(x: torch.Tensor, size, mean=None, std=None, *, tf32_single_pass: bool = False,
                        accumulate: str = "nearest"):
    """fft_crop(x, size, mean, std) as the fused tensor-core kernel computes it (CPU emulation)."""
    h, w = size
    hi, wi = x.shape[-2:]
    scale, shift = _affine(x.dtype, mean, std, x.shape[1])
    out_dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    return apply_tensorcore(x, _axis32(hi, h, False), _axis32(wi, w, False), scale, shift, out_dtype,
                            tf32_single_pass, accumulate)


def fft_crop_backward_tensorcore(grad: torch.Tensor, input_size, std=None, *, tf32_single_pass: bool = False,
                                 accumulate: str = "nearest"):
    """fft_crop_backward(grad, input_size, std): the adjoint of the crop applied to grad / std, emulated."""
    H, W = input_size
    h, w = grad.shape[-2:]
    scale = None if std is None else (1.0 / std.float()).reshape(grad.shape[1])
    return apply_tensorcore(grad, _axis32(H, h, True), _axis32(W, w, True), scale, None, grad.dtype,
                            tf32_single_pass, accumulate)


def _operand(op: str):
    """(k of one wmma step, k of one instruction, row padding of the staged tiles, rounding of a staged value)."""
    if op == "tf32":
        return 8, 4, 4, lambda t: t  # staged as fp32; rounded/split when a fragment is loaded
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp16split": torch.float16}[op]
    return 16, 16, 8, lambda t: t.to(dtype).float()


def kernel_walk(x: torch.Tensor, rows, cols, scale, shift, out_dtype: torch.dtype,
                tf32_single_pass: bool = False) -> torch.Tensor:
    """fft_crop_tc_kernel executed block by block, warp by warp, fragment by fragment (slow).

    Same arguments as ``apply_tensorcore``; the names below are the kernel's.
    """
    Lh, lu_h, lv_h = rows
    Lw, lu_w, lv_w = cols
    n, c, Hi, Wi = x.shape
    Ho, Wo = Lh.shape[0], Lw.shape[0]
    if Hi > FUSED_MAX_ROWS or Ho > FUSED_MAX_ROWS:
        raise ValueError(f"x: H={Hi} and output height {Ho} must be <= {FUSED_MAX_ROWS} for the fused kernel")
    half = x.dtype in (torch.float16, torch.bfloat16)
    split_b = x.dtype == torch.uint8 and not tf32_single_pass
    op1 = ("fp16" if x.dtype == torch.float16 else "bf16") if half else ("fp16split" if split_b else "tf32")
    op2 = "bf16" if half else "tf32"
    k1, ki1, pad1, conv1 = _operand(op1)
    k2, ki2, pad2, conv2 = _operand(op2)
    passes1 = 1 if (half or tf32_single_pass) else (2 if split_b else 3)
    passes2 = 1 if (half or tf32_single_pass) else 3
    lda1, lda2, ldt = _BK + pad1, _BK + pad2, _BN + pad2
    rows1, rows2 = -(-Hi // _BK) * _BK, -(-Ho // 16) * 16
    row_tiles1, row_tiles2 = rows1 // 16, rows2 // 16
    slices = n * c
    xs = x.reshape(slices, Hi, Wi).float()
    lw_src, lh_src = conv1(Lw), conv2(Lh)  # the caller passes the matrices in the operand types
    lw_lo_src = _split_fp16(Lw)[1] if split_b else None
    rank_one = lu_h is not None and lu_w is not None
    y = torch.full((slices, Ho, Wo), float("nan"))
    ranks = torch.full((slices,), float("nan"))

    def stage(buf, ld, src, rows_valid, rows_pad, col0, cols_valid, conv, offset=0):
        """stage_tile: buf[offset + r * ld + c] = conv(src[r, col0 + c]) or 0, r < rows_pad, c < 32."""
        tile = torch.zeros(rows_pad, _BK)
        w = max(0, min(_BK, cols_valid - col0))
        tile[:rows_valid, :w] = src[:rows_valid, col0:col0 + w]
        buf.as_strided((rows_pad, _BK), (ld, 1), offset).copy_(conv(tile))
        return tile

    def load(buf, offset, shape, strides, op, split):
        """load_matrix_sync (+ the TF32 rounding or hi/lo split the kernel applies to the fragment)."""
        f = buf.as_strided(shape, strides, offset).clone()
        if op != "tf32":
            return [f]
        return list(_split_tf32(f)) if split else [round_tf32(f)]

    def warp_mma(acc, a, lda, b, b_off, b_lo_off, ldb, col_major, op, passes, k_step, k_instr, row_tiles, col_frags):
        for warp in range(_WARPS):
            for kk in range(0, _BK, k_step):
                for j in range(2):
                    rt = warp + _WARPS * j
                    if rt >= row_tiles:
                        continue
                    a_f = load(a, rt * 16 * lda + kk, (16, k_step), (lda, 1), op, passes == 3)
                    for f in range(4):
                        if f >= col_frags:
                            continue
                        if col_major:  # element (k, n) at n * ldb + k
                            rel, shape, strides = f * 16 * ldb + kk, (k_step, 16), (1, ldb)
                        else:  # element (k, n) at k * ldb + n
                            rel, shape, strides = kk * ldb + f * 16, (k_step, 16), (ldb, 1)
                        b_f = load(b, b_off + rel, shape, strides, op, passes == 3)
                        if passes == 2:  # B staged split: lo tile at b_lo_off, same layout
                            pa, pb = [a_f[0], a_f[0]], [load(b, b_lo_off + rel, shape, strides, op, False)[0], b_f[0]]
                        elif passes == 3:
                            (a_hi, a_lo), (b_hi, b_lo) = a_f, b_f
                            pa, pb = [a_lo, a_hi, a_hi], [b_hi, b_lo, b_hi]
                        else:
                            pa, pb = a_f[:1], b_f[:1]
                        acc[(warp, j, f)] = _mma_chain(pa, pb, k_step, k_instr, acc[(warp, j, f)])

    for bx in range(-(-Wo // _BN)):
        n0 = bx * _BN
        cols_valid = min(Wo - n0, _BN)
        col_frags = -(-cols_valid // 16)
        # shared memory of this block, never cleared between slices (as on the GPU)
        smem_a = torch.full((max(rows1 * lda1, rows2 * lda2),), float("nan"))
        smem_b = torch.full(((2 if split_b else 1) * _BN * lda1,), float("nan"))  # hi tile, then lo tile
        smem_t = torch.full((rows1 * ldt,), float("nan"))
        for s in range(slices):
            acc1 = {(w, j, f): torch.zeros(16, 16) for w in range(_WARPS) for j in range(2) for f in range(4)}
            partial = torch.zeros(_THREADS)
            for k0 in range(0, Wi, _BK):
                tile = stage(smem_a, lda1, xs[s], Hi, rows1, k0, Wi, conv1)
                if rank_one:
                    weight = torch.zeros(rows1, _BK)
                    kw = min(_BK, Wi - k0)
                    weight[:Hi, :kw] = lv_h[:, None] * lv_w[None, k0:k0 + kw]
                    partial = _rank_one_partials(tile, weight, partial)
                stage(smem_b, lda1, lw_src[n0:], cols_valid, _BN, k0, Wi, conv1)
                if split_b:
                    stage(smem_b, lda1, lw_lo_src[n0:], cols_valid, _BN, k0, Wi, conv1, offset=_BN * lda1)
                warp_mma(acc1, smem_a, lda1, smem_b, 0, _BN * lda1, lda1, True, op1, passes1, k1, ki1, row_tiles1,
                         col_frags)
            for (w, j, f), acc in acc1.items():  # T to shared memory in the stage-2 operand type
                rt = w + _WARPS * j
                if rt < row_tiles1 and f < col_frags:
                    smem_t.as_strided((16, 16), (ldt, 1), rt * 16 * ldt + f * 16).copy_(conv2(acc))
            if rank_one:  # every block of a slice computes the same s
                ranks[s] = _rank_one_reduce(partial[None])[0]
            acc2 = {(w, j, f): torch.zeros(16, 16) for w in range(_WARPS) for j in range(2) for f in range(4)}
            for k0 in range(0, rows1, _BK):
                stage(smem_a, lda2, lh_src, Ho, rows2, k0, Hi, conv2)
                warp_mma(acc2, smem_a, lda2, smem_t, k0 * ldt, None, ldt, False, op2, passes2, k2, ki2, row_tiles2,
                         col_frags)
            for (w, j, f), acc in acc2.items():  # epilogue: rows i = rt*16 + r, columns n0 + f*16 + cc
                rt = w + _WARPS * j
                if rt >= row_tiles2 or f >= col_frags:
                    continue
                i1, j0 = min(16, Ho - rt * 16), n0 + f * 16
                j1 = min(16, Wo - j0)
                if i1 > 0 and j1 > 0:
                    y[s, rt * 16:rt * 16 + i1, j0:j0 + j1] = acc[:i1, :j1]
    return _epilogue(y, ranks if rank_one else None, lu_h, lu_w, scale, shift, out_dtype).reshape(n, c, Ho, Wo)
