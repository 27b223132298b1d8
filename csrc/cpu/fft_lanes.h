// fft_lanes.h -- the FFT path of the CPU fft_crop kernel: plans and entry points.
//
// The separable crop applies one real 1-D map per axis, Ar (n_out x n_in, see
// fft_crop_plan.h).  Ar is real, so it acts on a complex vector z = u + i v as
// Ar u + i Ar v: two real vectors ride in one complex transform (one in the real
// plane, one in the imaginary plane), and no real-FFT packing is needed.  The
// two vectors are always two halves of the SAME slice (the left and right half
// of its columns along H, the top and bottom half of its output rows along W):
// rounding error and non-finite values stay inside the slice, exactly as in the
// dense map, and every slice's result is independent of the rest of the batch.
// Per axis, Ar z = scale * IDFT_{n_out}( M DFT_{n_in}(z) ) with unnormalised
// transforms, scale = 1 / max(n_in, n_out) and M the bin map of the kept band
// K = {-floor(n/2) .. ceil(n/2)-1}, n = min(n_in, n_out):
//   crop (n_out < n_in): out[k] = in[k] for k in K; for even n the unpaired bin
//        -n/2 takes the Hermitian mean (in[-n/2] + in[n/2]) / 2, which is what
//        Re() of the one-sided crop does to a real signal;
//   pad  (n_out > n_in, the adjoint): out[k] = in[k], and for even n the bin
//        n/2 (= -n/2 on the short grid) is split half/half onto +-n/2.
// The 2-D crop additionally has a rank-one corner term when both kept sizes are
// even (fft_crop_plan.h); the driver adds it from the input.
//
// Layout: "lanes".  A transform runs along the rows of a (rows x lanes) block
// whose lanes are contiguous; every butterfly is an elementwise loop over the
// lanes, which vectorises with no shuffles.  Real and imaginary parts live in
// separate planes.  The driver transforms along H with lanes = the columns of
// the left half (real plane) and right half (imaginary plane), transposes, and
// transforms along W with lanes = the top / bottom half of the output rows.
//
// Transforms are mixed-radix Stockham (auto-sorting, out of place between two
// buffers): radix 8, 4 and 2, specialised odd radices 3, 5, 7, and a generic odd
// radix for other primes.  Twiddles are tabulated per stage in the kernel's
// precision from float64.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace effkern::fft_lanes {

// One Stockham stage: the sequence of length N is viewed as (n, s), n * s = N;
// the stage splits n = radix * m.
template <typename T>
struct Stage {
  int radix = 1;
  int64_t n = 1, s = 1, m = 1;
  std::vector<T> tw_re, tw_im;    // (m, radix-1): exp(sign 2 pi i j t / n), t = 1..radix-1
  std::vector<T> cos_k, sin_k;    // odd radix p: cos(2 pi k / p), sign * sin(2 pi k / p), k = 0..p-1
};

template <typename T>
struct Transform {
  int64_t N = 1;
  int sign = -1;  // -1: forward DFT, +1: unnormalised inverse
  std::vector<Stage<T>> stages;
};

template <typename T>
struct BinTerm {
  int64_t src, dst;
  T weight;
  bool assign;  // the first term of its dst row: store instead of accumulate
};

// One axis: n_in -> n_out (crop when n_out < n_in, pad/adjoint when n_out > n_in,
// identity when equal).
template <typename T>
struct AxisPlan {
  int64_t n_in = 1, n_out = 1;
  Transform<T> forward, inverse;
  bool identity = false;           // n_in == n_out: no transforms at all
  std::vector<BinTerm<T>> bins;    // out[dst] (+)= weight * in[src], sorted by dst
  std::vector<int64_t> zero_rows;  // out rows no term reaches (pad)
  T scale = 1;                     // 1 / max(n_in, n_out)
};

// Cached per (n_in, n_out); thread-safe.
template <typename T>
const AxisPlan<T>& axis_plan(int64_t n_in, int64_t n_out);

// Rough real flops of one complex transform of length N (for choosing FFT vs GEMM).
double transform_flops(int64_t N);

// The map applied to one slice: rows (H -> Ho) then columns (W -> Wo).
template <typename T>
struct SliceGeometry {
  int64_t Hi, Wi, Ho, Wo;
  const AxisPlan<T>* rows;
  const AxisPlan<T>* cols;
  // Rank-one corner term y -= (lv_rows^T x lv_cols) lu_rows lu_cols^T, or null.
  const T* lu_rows = nullptr;
  const T* lu_cols = nullptr;
  const T* lv_rows = nullptr;
  const T* lv_cols = nullptr;
};

// One slice: x (Hi x Wi contiguous) -> y (Ho x Wo contiguous), then y * scale + shift.
template <typename T>
struct SliceJob {
  const T* x;
  T* y;
  T scale, shift;
};

// Lane blocks hold at most this many lanes (a block's rows stay in L2; wider
// blocks amortise the per-stage loop overhead); a lane range is cut into equal
// blocks (multiples of 8) of at most this width.
constexpr int64_t kLaneBlock = 128;

// Row stride of a block of L lanes: rounded up to 16 and padded by 4 elements,
// so that the 2p streams of a radix-p butterfly (rows a power-of-two apart) do
// not all map to the same L1 sets, and narrow blocks stay narrow.
constexpr int64_t block_ld(int64_t L) { return (L + 15) / 16 * 16 + 4; }

// Half of a length, rounded up: the lanes of the real plane (the imaginary plane
// takes the rest plus, for odd lengths, one zero lane).
constexpr int64_t half_up(int64_t n) { return (n + 1) / 2; }

// Per-thread scratch, sized from the geometry once and reused for every slice.
// All buffers start zeroed; lanes outside the data (block padding, the zero lane
// of an odd half) only ever hold zeros or values that never reach a result.
template <typename T>
struct Workspace {
  int64_t plane;          // offset of the im plane in a block buffer
  int64_t ld_in;          // row stride of the staged input: 2 * half_up(Wi) + 4
  int64_t ld_mid;         // row stride of mid: 2 * half_up(Ho) + 4
  std::vector<T> buf[3];  // three (rows x lane block) complex blocks: re plane, then im plane
  std::vector<T> input;   // the slice, staged (Hi x ld_in)
  std::vector<T> mid;     // Ar_h X transposed (Wi x ld_mid)
  explicit Workspace(const SliceGeometry<T>& g)
      : plane(plane_for(g)),
        ld_in(padded_pair(g.Wi)),
        ld_mid(padded_pair(g.Ho)),
        input(g.Hi * ld_in, T(0)),
        mid(g.Wi * ld_mid, T(0)) {
    for (auto& b : buf) b.assign(2 * plane, T(0));
  }

  // The bytes a Workspace for g holds (before building it).
  static int64_t bytes(const SliceGeometry<T>& g) {
    const int64_t elements =
        3 * 2 * plane_for(g) + g.Hi * padded_pair(g.Wi) + g.Wi * padded_pair(g.Ho);
    return elements * static_cast<int64_t>(sizeof(T));
  }

 private:
  // Row stride holding both halves of n (and the zero lane of an odd n), padded by 4.
  static int64_t padded_pair(int64_t n) { return 2 * half_up(n) + 4; }
  static int64_t plane_for(const SliceGeometry<T>& g) {
    return std::max({g.Hi, g.Ho, g.Wi, g.Wo}) * block_ld(kLaneBlock) + 64 / static_cast<int64_t>(sizeof(T));
  }
};

// The kernel, compiled once per instruction set (fft_lanes_isa_*.cpp) and
// picked at run time from the CPU's features (EFFKERN_CPU_ISA=baseline|avx2|avx512
// forces one; unsupported choices fall back to the best available).
template <typename T>
void crop_slice(const SliceGeometry<T>& g, const SliceJob<T>& job, Workspace<T>& ws);

// The instruction set crop_slice runs with: "avx512", "avx2" or "baseline".
const char* active_isa();

}  // namespace effkern::fft_lanes
