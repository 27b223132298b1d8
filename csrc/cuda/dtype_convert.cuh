// dtype_convert.cuh -- device-side conversions between the element types the CUDA
// kernels read or write (float, __half, __nv_bfloat16, uint8_t) and float32.
//
// to_float(v): widen one element to fp32 (exact for every type here; uint8 gives
// 0..255, the caller applies any /255 normalisation).  from_float<T>(v): narrow an
// fp32 value to T with round-to-nearest-even (identity for float).  There is no
// from_float<uint8_t>: no kernel writes uint8.  Written with the cuda_fp16 /
// cuda_bf16 intrinsics, so they work under torch's -D__CUDA_NO_HALF_CONVERSIONS__
// and -D__CUDA_NO_BFLOAT16_CONVERSIONS__ build flags.
//
// Shared by fft_crop_kernel.cu and fft_crop_tc_kernel.cu.  Device code only:
// include it from .cu files compiled by nvcc, never from a .cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace effkern {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace effkern
