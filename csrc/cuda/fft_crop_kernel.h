// fft_crop_kernel.h -- launchers of the fft_crop CUDA kernels (fft_crop_kernel.cu).
// Plain pointers and a stream: no torch headers, so the .cu compiles fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace effkern {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kUInt8 };

// T[s] (Hi x Nt, fp32) = X[s] (Hi x Wi, in_dtype) * Rx^T, Rx (Nt x Wi) fp32.
cudaError_t launch_fft_crop_stage1(const void* x, DType in_dtype, const float* rx, float* t, int64_t slices,
                                   int64_t Hi, int64_t Wi, int64_t Nt, cudaStream_t stream);

// Y[s] (Ho x Wo, out_dtype) = (L T[s][:, :Wo] - lu (lv . T[s][:, Wo]) ru^T) * scale[c] + shift[c],
// c = s % channels.  lu/lv/ru null: no rank-one term (then T may have Nt == Wo);
// scale/shift null: identity.
cudaError_t launch_fft_crop_stage2(const float* L, const float* t, void* y, DType out_dtype, int64_t slices,
                                   int64_t channels, int64_t Ho, int64_t Hi, int64_t Wo, int64_t Nt, const float* lu,
                                   const float* lv, const float* ru, const float* scale, const float* shift,
                                   cudaStream_t stream);

}  // namespace effkern
