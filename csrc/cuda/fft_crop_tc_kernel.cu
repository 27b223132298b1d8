// fft_crop_tc_kernel.cu -- fused tensor-core kernel of effkern::fft_crop and its adjoint.
//
// What: per (image, channel) slice X (Hi x Wi),
//   Y = (Lh X Lw^T - lu_h (lv_h^T X lv_w) lu_w^T) * scale[c] + shift[c]
// (the crop matrices of fft_crop_plan.h; the adjoint uses their transposes), in ONE
// launch: both matrix products on tensor cores, the intermediate T = X Lw^T kept in
// shared memory, X read from global memory once per block, the rank-one scalar and
// the uint8 -> float normalisation folded into the same pass.  Nothing complex.
//
// Blocking.  Grid (ceil(Wo/64), slices); a block of 8 warps owns output columns
// n0 .. n0+63 of one slice (it loops over slices when there are more than 65535).
//   stage 1  T (Hi x 64) = X (Hi x Wi) . Lw[n0:n0+64]^T: K = Wi in tiles of 32; each
//            tile stages X[:, k0:k0+32] (all Hi rows, zero-padded to a multiple of
//            32) and Lw[n0:n0+64, k0:k0+32] in shared memory; warp w owns the
//            16-row tiles w and w+8 (so Hi <= 256) across all four 16-column
//            fragments.  While staging X each thread also accumulates its share of
//            s = lv_h^T X lv_w (SIMT fp32), reduced over the block afterwards.
//            T goes to shared memory (fp32 for fp32/uint8 input, bf16 for half).
//   stage 2  Y (Ho x 64) = Lh (Ho x Hi) . T: K = Hi in tiles of 32, Lh[:, k0:k0+32]
//            staged, T read in place; same warp -> row-tile map (Ho <= 256).  The
//            epilogue (rank-one correction, affine, cast, bounds) goes through a
//            16x16 fp32 scratch per warp and writes Y directly.
// Calls with Hi or Ho > 256 use the two-launch SIMT kernels (fft_crop_kernel.cu).
//
// Precision (each tensor-core instruction: acc = fp32(acc + dot of exact products);
// a TF32 m16n16k8 wmma step is two k = 4 instructions, an fp16/bf16 step one k = 16).
//   fp32 input: TF32 m16n16k8.  By default three passes per product on split
//     operands a = a_hi + a_lo (both rounded to tf32 with cvt.rna):
//     acc += a_lo b_hi; acc += a_hi b_lo; acc += a_hi b_hi  -- float32-level error
//     (the a_lo b_lo term is below fp32 rounding).  When torch's CUDA matmul precision
//     is "tf32" (torch.backends.cuda.matmul.fp32_precision) one pass: ~4e-4 relative.
//   uint8 input (fp32 output): x is exact in fp16, so stage 1 runs on fp16
//     m16n16k16 with Lw split by the caller into fp16(Lw) + fp16(Lw - fp16(Lw)):
//     acc += x Lw_lo; acc += x Lw_hi (two fp16 passes cost one TF32 pass; ~8e-7
//     relative); stage 2 as for fp32.  With the "tf32" precision one TF32 pass each.
//   fp16 / bf16 input: m16n16k16 in the input dtype for stage 1 (X exact, Lw rounded
//     to the input dtype), bf16 for stage 2 (T and Lh rounded to bf16: bf16 has
//     fp32's range, so T cannot overflow for finite fp16 input); fp32 accumulation.
//     The caller passes Lw/Lh already in those types (rounded once from the fp32
//     plan), which halves their share of the L2 -> shared-memory traffic.
// effkern/reference/fft_crop_tensorcore.py emulates exactly this arithmetic on the
// CPU (operand rounding, pass order, fp32 accumulation per instruction) and
// tests/test_fft_crop_tensorcore.py checks it against the float64 oracle.
//
// Why nvcuda::wmma and not inline mma.sync PTX or sm_90 wgmma: wmma compiles to the
// same HMMA instructions as mma.sync (checked by csrc/cuda/check_compile.py), and its
// fragment layouts are the compiler's business -- this kernel was written without a
// GPU to run it on, so hand-placed fragment/ldmatrix layouts (mma.sync) or wgmma's
// shared-memory descriptors and swizzles were an untestable risk.  In bf16/fp16
// memory and mma time are about equal (estimate below), and the L2 re-reads and
// synchronous staging are expected to bind first, so wgmma would buy little until
// those are fixed; fp32 with three TF32 passes is math-bound and is where wgmma (or
// folding the even/odd halves of the crop matrices, which halves the multiply-adds)
// would pay off first.
//
// Occupancy: __launch_bounds__(256, 2) keeps it at <= 128 registers (122-128, no
// spills, sm_80 and sm_90); shared memory per block at Hi = Ho = 224 is 108 KB
// (fp32), 100 KB (uint8) or 62 KB (half), so 2 blocks (16 warps) per H100/H200 SM.
//
// Measured on an H200 (2026-12-04): 1.85 ms fp32 / 1.23 ms bf16 for the shape below,
// 0.37-0.83x the rfft2-based torch.fft composition -- 6x (fp32) to 12-18x (bf16) slower than this
// estimate, cause not profiled (docs/ops.md).
// Expected speed (the estimate made before any GPU ran; docs/ops.md has the table).
// (256, 3, 224, 224) -> 160 moves 233 MB (fp32) or 117 MB (bf16, uint8 -> fp32):
// 70 / 35 us at H100's 3.35 TB/s, 49 / 24 us at H200's 4.8 TB/s.  The products are
// 21 GFLOP, at an assumed ~330 (TF32) / ~660 (bf16) TFLOP/s for mma.sync-class
// code on either chip: bf16 and one-pass TF32 sit at the roofline's ridge (expect
// 40-55 % of HBM bandwidth on H100, 30-45 % on H200), the float32-accurate three
// passes (63 GFLOP) are math-bound (fp32 ~25-30 % on H100, ~20 % on H200), and so
// is uint8 with its fp16-split stage 1 (~25 / ~18 %).  Below the roofline because every 64-column block
// re-reads X and Lh from L2 (L2 -> SM traffic ~4-6x the HBM traffic) and X is
// staged synchronously (no cp.async pipeline).  Next steps, largest first: fold the
// even/odd halves of the crop matrices (half the multiply-adds), wider blocks,
// cp.async/TMA, wgmma.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/dtype_convert.cuh"
#include "cuda/fft_crop_tc_kernel.h"

namespace effkern {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kBN = 64;        // output columns per block (4 fragments of 16)
constexpr int kBK = 32;        // K tile staged in shared memory
constexpr int kMaxRows = 256;  // Hi and Ho limit: 8 warps x 2 row tiles x 16

// One tensor-core operand type: the staged element, the wmma fragment type and K.
struct Tf32Op {
  using elem = float;
  using frag = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr int kPad = 4;  // row padding in elements (keeps ldm a multiple of 16 bytes)
};
template <typename T>
struct HalfOp {
  using elem = T;
  using frag = T;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
};

__host__ __device__ constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
__host__ __device__ constexpr size_t align128(size_t v) { return (v + 127) / 128 * 128; }

// dst[r][c] (r < rows_pad, c < kBK, leading dimension ld) = src[r][col0 + c] widened
// to fp32 and rounded to Dst; zero outside rows_valid x cols_valid.  With vrow set,
// rank_acc += sum of src[r][gc] * vrow[r] * vcol[gc] over this thread's elements.
template <typename Src, typename Dst>
__device__ __forceinline__ void stage_tile(Dst* __restrict__ dst, int ld, const Src* __restrict__ src,
                                           int64_t src_ld, int rows_valid, int rows_pad, int64_t col0,
                                           int64_t cols_valid, const float* __restrict__ vrow,
                                           const float* __restrict__ vcol, float& rank_acc) {
#pragma unroll 4
  for (int e = threadIdx.x; e < rows_pad * kBK; e += kThreads) {
    const int r = e / kBK, c = e % kBK;  // a warp reads 32 consecutive elements of one row
    const int64_t gc = col0 + c;
    float v = 0.f;
    if (r < rows_valid && gc < cols_valid) {
      v = to_float(src[r * src_ld + gc]);
      if (vrow != nullptr) rank_acc = fmaf(v, vrow[r] * vcol[gc], rank_acc);
    }
    dst[r * ld + c] = from_float<Dst>(v);
  }
}

// TF32 operand rounding; hi/lo split for the three-pass products.
template <typename Frag>
__device__ __forceinline__ void round_tf32(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    const float h = wmma::__float_to_tf32(v);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(v - h);
  }
}


template <typename Op>
using AccOf = wmma::fragment<wmma::accumulator, 16, 16, Op::kK, float>;

// acc[j][f] += A[rows of tile warp+8j][kBK] . B[kBK][cols 16f..16f+15] for one staged K tile.
// A is row-major (lda); B is col-major (element (k, n) at n*ldb + k) or row-major
// (k*ldb + n).  kPasses = 1: one product (TF32 operands rounded); 3: split-TF32
// products acc += a_lo b_hi; acc += a_hi b_lo; acc += a_hi b_hi; 2: B arrives split in
// two staged tiles (Bs = hi, Bs_lo = lo, same layout): acc += a b_lo; acc += a b_hi.
template <typename Op, typename LayoutB, int kPasses>
__device__ __forceinline__ void warp_mma(AccOf<Op> (&acc)[2][4], const typename Op::elem* As, int lda,
                                         const typename Op::elem* Bs, const typename Op::elem* Bs_lo, int ldb,
                                         int warp, int row_tiles, int col_frags) {
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, Op::kK, typename Op::frag, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, Op::kK, typename Op::frag, LayoutB>;
  constexpr bool kColB = std::is_same_v<LayoutB, wmma::col_major>;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += Op::kK) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // row tile outermost: one A fragment (pair) live at a time
      const int rt = warp + kWarps * j;
      if (rt >= row_tiles) continue;
      FragA a_hi, a_lo;
      wmma::load_matrix_sync(a_hi, As + rt * 16 * lda + kk, lda);
      if constexpr (std::is_same_v<Op, Tf32Op>) {
        if constexpr (kPasses == 3) split_tf32(a_hi, a_lo);
        else round_tf32(a_hi);
      }
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        if (f >= col_frags) continue;
        FragB b_hi, b_lo;
        const int b_off = kColB ? f * 16 * ldb + kk : kk * ldb + f * 16;
        wmma::load_matrix_sync(b_hi, Bs + b_off, ldb);
        if constexpr (std::is_same_v<Op, Tf32Op>) {
          if constexpr (kPasses == 3) split_tf32(b_hi, b_lo);
          else round_tf32(b_hi);
        }
        if constexpr (kPasses == 2) {
          wmma::load_matrix_sync(b_lo, Bs_lo + b_off, ldb);
          wmma::mma_sync(acc[j][f], a_hi, b_lo, acc[j][f]);
        }
        if constexpr (kPasses == 3) {
          wmma::mma_sync(acc[j][f], a_lo, b_hi, acc[j][f]);
          wmma::mma_sync(acc[j][f], a_hi, b_lo, acc[j][f]);
        }
        wmma::mma_sync(acc[j][f], a_hi, b_hi, acc[j][f]);
      }
    }
  }
}

// Shared-memory layout of one block, in bytes (host and device agree on it).
template <typename Op1, typename Op2, bool kSplitB>
struct Layout {
  int64_t rows1;  // Hi rounded up to kBK: stage-1 rows and stage-2 K extent
  int64_t rows2;  // Ho rounded up to 16
  size_t a_off, b_off, t_off, scratch_off, red_off, total;
  static constexpr int kLda1 = kBK + Op1::kPad, kLda2 = kBK + Op2::kPad, kLdt = kBN + Op2::kPad;
  __host__ __device__ Layout(int64_t Hi, int64_t Ho) : rows1(round_up(Hi, kBK)), rows2(round_up(Ho, 16)) {
    const size_t a1 = size_t(rows1) * kLda1 * sizeof(typename Op1::elem);
    const size_t a2 = size_t(rows2) * kLda2 * sizeof(typename Op2::elem);
    a_off = 0;
    b_off = align128(a1 > a2 ? a1 : a2);
    t_off = b_off + align128(size_t(kSplitB ? 2 : 1) * kBN * kLda1 * sizeof(typename Op1::elem));
    scratch_off = t_off + align128(size_t(rows1) * kLdt * sizeof(typename Op2::elem));
    red_off = scratch_off + align128(size_t(kWarps) * 16 * 16 * sizeof(float));
    total = red_off + align128(kWarps * sizeof(float));
  }
};

template <typename In, typename Out, typename Op1, int kPasses1, typename Op2, int kPasses2>
__global__ void __launch_bounds__(kThreads, 2) fft_crop_tc_kernel(FftCropTcArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E1 = typename Op1::elem;
  using E2 = typename Op2::elem;
  constexpr bool kSplitB = kPasses1 == 2;
  using Lay = Layout<Op1, Op2, kSplitB>;
  extern __shared__ __align__(128) unsigned char smem[];
  const Lay lay(p.Hi, p.Ho);
  constexpr int kLda1 = Lay::kLda1, kLda2 = Lay::kLda2, kLdt = Lay::kLdt;
  E1* a1 = reinterpret_cast<E1*>(smem + lay.a_off);
  E2* a2 = reinterpret_cast<E2*>(smem + lay.a_off);
  E1* bw = reinterpret_cast<E1*>(smem + lay.b_off);
  E1* bw_lo = bw + kBN * kLda1;  // used only with kSplitB
  E2* t = reinterpret_cast<E2*>(smem + lay.t_off);
  float* scratch = reinterpret_cast<float*>(smem + lay.scratch_off) + (threadIdx.x / 32) * 256;
  float* red = reinterpret_cast<float*>(smem + lay.red_off);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = int64_t(blockIdx.x) * kBN;
  const int cols_valid = static_cast<int>(p.Wo - n0 < kBN ? p.Wo - n0 : kBN);
  const int col_frags = (cols_valid + 15) / 16;
  const int rows1 = static_cast<int>(lay.rows1), rows2 = static_cast<int>(lay.rows2);
  const int row_tiles1 = rows1 / 16, row_tiles2 = rows2 / 16;
  const bool rank_one = p.lu_h != nullptr;
  const In* x_all = static_cast<const In*>(p.x);
  Out* y_all = static_cast<Out*>(p.y);

  for (int64_t s = blockIdx.y; s < p.slices; s += gridDim.y) {
    const In* x = x_all + s * p.Hi * p.Wi;
    // ---- stage 1: T = X Lw[n0:n0+64]^T ----
    AccOf<Op1> acc1[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc1[j][f], 0.f);
    float rank_acc = 0.f;
    for (int64_t k0 = 0; k0 < p.Wi; k0 += kBK) {
      __syncthreads();  // the previous tile (or the previous slice's stage 2) is done with a1/bw
      stage_tile(a1, kLda1, x, p.Wi, static_cast<int>(p.Hi), rows1, k0, p.Wi, rank_one ? p.lv_h : nullptr,
                 p.lv_w, rank_acc);
      stage_tile(bw, kLda1, static_cast<const E1*>(p.Lw) + n0 * p.Wi, p.Wi, cols_valid, kBN, k0, p.Wi, nullptr,
                 nullptr, rank_acc);
      if constexpr (kSplitB) {
        stage_tile(bw_lo, kLda1, static_cast<const E1*>(p.Lw_lo) + n0 * p.Wi, p.Wi, cols_valid, kBN, k0, p.Wi,
                   nullptr, nullptr, rank_acc);
      }
      __syncthreads();
      warp_mma<Op1, wmma::col_major, kPasses1>(acc1, a1, kLda1, bw, bw_lo, kLda1, warp, row_tiles1, col_frags);
    }
    // T to shared memory in the stage-2 operand type.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int rt = warp + kWarps * j;
      if (rt >= row_tiles1) continue;
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        if (f >= col_frags) continue;
        if constexpr (std::is_same_v<E2, float>) {
          wmma::store_matrix_sync(t + rt * 16 * kLdt + f * 16, acc1[j][f], kLdt, wmma::mem_row_major);
        } else {
          wmma::store_matrix_sync(scratch, acc1[j][f], 16, wmma::mem_row_major);
          __syncwarp();
          for (int e = lane; e < 256; e += 32) {
            t[(rt * 16 + e / 16) * kLdt + f * 16 + e % 16] = from_float<E2>(scratch[e]);
          }
          __syncwarp();
        }
      }
    }
    // s = lv_h^T X lv_w, reduced over the block (fixed order: lanes by shuffle, then warps 0..7).
    float rank_s = 0.f;
    if (rank_one) {
      for (int off = 16; off > 0; off /= 2) rank_acc += __shfl_xor_sync(0xffffffffu, rank_acc, off);
      if (lane == 0) red[warp] = rank_acc;
    }
    __syncthreads();  // T complete, red written, a1/bw free
    if (rank_one) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) rank_s += red[w];
    }

    // ---- stage 2: Y[:, n0:n0+64] = Lh T ----
    AccOf<Op2> acc2[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc2[j][f], 0.f);
    for (int k0 = 0; k0 < rows1; k0 += kBK) {
      if (k0 > 0) __syncthreads();
      stage_tile(a2, kLda2, static_cast<const E2*>(p.Lh), p.Hi, static_cast<int>(p.Ho), rows2, k0, p.Hi, nullptr,
                 nullptr, rank_acc);
      __syncthreads();
      warp_mma<Op2, wmma::row_major, kPasses2>(acc2, a2, kLda2, t + k0 * kLdt, nullptr, kLdt, warp, row_tiles2,
                                              col_frags);
    }
    // Epilogue: rank-one correction, affine, cast; Y rows are Ho, columns n0 + (0..63).
    const int64_t c = s % p.channels;
    const float scale = p.scale != nullptr ? p.scale[c] : 1.f, shift = p.shift != nullptr ? p.shift[c] : 0.f;
    Out* y = y_all + s * p.Ho * p.Wo;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int rt = warp + kWarps * j;
      if (rt >= row_tiles2) continue;
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        if (f >= col_frags) continue;
        wmma::store_matrix_sync(scratch, acc2[j][f], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t i = rt * 16 + e / 16, jj = n0 + f * 16 + e % 16;
          if (i >= p.Ho || jj >= p.Wo) continue;
          float v = scratch[e];
          if (rank_one) v -= p.lu_h[i] * rank_s * p.lu_w[jj];
          y[i * p.Wo + jj] = from_float<Out>(v * scale + shift);
        }
        __syncwarp();
      }
    }
  }
#endif
}

template <typename In, typename Out, typename Op1, int kPasses1, typename Op2, int kPasses2>
cudaError_t launch(const FftCropTcArgs& p, size_t smem, cudaStream_t stream) {
  auto kernel = fft_crop_tc_kernel<In, Out, Op1, kPasses1, Op2, kPasses2>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.Wo + kBN - 1) / kBN),
                  static_cast<unsigned>(p.slices < 65535 ? p.slices : 65535));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

bool supported_pair(DType in, DType out) {
  switch (in) {
    case DType::kFloat32:
    case DType::kUInt8: return out == DType::kFloat32;
    case DType::kFloat16: return out == DType::kFloat16;
    case DType::kBFloat16: return out == DType::kBFloat16;
  }
  return false;
}

}  // namespace

void fft_crop_tc_matrix_dtypes(DType in, bool tf32_single_pass, DType* lh, DType* lw, bool* lw_split) {
  const bool half = in == DType::kFloat16 || in == DType::kBFloat16;
  *lw_split = in == DType::kUInt8 && !tf32_single_pass;
  *lh = half ? DType::kBFloat16 : DType::kFloat32;
  *lw = half ? in : (*lw_split ? DType::kFloat16 : DType::kFloat32);
}

size_t fft_crop_tc_smem_bytes(const FftCropTcArgs& p) {
  if (p.Hi < 1 || p.Ho < 1 || p.Hi > kMaxRows || p.Ho > kMaxRows || !supported_pair(p.in_dtype, p.out_dtype)) return 0;
  switch (p.in_dtype) {
    case DType::kFloat32: return Layout<Tf32Op, Tf32Op, false>(p.Hi, p.Ho).total;
    case DType::kUInt8:
      return p.tf32_single_pass ? Layout<Tf32Op, Tf32Op, false>(p.Hi, p.Ho).total
                                : Layout<HalfOp<__half>, Tf32Op, true>(p.Hi, p.Ho).total;
    case DType::kFloat16: return Layout<HalfOp<__half>, HalfOp<__nv_bfloat16>, false>(p.Hi, p.Ho).total;
    case DType::kBFloat16: return Layout<HalfOp<__nv_bfloat16>, HalfOp<__nv_bfloat16>, false>(p.Hi, p.Ho).total;
  }
  return 0;
}

cudaError_t launch_fft_crop_tc(const FftCropTcArgs& p, cudaStream_t stream) {
  const size_t smem = fft_crop_tc_smem_bytes(p);
  if (smem == 0) return cudaErrorInvalidValue;
  if (p.slices == 0 || p.Wo == 0) return cudaSuccess;
  using Bf16 = HalfOp<__nv_bfloat16>;
  switch (p.in_dtype) {
    case DType::kFloat32:
      return p.tf32_single_pass ? launch<float, float, Tf32Op, 1, Tf32Op, 1>(p, smem, stream)
                                : launch<float, float, Tf32Op, 3, Tf32Op, 3>(p, smem, stream);
    case DType::kUInt8:  // float32 accuracy: stage 1 on fp16 (x exact, Lw split hi + lo), stage 2 three TF32 passes
      if (p.Lw_lo == nullptr && !p.tf32_single_pass) return cudaErrorInvalidValue;
      return p.tf32_single_pass ? launch<uint8_t, float, Tf32Op, 1, Tf32Op, 1>(p, smem, stream)
                                : launch<uint8_t, float, HalfOp<__half>, 2, Tf32Op, 3>(p, smem, stream);
    case DType::kFloat16: return launch<__half, __half, HalfOp<__half>, 1, Bf16, 1>(p, smem, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, __nv_bfloat16, Bf16, 1, Bf16, 1>(p, smem, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace effkern
