// fft_crop_tc_kernel.h -- launcher of the fused tensor-core fft_crop kernel
// (fft_crop_tc_kernel.cu).  Plain pointers and a stream: no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/fft_crop_kernel.h"

namespace effkern {

// One call of the separable crop on NCHW-contiguous data:
//   Y[s] = (Lh X[s] Lw^T - lu_h (lv_h^T X[s] lv_w) lu_w^T) * scale[c] + shift[c],  c = s % channels.
// Lh (Ho x Hi) and Lw (Wo x Wi) are row-major in the tensor-core operand type:
// fp32 for fp32 input (and uint8 with one TF32 pass); for uint8 with float32
// accuracy Lw split in two fp16 matrices and Lh fp32; for fp16 input Lw fp16 and Lh
// bf16; for bf16 input both bf16 (fft_crop_tc_matrix_dtypes).  The rank-one vectors (fp32) are all
// null (no term) or all set; scale/shift (fp32) null means identity.
struct FftCropTcArgs {
  const void* x;  // (slices, Hi, Wi), in_dtype
  void* y;        // (slices, Ho, Wo), out_dtype
  DType in_dtype, out_dtype;
  const void* Lh;
  const void* Lw;
  const void* Lw_lo;  // the low half of the split Lw, or null (fft_crop_tc_matrix_dtypes)
  const float* lu_h;  // (Ho,)
  const float* lv_h;  // (Hi,)
  const float* lu_w;  // (Wo,)
  const float* lv_w;  // (Wi,)
  const float* scale;
  const float* shift;
  int64_t slices, channels;
  int64_t Hi, Wi, Ho, Wo;
  // fp32/uint8 input: true = one TF32 pass (torch's CUDA matmul precision is "tf32"),
  // false = three TF32 passes (split operands, float32-level accuracy).
  bool tf32_single_pass;
};

// The dtypes Lh and Lw must have for an input dtype and pass mode; *lw_split: Lw is
// passed as two fp16 matrices, Lw = fp16(Lw32) and Lw_lo = fp16(Lw32 - Lw) (uint8
// input with float32 accuracy: x is exact in fp16, so stage 1 runs as two fp16 passes).
void fft_crop_tc_matrix_dtypes(DType in_dtype, bool tf32_single_pass, DType* lh, DType* lw, bool* lw_split);

// Dynamic shared memory the fused kernel needs for this call, or 0 when the call
// is outside the fused kernel's limits (Hi or Ho > 256, or an unsupported dtype
// pair).  The caller compares it with the device's opt-in limit and falls back to
// the two-launch SIMT kernels (fft_crop_kernel.h) when it does not fit.
size_t fft_crop_tc_smem_bytes(const FftCropTcArgs& args);

// Launches the fused kernel (needs sm_80+ and fft_crop_tc_smem_bytes(args) > 0).
cudaError_t launch_fft_crop_tc(const FftCropTcArgs& args, cudaStream_t stream);

}  // namespace effkern
