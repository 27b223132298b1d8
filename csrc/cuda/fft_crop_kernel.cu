// fft_crop_kernel.cu -- CUDA kernels of effkern::fft_crop and its adjoint.
//
// What: per (image, channel) slice X (Hi x Wi), Y = L X R^T - lu (lv^T X rv) ru^T,
// then y * scale[c] + shift[c]  (see fft_crop_plan.h for the matrices).
// Two launches, both a batched, tiled fp32 GEMM over the slices:
//   stage 1: T = X Rx^T with Rx = [R; rv^T]  ((Wo+1) x Wi): the extra column of T
//            is X rv, so the rank-one term costs nothing extra.  X is read in its
//            own dtype (fp32 / fp16 / bf16 / uint8) and widened to fp32 on load.
//   stage 2: Y = L T[:, :Wo] - lu * (lv . T[:, Wo]) * ru^T, with the per-channel
//            affine (the fused normalisation) and the cast to the output dtype in
//            the epilogue.
// Layout: NCHW contiguous in and out; T is (slices, Hi, Wo+1) fp32 -- real, never
// complex.  Tiling: 64x64 output tile per 256-thread block, K in steps of 16
// through shared memory, 4x4 outputs per thread; fp32 FMA accumulation (SIMT, no
// tensor cores).  Since the fused tensor-core kernel (fft_crop_tc_kernel.cu) exists
// this is the fallback for what it does not take: H or the output height > 256,
// pre-sm_80 devices, shared memory over the device's limit.  Compile-checked in CI
// (csrc/cuda/check_compile.py); on an H200 (2026-12-04) it met the float64 oracle
// (tests/test_fft_crop_tensorcore.py, the H > 256 case) -- see docs/ops.md.
//
// Only CUDA runtime headers here (no torch): nvcc compiles this file quickly.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/dtype_convert.cuh"
#include "cuda/fft_crop_kernel.h"

namespace effkern {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// Strided operand: element (i, k) of slice s lives at base[s * ss + i * si + k * sk].
template <typename T>
struct Operand {
  const T* base;
  int64_t ss, si, sk;
  __device__ __forceinline__ float at(int64_t s, int64_t i, int64_t k) const {
    return to_float(base[s * ss + i * si + k * sk]);
  }
};

// acc[4][4] += A[s](rows m0.., k) * B[s](k, cols n0..) over k in [0, K).
template <typename TA, typename TB>
__device__ void tile_gemm(const Operand<TA>& A, const Operand<TB>& B, int64_t s, int64_t M, int64_t N, int64_t K,
                          int64_t m0, int64_t n0, float acc[4][4]) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int i = e / kBK, k = e % kBK;  // A tile: 64 rows x 16 k
      const int64_t gi = m0 + i, gk = k0 + k;
      As[k][i] = (gi < M && gk < K) ? A.at(s, gi, gk) : 0.f;
    }
    for (int e = tid; e < kBN * kBK; e += kThreads) {
      const int j = e % kBN, k = e / kBN;  // B tile: 16 k x 64 cols
      const int64_t gj = n0 + j, gk = k0 + k;
      Bs[k][j] = (gj < N && gk < K) ? B.at(s, gk, gj) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[k][ty * 4 + r];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = Bs[k][tx * 4 + c];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
    __syncthreads();
  }
}

// Stage 1: T[s] (Hi x Nt) = X[s] (Hi x Wi) * Rx^T, Rx (Nt x Wi) fp32 row-major.
template <typename in_t>
__global__ void __launch_bounds__(kThreads, 1) stage1_kernel(const in_t* __restrict__ x, const float* __restrict__ rx,
                                                          float* __restrict__ t, int64_t slices, int64_t Hi, int64_t Wi,
                                                          int64_t Nt) {
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  Operand<in_t> A{x, Hi * Wi, Wi, 1};
  Operand<float> B{rx, 0, 1, Wi};  // B(k, j) = Rx[j, k]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t s = blockIdx.z; s < slices; s += gridDim.z) {  // grid.z is capped at 65535
    float acc[4][4] = {};
    tile_gemm(A, B, s, Hi, Nt, Wi, m0, n0, acc);
    for (int r = 0; r < 4; ++r) {
      const int64_t i = m0 + ty * 4 + r;
      if (i >= Hi) continue;
      for (int c = 0; c < 4; ++c) {
        const int64_t j = n0 + tx * 4 + c;
        if (j < Nt) t[(s * Hi + i) * Nt + j] = acc[r][c];
      }
    }
  }
}

// Stage 2: Y[s] (Ho x Wo) = L (Ho x Hi) * T[s][:, :Wo] - lu (lv . T[s][:, Wo]) ru^T, then affine.
template <typename out_t>
__global__ void __launch_bounds__(kThreads) stage2_kernel(const float* __restrict__ L, const float* __restrict__ t,
                                                          out_t* __restrict__ y, int64_t slices, int64_t Ho, int64_t Hi,
                                                          int64_t Wo,
                                                          int64_t Nt, int64_t channels, const float* __restrict__ lu,
                                                          const float* __restrict__ lv, const float* __restrict__ ru,
                                                          const float* __restrict__ scale,
                                                          const float* __restrict__ shift) {
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  Operand<float> A{L, 0, Hi, 1};
  Operand<float> B{t, Hi * Nt, Nt, 1};  // B(k, j) = T[s][k, j]
  __shared__ float partial[kThreads];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t s = blockIdx.z; s < slices; s += gridDim.z) {  // grid.z is capped at 65535
    float acc[4][4] = {};
    tile_gemm(A, B, s, Ho, Wo, Hi, m0, n0, acc);
    float rank_one = 0.f;  // lv . T[s][:, Wo], reduced over the block
    if (lu != nullptr) {
      float p = 0.f;
      for (int64_t m = threadIdx.x; m < Hi; m += kThreads) p = fmaf(lv[m], t[(s * Hi + m) * Nt + Wo], p);
      partial[threadIdx.x] = p;
      __syncthreads();
      for (int stride = kThreads / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
      }
      rank_one = partial[0];
      __syncthreads();  // partial is reused by the next slice
    }
    const int64_t c = s % channels;
    const float a = scale ? scale[c] : 1.f, b = shift ? shift[c] : 0.f;
    for (int r = 0; r < 4; ++r) {
      const int64_t i = m0 + ty * 4 + r;
      if (i >= Ho) continue;
      for (int cc = 0; cc < 4; ++cc) {
        const int64_t j = n0 + tx * 4 + cc;
        if (j >= Wo) continue;
        float v = acc[r][cc];
        if (lu != nullptr) v -= lu[i] * rank_one * ru[j];
        y[(s * Ho + i) * Wo + j] = from_float<out_t>(v * a + b);
      }
    }
  }
}

dim3 grid_for(int64_t M, int64_t N, int64_t slices) {
  const int64_t z = slices < 65535 ? slices : 65535;
  return dim3(static_cast<unsigned>((N + kBN - 1) / kBN), static_cast<unsigned>((M + kBM - 1) / kBM),
              static_cast<unsigned>(z));
}

}  // namespace

cudaError_t launch_fft_crop_stage1(const void* x, DType in_dtype, const float* rx, float* t, int64_t slices,
                                   int64_t Hi, int64_t Wi, int64_t Nt, cudaStream_t stream) {
  const dim3 grid = grid_for(Hi, Nt, slices);
  switch (in_dtype) {
    case DType::kFloat32:
      stage1_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), rx, t, slices, Hi, Wi, Nt);
      break;
    case DType::kFloat16:
      stage1_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), rx, t, slices, Hi, Wi, Nt);
      break;
    case DType::kBFloat16:
      stage1_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), rx, t, slices, Hi, Wi, Nt);
      break;
    case DType::kUInt8:
      stage1_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(static_cast<const uint8_t*>(x), rx, t, slices, Hi, Wi, Nt);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_fft_crop_stage2(const float* L, const float* t, void* y, DType out_dtype, int64_t slices,
                                   int64_t channels, int64_t Ho, int64_t Hi, int64_t Wo, int64_t Nt, const float* lu,
                                   const float* lv, const float* ru, const float* scale, const float* shift,
                                   cudaStream_t stream) {
  const dim3 grid = grid_for(Ho, Wo, slices);
  switch (out_dtype) {
    case DType::kFloat32:
      stage2_kernel<float><<<grid, kThreads, 0, stream>>>(L, t, static_cast<float*>(y), slices, Ho, Hi, Wo, Nt, channels, lu,
                                                          lv, ru, scale, shift);
      break;
    case DType::kFloat16:
      stage2_kernel<__half><<<grid, kThreads, 0, stream>>>(L, t, static_cast<__half*>(y), slices, Ho, Hi, Wo, Nt, channels,
                                                           lu, lv, ru, scale, shift);
      break;
    case DType::kBFloat16:
      stage2_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(L, t, static_cast<__nv_bfloat16*>(y), slices, Ho, Hi, Wo,
                                                                  Nt, channels, lu, lv, ru, scale, shift);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace effkern
