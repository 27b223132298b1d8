// fft_crop_args.h -- argument checks and the fused normalisation, shared by the
// CPU and CUDA implementations of effkern::fft_crop / fft_crop_backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "fft_crop_plan.h"

namespace effkern {

// Checks x (N, C, H, W), size (h, w) with 1 <= h <= H, 1 <= w <= W, and mean/std
// (C,) given together (required for integer x).
void check_fft_crop(const at::Tensor& x, at::IntArrayRef size, const std::optional<at::Tensor>& mean,
                    const std::optional<at::Tensor>& std);
void check_fft_crop_backward(const at::Tensor& grad, at::IntArrayRef input_size,
                             const std::optional<at::Tensor>& std);

// The dtype the kernels compute in: float64 for float64 data, float32 otherwise.
at::ScalarType compute_dtype(at::ScalarType data);
// The output dtype of fft_crop: x's dtype, float32 for uint8.
at::ScalarType output_dtype(at::ScalarType x);

// Per-channel (scale, shift) such that y = crop(x) * scale + shift implements
// (x/255 - mean)/std for uint8 x and (x - mean)/std for float x.  Exact because
// the crop preserves constants (it keeps the DC term and rescales by h*w/(H*W)).
// Undefined tensors when mean/std are absent.
std::pair<at::Tensor, at::Tensor> channel_affine(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                                                 const std::optional<at::Tensor>& std, at::ScalarType dtype);

// One call of the separable crop map, checked and ready for a device's kernel:
// out (N, C, Ho, Wo) = rows.L x cols.L^T (- the rank-one term), then
// * scale[c] + shift[c].  rows/cols are the crop's axes (forward) or their
// transposes (adjoint), cached on x's device in the accumulation dtype.
struct CropCall {
  at::Tensor x;             // contiguous
  int64_t Ho, Wo;
  at::ScalarType out_dtype;
  at::ScalarType acc;       // float64 for float64 data, float32 otherwise
  const AxisOp* rows;       // H -> Ho
  const AxisOp* cols;       // W -> Wo
  at::Tensor scale, shift;  // undefined: identity
};

// fft_crop(x, size, mean, std): checks the arguments, folds the normalisation.
CropCall prepare_fft_crop(const at::Tensor& x, at::IntArrayRef size, const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& std);
// fft_crop_backward(grad, input_size, std): the adjoint applied to grad / std.
CropCall prepare_fft_crop_backward(const at::Tensor& grad, at::IntArrayRef input_size,
                                   const std::optional<at::Tensor>& std);

}  // namespace effkern
