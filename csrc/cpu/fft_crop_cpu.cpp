// fft_crop_cpu.cpp -- CPU kernel of effkern::fft_crop and its adjoint.
//
// What: for every (image, channel) slice X (H x W), Y = L X R^T - lu (lv^T X rv) ru^T
// (the crop, or its adjoint, as real matrices: see fft_crop_plan.h), then the
// optional per-channel affine y * scale[c] + shift[c] (fused normalisation).
// Layout: NCHW contiguous in, NCHW contiguous out; the slices are independent.
// Why this shape: the work is two small dense GEMMs per slice (224x224 @ 224x160,
// then 160x224 @ 224x160 for a 224 -> 160 crop).  Slices are spread over threads
// with at::parallel_for; each thread takes a few slices at a time, keeps them
// (converted from uint8/half if needed) and the intermediate X R^T in private
// buffers that stay in L2, and calls the GEMM (single-threaded inside the
// parallel region).  No complex numbers, no FFT plan.
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

#include "fft_crop_args.h"
#include "fft_crop_plan.h"

namespace effkern {
namespace {

// Slices per inner step: small enough that a thread's inputs and intermediates
// stay in L2, large enough to amortise the per-call cost of the GEMM.
constexpr int64_t kSlicesPerStep = 4;

// One thread's chunk of slices [begin, end): y = L x R^T - lu (lv^T x rv) ru^T,
// then the per-channel affine.  x: (S, Hi, Wi) in acc dtype; out: (S, Ho, Wo).
void apply_chunk(const at::Tensor& x, at::Tensor& y, const AxisOp& rows, const AxisOp& cols,
                 bool rank_one, at::Tensor& tmp) {
  const int64_t S = x.size(0), Hi = x.size(1), Wi = x.size(2), Ho = y.size(1), Wo = y.size(2);
  at::Tensor t = tmp.narrow(0, 0, S * Hi);
  at::mm_out(t, x.view({S * Hi, Wi}), cols.L.t());                  // (S*Hi, Wo) = X R^T
  at::matmul_out(y, rows.L, t.view({S, Hi, Wo}));                    // (S, Ho, Wo) = L T
  if (rank_one) {
    // s = lv^T X rv per slice; y -= s * lu ru^T
    at::Tensor s = at::matmul(at::matmul(x, cols.lv), rows.lv);     // (S,)
    y.sub_(at::mul(s.view({S, 1, 1}), at::outer(rows.lu, cols.lu)));
  }
  (void)Ho;
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
    at::Tensor tmp = at::empty({kSlicesPerStep * Hi, Wo}, opts);
    at::Tensor xbuf = convert_in ? at::empty({kSlicesPerStep, Hi, Wi}, opts) : at::Tensor();
    at::Tensor ybuf = convert_out ? at::empty({kSlicesPerStep, Ho, Wo}, opts) : at::Tensor();
    for (int64_t s0 = begin; s0 < end; s0 += kSlicesPerStep) {
      const int64_t S = std::min(kSlicesPerStep, end - s0);
      at::Tensor x = in3.narrow(0, s0, S);
      if (convert_in) x = xbuf.narrow(0, 0, S).copy_(x);
      at::Tensor y = convert_out ? ybuf.narrow(0, 0, S) : out3.narrow(0, s0, S);
      apply_chunk(x, y, rows, cols, rank_one, tmp);
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

// Applies the separable map (rows: H -> Ho, cols: W -> Wo) to every slice of x.
at::Tensor apply(const CropCall& call) {
  const at::Tensor& x = call.x;
  at::Tensor out = at::empty({x.size(0), x.size(1), call.Ho, call.Wo}, x.options().dtype(call.out_dtype));
  if (out.numel() == 0) return out;
  if (call.acc == at::kDouble) {
    run<double>(x, out, *call.rows, *call.cols, call.scale, call.shift);
  } else {
    run<float>(x, out, *call.rows, *call.cols, call.scale, call.shift);
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
