// fft_crop_cpu.cpp -- CPU kernel of effkern::fft_crop and its adjoint.
//
// What: for every (image, channel) slice X (H x W), Y = L X R^T - lu (lv^T X rv) ru^T
// (the crop, or its adjoint, as real matrices: see fft_crop_plan.h), then the
// optional per-channel affine y * scale[c] + shift[c] (fused normalisation).
// Layout: NCHW contiguous in, NCHW contiguous out; the slices are independent.
//
// Two algorithms, chosen per call by a flop estimate (EFFKERN_FFT_CROP_CPU=fft|gemm
// forces one):
// * fft (fft_lanes.h): per slice (its two halves in the real and the imaginary
//   plane of one complex transform), a mixed-radix FFT -> band -> inverse FFT
//   along H and then along W, vectorised across the lanes of the other axis.
//   O(N log N): for 224 -> 160 about a fifth of the GEMM's flops.  Needs a
//   per-thread scratch of about 1 MB (224 x 224 float32).
// * gemm: two small dense GEMMs per slice (224x224 @ 224x160, then
//   160x224 @ 224x160 for a 224 -> 160 crop), each split into an even and an odd
//   half of about a quarter of the size (the crop matrices commute with index
//   reversal, see fft_crop_plan.h): half the multiply-adds for two cheap passes
//   that fold the input and unfold the output.  Wins for sizes with large prime
//   factors, where the FFT degenerates to dense sums anyway.
// Slices are spread over threads with at::parallel_for; each thread
// keeps its slices (converted from uint8/half if needed) and intermediates in
// private buffers that stay in L2.
#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/outer.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <cstdlib>
#include <cstring>

#include "fft_crop_args.h"
#include "fft_crop_plan.h"
#include "cpu/fft_crop_cpu.h"
#include "cpu/fft_lanes.h"

namespace effkern {
namespace {

// Slices per inner step: small enough that a thread's inputs and intermediates
// stay in L2, large enough to amortise the per-call cost of the GEMM.
constexpr int64_t kSlicesPerStep = 4;

// src (count, N, inner) -> even part (count, N/2+1, inner), odd part (count, (N-1)/2, inner):
// xe[j] = x[j] + x[N-j] (x[j] alone where j == N-j mod N), xo[j] = x[j] - x[N-j], j >= 1.
template <typename T>
void fold(const T* src, T* even, T* odd, int64_t count, int64_t N, int64_t inner) {
  const int64_t Ne = N / 2 + 1, No = (N - 1) / 2;
  for (int64_t c = 0; c < count; ++c) {
    const T* x = src + c * N * inner;
    T* xe = even + c * Ne * inner;
    T* xo = odd + c * No * inner;
    for (int64_t i = 0; i < inner; ++i) xe[i] = x[i];
    for (int64_t j = 1; j <= No; ++j) {
      const T* lo = x + j * inner;
      const T* hi = x + (N - j) * inner;
      T* e = xe + j * inner;
      T* o = xo + (j - 1) * inner;
      for (int64_t i = 0; i < inner; ++i) {
        e[i] = lo[i] + hi[i];
        o[i] = lo[i] - hi[i];
      }
    }
    if (N % 2 == 0 && N > 1) {
      for (int64_t i = 0; i < inner; ++i) xe[(N / 2) * inner + i] = x[(N / 2) * inner + i];
    }
  }
}

// Inverse of the output split: dst[a] = ye[a] + yo[a], dst[n-a] = ye[a] - yo[a].
template <typename T>
void unfold(const T* even, const T* odd, T* dst, int64_t count, int64_t n, int64_t inner) {
  const int64_t ne = n / 2 + 1, no = (n - 1) / 2;
  for (int64_t c = 0; c < count; ++c) {
    const T* ye = even + c * ne * inner;
    const T* yo = odd + c * no * inner;
    T* y = dst + c * n * inner;
    for (int64_t i = 0; i < inner; ++i) y[i] = ye[i];
    for (int64_t a = 1; a <= no; ++a) {
      const T* e = ye + a * inner;
      const T* o = yo + (a - 1) * inner;
      T* lo = y + a * inner;
      T* hi = y + (n - a) * inner;
      for (int64_t i = 0; i < inner; ++i) {
        lo[i] = e[i] + o[i];
        hi[i] = e[i] - o[i];
      }
    }
    if (n % 2 == 0 && n > 1) {
      for (int64_t i = 0; i < inner; ++i) y[(n / 2) * inner + i] = ye[(n / 2) * inner + i];
    }
  }
}

// Per-thread scratch for one step of S <= kSlicesPerStep slices.
struct Scratch {
  at::Tensor xe, xo, te, to, t, re, ro, ye, yo;
  Scratch(int64_t S, int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo, at::TensorOptions opts)
      : xe(at::empty({S * Hi, Wi / 2 + 1}, opts)), xo(at::empty({S * Hi, (Wi - 1) / 2}, opts)),
        te(at::empty({S * Hi, Wo / 2 + 1}, opts)), to(at::empty({S * Hi, (Wo - 1) / 2}, opts)),
        t(at::empty({S, Hi, Wo}, opts)), re(at::empty({S, Hi / 2 + 1, Wo}, opts)),
        ro(at::empty({S, (Hi - 1) / 2, Wo}, opts)), ye(at::empty({S, Ho / 2 + 1, Wo}, opts)),
        yo(at::empty({S, (Ho - 1) / 2, Wo}, opts)) {}
};

// One step of S slices: y = L x R^T - lu (lv^T x rv) ru^T, each product split into
// its even and odd halves (fft_crop_plan.h), which halves the multiply-adds.
// x: (S, Hi, Wi) contiguous in acc dtype; y: (S, Ho, Wo) contiguous.
template <typename acc_t>
void apply_step(const at::Tensor& x, at::Tensor& y, const AxisOp& rows, const AxisOp& cols, bool rank_one,
                Scratch& w) {
  const int64_t S = x.size(0), Hi = x.size(1), Wi = x.size(2), Ho = y.size(1), Wo = y.size(2);
  at::Tensor xe = w.xe.narrow(0, 0, S * Hi), xo = w.xo.narrow(0, 0, S * Hi);
  at::Tensor te = w.te.narrow(0, 0, S * Hi), to = w.to.narrow(0, 0, S * Hi);
  at::Tensor t = w.t.narrow(0, 0, S), re = w.re.narrow(0, 0, S), ro = w.ro.narrow(0, 0, S);
  at::Tensor ye = w.ye.narrow(0, 0, S), yo = w.yo.narrow(0, 0, S);
  // along W: T = X R^T
  fold(x.data_ptr<acc_t>(), xe.data_ptr<acc_t>(), xo.data_ptr<acc_t>(), S * Hi, Wi, 1);
  at::mm_out(te, xe, cols.E.t());
  at::mm_out(to, xo, cols.O.t());
  unfold(te.data_ptr<acc_t>(), to.data_ptr<acc_t>(), t.data_ptr<acc_t>(), S * Hi, Wo, 1);
  // along H: Y = L T
  fold(t.data_ptr<acc_t>(), re.data_ptr<acc_t>(), ro.data_ptr<acc_t>(), S, Hi, Wo);
  at::matmul_out(ye, rows.E, re);
  at::matmul_out(yo, rows.O, ro);
  unfold(ye.data_ptr<acc_t>(), yo.data_ptr<acc_t>(), y.data_ptr<acc_t>(), S, Ho, Wo);
  if (rank_one) {
    // s = lv^T X rv per slice; y -= s * lu ru^T
    at::Tensor s = at::matmul(at::matmul(x, cols.lv), rows.lv);  // (S,)
    y.sub_(at::mul(s.view({S, 1, 1}), at::outer(rows.lu, cols.lu)));
  }
}

template <typename acc_t>
void run(const at::Tensor& in, at::Tensor& out, const AxisOp& rows, const AxisOp& cols, const at::Tensor& scale,
         const at::Tensor& shift) {
  const int64_t channels = in.size(1), slices = in.size(0) * channels;
  const int64_t Hi = in.size(2), Wi = in.size(3), Ho = out.size(2), Wo = out.size(3);
  const bool rank_one = rows.has_imag() && cols.has_imag();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor in3 = in.view({slices, Hi, Wi});
  at::Tensor out3 = out.view({slices, Ho, Wo});
  const bool convert_in = in.scalar_type() != acc, convert_out = out.scalar_type() != acc;
  at::parallel_for(0, slices, kSlicesPerStep, [&](int64_t begin, int64_t end) {
    // Grad mode is thread-local and the workers do not inherit the caller's guard.
    const at::NoGradGuard no_grad;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto opts = in.options().dtype(acc);
    Scratch scratch(kSlicesPerStep, Hi, Wi, Ho, Wo, opts);
    at::Tensor xbuf = convert_in ? at::empty({kSlicesPerStep, Hi, Wi}, opts) : at::Tensor();
    at::Tensor ybuf = convert_out ? at::empty({kSlicesPerStep, Ho, Wo}, opts) : at::Tensor();
    for (int64_t s0 = begin; s0 < end; s0 += kSlicesPerStep) {
      const int64_t S = std::min(kSlicesPerStep, end - s0);
      at::Tensor x = in3.narrow(0, s0, S);
      if (convert_in) x = xbuf.narrow(0, 0, S).copy_(x);
      at::Tensor y = convert_out ? ybuf.narrow(0, 0, S) : out3.narrow(0, s0, S);
      apply_step<acc_t>(x, y, rows, cols, rank_one, scratch);
      if (scale.defined() || shift.defined()) {
        // channel of slice s is s % C: build the (S,) per-slice factors
        at::Tensor ch = at::arange(s0, s0 + S, in.options().dtype(at::kLong)).remainder_(channels);
        if (scale.defined()) y.mul_(scale.index_select(0, ch).view({S, 1, 1}));
        if (shift.defined()) y.add_(shift.index_select(0, ch).view({S, 1, 1}));
      }
      if (convert_out) out3.narrow(0, s0, S).copy_(y);
    }
  });
}

// The calling thread's FFT scratch for this geometry, kept between calls when it
// is small (about 1 MB for 224 x 224 float32), so that a call on one image -- a
// DataLoader worker's case -- does not allocate and zero it again; rebuilt when
// the shape changes.  Reuse is safe: the kernel relies only on the zero lanes it
// never writes.  Larger scratch (big images) is allocated per call instead of
// being held by every thread.
constexpr int64_t kCachedWorkspaceBytes = 16 << 20;

template <typename acc_t>
fft_lanes::Workspace<acc_t>* cached_workspace(const fft_lanes::SliceGeometry<acc_t>& g) {
  thread_local std::unique_ptr<fft_lanes::Workspace<acc_t>> ws;
  thread_local std::array<int64_t, 4> shape{-1, -1, -1, -1};
  const std::array<int64_t, 4> want{g.Hi, g.Wi, g.Ho, g.Wo};
  if (ws && shape == want) return ws.get();
  ws.reset();
  shape = {-1, -1, -1, -1};
  if (fft_lanes::Workspace<acc_t>::bytes(g) > kCachedWorkspaceBytes) return nullptr;
  ws = std::make_unique<fft_lanes::Workspace<acc_t>>(g);
  shape = want;
  return ws.get();
}

// The FFT path: one slice at a time through fft_lanes::crop_slice.
template <typename acc_t>
void run_fft(const CropCall& call, at::Tensor& out) {
  const at::Tensor& in = call.x;
  const int64_t channels = in.size(1), slices = in.size(0) * channels;
  const int64_t Hi = in.size(2), Wi = in.size(3), Ho = out.size(2), Wo = out.size(3);
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  fft_lanes::SliceGeometry<acc_t> g{Hi, Wi, Ho, Wo, &fft_lanes::axis_plan<acc_t>(Hi, Ho),
                                    &fft_lanes::axis_plan<acc_t>(Wi, Wo)};
  if (call.rows->has_imag() && call.cols->has_imag()) {
    g.lu_rows = call.rows->lu.data_ptr<acc_t>();
    g.lv_rows = call.rows->lv.data_ptr<acc_t>();
    g.lu_cols = call.cols->lu.data_ptr<acc_t>();
    g.lv_cols = call.cols->lv.data_ptr<acc_t>();
  }
  const acc_t* scale = call.scale.defined() ? call.scale.data_ptr<acc_t>() : nullptr;
  const acc_t* shift = call.shift.defined() ? call.shift.data_ptr<acc_t>() : nullptr;
  at::Tensor in3 = in.view({slices, Hi, Wi});
  at::Tensor out3 = out.view({slices, Ho, Wo});
  const bool convert_in = in.scalar_type() != acc, convert_out = out.scalar_type() != acc;
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto opts = in.options().dtype(acc);
    std::unique_ptr<fft_lanes::Workspace<acc_t>> own;
    fft_lanes::Workspace<acc_t>* cached = cached_workspace(g);
    if (cached == nullptr) own = std::make_unique<fft_lanes::Workspace<acc_t>>(g);
    fft_lanes::Workspace<acc_t>& ws = cached != nullptr ? *cached : *own;
    at::Tensor xbuf = convert_in ? at::empty({Hi, Wi}, opts) : at::Tensor();
    at::Tensor ybuf = convert_out ? at::empty({Ho, Wo}, opts) : at::Tensor();
    for (int64_t s = begin; s < end; ++s) {
      const acc_t* x = convert_in ? xbuf.copy_(in3[s]).data_ptr<acc_t>() : in3.data_ptr<acc_t>() + s * Hi * Wi;
      acc_t* y = convert_out ? ybuf.data_ptr<acc_t>() : out3.data_ptr<acc_t>() + s * Ho * Wo;
      const int64_t c = s % channels;
      const fft_lanes::SliceJob<acc_t> job{x, y, scale ? scale[c] : acc_t(1), shift ? shift[c] : acc_t(0)};
      fft_lanes::crop_slice<acc_t>(g, job, ws);
      if (convert_out) out3[s].copy_(ybuf);
    }
  });
}

// The rule between the algorithms, in "GEMM flop" units per slice.  Measured on
// the 2-core AVX-512 CI machine (docs/benchmarks.md has the check): for smooth sizes
// the FFT path runs at about half the GEMM's flop rate, and the GEMM path pays a
// fixed ATen/BLAS call overhead per slice that dominates small images (28x28).
constexpr double kFftFlopCost = 2.2;           // one FFT flop costs this many GEMM flops
constexpr double kGemmOverheadFlops = 4.0e5;   // per-slice call overhead of the GEMM path

double gemm_flops(int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo) {
  // even/odd halves: Hi x Wi @ Wi x Wo, then Ho x Hi @ Hi x Wo, each at half cost
  return static_cast<double>(Hi * Wi * Wo + Ho * Hi * Wo);
}

double fft_flops(int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo) {
  auto axis = [](int64_t n_in, int64_t n_out) {
    return n_in == n_out ? 0.0 : fft_lanes::transform_flops(n_in) + fft_lanes::transform_flops(n_out);
  };
  // two half-slices per complex transform
  return 0.5 * (static_cast<double>(Wi) * axis(Hi, Ho) + static_cast<double>(Ho) * axis(Wi, Wo));
}

bool use_fft(int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo) {
  const char* env = std::getenv("EFFKERN_FFT_CROP_CPU");
  if (env != nullptr && std::strcmp(env, "fft") == 0) return true;
  if (env != nullptr && std::strcmp(env, "gemm") == 0) return false;
  return kFftFlopCost * fft_flops(Hi, Wi, Ho, Wo) < gemm_flops(Hi, Wi, Ho, Wo) + kGemmOverheadFlops;
}

}  // namespace

const char* fft_crop_cpu_algorithm(int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo) {
  return use_fft(Hi, Wi, Ho, Wo) ? "fft" : "gemm";
}

namespace {

// Applies the separable map (rows: H -> Ho, cols: W -> Wo) to every slice of x.
at::Tensor apply(const CropCall& call) {
  const at::Tensor& x = call.x;
  at::Tensor out = at::empty({x.size(0), x.size(1), call.Ho, call.Wo}, x.options().dtype(call.out_dtype));
  if (out.numel() == 0) return out;
  const bool fft = use_fft(x.size(2), x.size(3), call.Ho, call.Wo);
  if (call.acc == at::kDouble) {
    if (fft) run_fft<double>(call, out);
    else run<double>(x, out, *call.rows, *call.cols, call.scale, call.shift);
  } else {
    if (fft) run_fft<float>(call, out);
    else run<float>(x, out, *call.rows, *call.cols, call.scale, call.shift);
  }
  return out;
}

at::Tensor fft_crop_cpu(const at::Tensor& x, at::IntArrayRef size, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& std) {
  const at::NoGradGuard no_grad;  // the kernel's own ATen calls are not part of the autograd graph
  return apply(prepare_fft_crop(x, size, mean, std));
}

at::Tensor fft_crop_backward_cpu(const at::Tensor& grad, at::IntArrayRef input_size,
                                 const std::optional<at::Tensor>& std) {
  const at::NoGradGuard no_grad;
  return apply(prepare_fft_crop_backward(grad, input_size, std));
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern, CPU, m) {
  m.impl("fft_crop", &fft_crop_cpu);
  m.impl("fft_crop_backward", &fft_crop_backward_cpu);
}

}  // namespace effkern
