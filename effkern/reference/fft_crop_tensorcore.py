"""CPU emulation of the fused tensor-core fft_crop kernel (csrc/cuda/fft_crop_tc_kernel.cu).

The kernel was written without a GPU to run it on.  This module repeats its
arithmetic step for step on the CPU, so that the float64 oracle can check the
numerics the GPU will produce:

- the crop matrices in float32 (what the kernel reads), the rank-one vectors and
  the per-channel affine of the fused normalisation as the C++ prepare step makes
  them;
- stage 1 T = X Lw^T and stage 2 Y = Lh T, each a chain of tensor-core
  instructions in increasing k (wmma k-steps of 8 for TF32, each two SASS
  HMMA.1684 of k = 4; k-steps of 16 for fp16/bf16, one HMMA.16816 each); one
  instruction is modelled as acc = fp32(acc + exact dot product of the rounded
  operands), which is how an mma with fp32 accumulation behaves up to the
  hardware's internal alignment of the products (the products of tf32/bf16/fp16
  operands are exact in float64);
- operand rounding: TF32 with cvt.rna (round to nearest, ties away from zero),
  fp16/bf16 round to nearest even;
- fp32 / uint8 input, three passes per k-step in the kernel's order on split
  operands a = a_hi + a_lo: acc += a_lo b_hi; acc += a_hi b_lo; acc += a_hi b_hi
  (uint8 is exact in tf32, so its a_lo pass is skipped), or one pass of a_hi b_hi
  when torch's CUDA matmul precision is "tf32" (``tf32_single_pass=True``);
- fp16 / bf16 input: stage 1 in the input dtype (x exact, Lw rounded), T rounded
  to bf16, stage 2 in bf16 (Lh rounded);
- the epilogue in fp32: y = (acc - lu_h[i] s lu_w[j]) * scale[c] + shift[c], then
  the cast to the output dtype.

How rows and columns are split into tiles does not change any rounding (each
output element sees the same k-ordered chain), so only the k order is modelled.
Not modelled: the summation order of the SIMT fp32 reduction of the rank-one
scalar s (summed here in float64 and rounded once) and FMA contraction in the
epilogue (done here in float64, rounded once); both are far below the mma
rounding.  The kernel handles H and the output height up to 256
(``FUSED_MAX_ROWS``); larger calls use the SIMT fallback, which this does not
emulate.
"""

from __future__ import annotations

import torch

from .fft_crop import crop_axis

FUSED_MAX_ROWS = 256  # kMaxRows in fft_crop_tc_kernel.cu


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


def _mma_chain(a_passes, b_passes, k_step: int, k_instr: int) -> torch.Tensor:
    """fp32 accumulation of sum_p a_p @ b_p as the kernel issues it.

    For each wmma k-step of k_step (ascending), for each pass p (in order), one
    instruction per k_instr slice (ascending) does acc = fp32(acc + exact dot).
    a_p (..., M, K) and b_p (..., K, N) broadcast like torch.matmul and hold
    operand-rounded values.
    """
    K = a_passes[0].shape[-1]
    acc = None
    for k0 in range(0, K, k_step):
        for a, b in zip(a_passes, b_passes):
            for ki in range(k0, min(k0 + k_step, K), k_instr):
                k1 = min(ki + k_instr, K)
                dot = a[..., ki:k1].double() @ b[..., ki:k1, :].double()
                acc = dot.float() if acc is None else (acc.double() + dot).float()
    return acc


# wmma k-step and the k of one SASS instruction: a TF32 m16n16k8 wmma is two
# HMMA.1684 (k = 4) per 16x8 half, an fp16/bf16 m16n16k16 one HMMA.16816 per half.
_K = {"tf32": (8, 4), "fp16": (16, 16), "bf16": (16, 16)}


def _product(a: torch.Tensor, b: torch.Tensor, op: str, single_pass: bool, a_exact: bool = False) -> torch.Tensor:
    """a @ b as the kernel's mma chain (a is its matrix_a operand); op is 'tf32', 'fp16' or 'bf16'."""
    k_step, k_instr = _K[op]
    if op == "tf32":
        if single_pass:
            return _mma_chain([round_tf32(a)], [round_tf32(b)], k_step, k_instr)
        a_hi, a_lo = _split_tf32(a)
        b_hi, b_lo = _split_tf32(b)
        if a_exact:  # a_lo == 0: the kernel skips that pass
            return _mma_chain([a_hi, a_hi], [b_lo, b_hi], k_step, k_instr)
        return _mma_chain([a_lo, a_hi, a_hi], [b_hi, b_lo, b_hi], k_step, k_instr)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[op]
    return _mma_chain([a.to(dtype).float()], [b.to(dtype).float()], k_step, k_instr)


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
                     tf32_single_pass: bool = False) -> torch.Tensor:
    """The kernel's map on x (N, C, Hi, Wi): rows = (Lh, lu_h, lv_h), cols = (Lw, lu_w, lv_w) float32."""
    Lh, lu_h, lv_h = rows
    Lw, lu_w, lv_w = cols
    n, c, hi, wi = x.shape
    ho, wo = Lh.shape[0], Lw.shape[0]
    if hi > FUSED_MAX_ROWS or ho > FUSED_MAX_ROWS:
        raise ValueError(f"x: H={hi} and output height {ho} must be <= {FUSED_MAX_ROWS} for the fused kernel")
    if x.dtype in (torch.float16, torch.bfloat16):
        op1, op2 = ("fp16" if x.dtype == torch.float16 else "bf16"), "bf16"
    elif x.dtype in (torch.float32, torch.uint8):
        op1 = op2 = "tf32"
    else:
        raise TypeError(f"x: the tensor-core kernel takes float32/float16/bfloat16/uint8, got {x.dtype}")
    xs = x.reshape(n * c, hi, wi).float()  # exact widening of every input dtype
    t = _product(xs, Lw.T, op1, tf32_single_pass, a_exact=x.dtype == torch.uint8)
    if op2 == "bf16":
        t = t.to(torch.bfloat16).float()  # T is staged in shared memory as bf16
    y = _product(Lh, t, op2, tf32_single_pass)  # stage 2: matrix_a = Lh (all slices), matrix_b = T
    yd = y.double()
    if lu_h is not None and lu_w is not None:
        s = (xs.double() * (lv_h.double()[:, None] * lv_w.double()[None, :])).sum(dim=(-2, -1))
        s = s.float().double()
        yd = yd - (lu_h.double()[None, :, None] * s[:, None, None]) * lu_w.double()[None, None, :]
    yd = yd.reshape(n, c, ho, wo)
    y = yd.float()
    if scale is not None:
        sh = torch.zeros_like(scale) if shift is None else shift
        y = (y.double() * scale.double().reshape(1, c, 1, 1) + sh.double().reshape(1, c, 1, 1)).float()
    return y.to(out_dtype)


def _affine(x_dtype: torch.dtype, mean, std, channels: int):
    """(scale, shift) float32 as fft_crop_args.cpp's channel_affine computes them."""
    if mean is None:
        return None, None
    inv_std = 1.0 / std.float()
    scale = inv_std * (1.0 / 255.0 if not x_dtype.is_floating_point else 1.0)
    shift = -mean.float() * inv_std
    return scale.reshape(channels), shift.reshape(channels)


def fft_crop_tensorcore(x: torch.Tensor, size, mean=None, std=None, *, tf32_single_pass: bool = False):
    """fft_crop(x, size, mean, std) as the fused tensor-core kernel computes it (CPU emulation)."""
    h, w = size
    hi, wi = x.shape[-2:]
    scale, shift = _affine(x.dtype, mean, std, x.shape[1])
    out_dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    return apply_tensorcore(x, _axis32(hi, h, False), _axis32(wi, w, False), scale, shift, out_dtype,
                            tf32_single_pass)


def fft_crop_backward_tensorcore(grad: torch.Tensor, input_size, std=None, *, tf32_single_pass: bool = False):
    """fft_crop_backward(grad, input_size, std): the adjoint of the crop applied to grad / std, emulated."""
    H, W = input_size
    h, w = grad.shape[-2:]
    scale = None if std is None else (1.0 / std.float()).reshape(grad.shape[1])
    return apply_tensorcore(grad, _axis32(H, h, True), _axis32(W, w, True), scale, None, grad.dtype,
                            tf32_single_pass)
