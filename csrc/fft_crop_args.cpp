// fft_crop_args.cpp -- see fft_crop_args.h.
#include "fft_crop_args.h"

#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/reciprocal.h>

namespace effkern {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_fft_crop(const at::Tensor& x, at::IntArrayRef size, const std::optional<at::Tensor>& mean,
                    const std::optional<at::Tensor>& std) {
  TORCH_CHECK(x.dim() == 4, "fft_crop: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()) || x.scalar_type() == at::kByte,
              "fft_crop: x must be float32/float64/float16/bfloat16 or uint8, got ", x.scalar_type());
  TORCH_CHECK(size.size() == 2, "fft_crop: size must be (h, w)");
  TORCH_CHECK(size[0] >= 1 && size[1] >= 1 && size[0] <= x.size(2) && size[1] <= x.size(3),
              "fft_crop: size ", size, " must be within [1, (H, W)] = ", x.sizes().slice(2));
  TORCH_CHECK(mean.has_value() == std.has_value(), "fft_crop: mean and std must be given together");
  TORCH_CHECK(is_float(x.scalar_type()) || mean.has_value(),
              "fft_crop: integer x needs mean and std (it is normalised as (x/255 - mean)/std)");
  if (mean.has_value()) {
    for (const at::Tensor* t : {&*mean, &*std}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "fft_crop: mean/std must have shape (C,) = (",
                  x.size(1), ",), got ", t->sizes());
      TORCH_CHECK(t->device() == x.device(), "fft_crop: mean/std must be on x's device");
      TORCH_CHECK(is_float(t->scalar_type()), "fft_crop: mean/std must be floating point");
    }
  }
}

void check_fft_crop_backward(const at::Tensor& grad, at::IntArrayRef input_size, const std::optional<at::Tensor>& std) {
  TORCH_CHECK(grad.dim() == 4, "fft_crop_backward: grad must be 4-D, got ", grad.sizes());
  TORCH_CHECK(is_float(grad.scalar_type()), "fft_crop_backward: grad must be floating point");
  TORCH_CHECK(grad.size(2) >= 1 && grad.size(3) >= 1, "fft_crop_backward: grad's spatial size must be >= 1, got ",
              grad.sizes().slice(2));
  TORCH_CHECK(input_size.size() == 2 && input_size[0] >= grad.size(2) && input_size[1] >= grad.size(3),
              "fft_crop_backward: input_size ", input_size, " must be >= the grad's spatial size");
  if (std.has_value()) {
    TORCH_CHECK(std->dim() == 1 && std->size(0) == grad.size(1) && std->device() == grad.device(),
                "fft_crop_backward: std must have shape (C,) on grad's device");
  }
}

at::ScalarType compute_dtype(at::ScalarType data) { return data == at::kDouble ? at::kDouble : at::kFloat; }

at::ScalarType output_dtype(at::ScalarType x) { return x == at::kByte ? at::kFloat : x; }

std::pair<at::Tensor, at::Tensor> channel_affine(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                                                 const std::optional<at::Tensor>& std, at::ScalarType dtype) {
  if (!mean.has_value()) return {at::Tensor(), at::Tensor()};
  const double base = x.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  at::Tensor inv_std = at::reciprocal(std->to(dtype));
  at::Tensor scale = at::mul(inv_std, base).contiguous();
  at::Tensor shift = at::mul(at::neg(mean->to(dtype)), inv_std).contiguous();
  return {scale, shift};
}

namespace {

// Forward: the crop H -> Ho per axis; adjoint: the transpose of the crop Ho -> H.
CropCall make_call(const at::Tensor& x, int64_t Ho, int64_t Wo, bool adjoint, at::ScalarType out_dtype,
                   at::Tensor scale, at::Tensor shift) {
  CropCall call{x.contiguous(), Ho, Wo, out_dtype, compute_dtype(x.scalar_type()), nullptr, nullptr,
                std::move(scale), std::move(shift)};
  const int64_t H = x.size(2), W = x.size(3);
  const at::Device device = x.device();
  call.rows = adjoint ? &crop_axis(Ho, H, true, call.acc, device) : &crop_axis(H, Ho, false, call.acc, device);
  call.cols = adjoint ? &crop_axis(Wo, W, true, call.acc, device) : &crop_axis(W, Wo, false, call.acc, device);
  return call;
}

}  // namespace

CropCall prepare_fft_crop(const at::Tensor& x, at::IntArrayRef size, const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& std) {
  check_fft_crop(x, size, mean, std);
  const at::ScalarType out = output_dtype(x.scalar_type());
  auto [scale, shift] = channel_affine(x, mean, std, compute_dtype(out));
  return make_call(x, size[0], size[1], false, out, scale, shift);
}

CropCall prepare_fft_crop_backward(const at::Tensor& grad, at::IntArrayRef input_size,
                                   const std::optional<at::Tensor>& std) {
  check_fft_crop_backward(grad, input_size, std);
  at::Tensor scale = std.has_value() ? at::reciprocal(std->to(compute_dtype(grad.scalar_type()))).contiguous()
                                     : at::Tensor();
  return make_call(grad, input_size[0], input_size[1], true, grad.scalar_type(), scale, at::Tensor());
}

}  // namespace effkern
