// fft_crop_cuda.cpp -- CUDA dispatch of effkern::fft_crop / fft_crop_backward:
// argument checks, cached crop matrices on the device, then one launch of the
// fused tensor-core kernel (fft_crop_tc_kernel.cu) when the call fits it (sm_80+,
// H and the output height <= 256, its shared memory within the device's limit),
// else the two SIMT launches (fft_crop_kernel.cu).  float64 runs the same math
// through ATen matmuls.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/sub.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>

#include "cuda/fft_crop_kernel.h"
#include "cuda/fft_crop_tc_kernel.h"
#include "fft_crop_args.h"
#include "fft_crop_plan.h"

namespace effkern {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kByte: return DType::kUInt8;
    default: TORCH_CHECK(false, "fft_crop (CUDA): unsupported dtype ", t);
  }
}

// float64: same math with ATen (the CUDA kernels accumulate in fp32).
at::Tensor apply_double(const at::Tensor& x, const AxisOp& rows, const AxisOp& cols, const at::Tensor& scale,
                        const at::Tensor& shift) {
  at::Tensor y = at::matmul(rows.L, at::matmul(x, cols.L.t()));
  if (rows.has_imag() && cols.has_imag()) {
    at::Tensor s = at::matmul(at::matmul(x, cols.lv), rows.lv);  // (N, C)
    y = at::sub(y, at::mul(s.unsqueeze(-1).unsqueeze(-1), at::outer(rows.lu, cols.lu)));
  }
  if (scale.defined()) y = at::mul(y, scale.view({-1, 1, 1}));
  if (shift.defined()) y = at::add(y, shift.view({-1, 1, 1}));
  return y;
}

at::ScalarType to_scalar_type(DType t) {
  switch (t) {
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kUInt8: return at::kByte;
    default: return at::kFloat;
  }
}

// A cached plan matrix (fp32, lives as long as the process) in another dtype, cached
// by the fp32 tensor's address: the tensor-core kernel's half-precision operands.
// low = true: the rounding remainder instead, dtype(L - dtype(L)) (L - dtype(L) is
// exact in fp32).
const at::Tensor& matrix_as(const at::Tensor& L, at::ScalarType dtype, bool low = false) {
  if (L.scalar_type() == dtype && !low) return L;
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, bool>, at::Tensor> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const std::tuple<const void*, int, bool> key{L.data_ptr(), static_cast<int>(dtype), low};
  auto it = cache.find(key);
  if (it == cache.end()) {
    at::Tensor hi = L.to(dtype);
    at::Tensor m = low ? at::sub(L, hi.to(L.scalar_type())).to(dtype) : hi;
    it = cache.emplace(key, m.contiguous()).first;
    // Once per matrix: the copy ran on this stream; other streams may read it next.
    at::cuda::getCurrentCUDAStream().synchronize();
  }
  return it->second;
}

// The fused tensor-core kernel, when the call and the device allow it; false: use the SIMT path.
bool launch_fused(const CropCall& call, at::Tensor& out, cudaStream_t stream) {
  const at::Tensor& x = call.x;
  const AxisOp &rows = *call.rows, &cols = *call.cols;
  const bool rank_one = rows.has_imag() && cols.has_imag();
  FftCropTcArgs args{};
  args.x = x.data_ptr();
  args.y = out.data_ptr();
  args.in_dtype = to_dtype(x.scalar_type());
  args.out_dtype = to_dtype(call.out_dtype);
  // torch's CUDA matmul precision "tf32" (torch.backends.cuda.matmul.fp32_precision, also
  // set by allow_tf32 = True or set_float32_matmul_precision("high")): one TF32 pass;
  // otherwise float32 accuracy (split operands).  Not allowTF32CuBLAS(): it throws when
  // the legacy and the new API were both used.
  args.tf32_single_pass = at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                          at::Float32Precision::TF32;
  DType lh_dtype, lw_dtype;
  bool lw_split = false;
  fft_crop_tc_matrix_dtypes(args.in_dtype, args.tf32_single_pass, &lh_dtype, &lw_dtype, &lw_split);
  args.Lh = matrix_as(rows.L, to_scalar_type(lh_dtype)).data_ptr();
  args.Lw = matrix_as(cols.L, to_scalar_type(lw_dtype)).data_ptr();
  args.Lw_lo = lw_split ? matrix_as(cols.L, to_scalar_type(lw_dtype), true).data_ptr() : nullptr;
  if (rank_one) {
    args.lu_h = rows.lu.data_ptr<float>();
    args.lv_h = rows.lv.data_ptr<float>();
    args.lu_w = cols.lu.data_ptr<float>();
    args.lv_w = cols.lv.data_ptr<float>();
  }
  args.scale = call.scale.defined() ? call.scale.data_ptr<float>() : nullptr;
  args.shift = call.shift.defined() ? call.shift.data_ptr<float>() : nullptr;
  args.slices = x.size(0) * x.size(1);
  args.channels = x.size(1);
  args.Hi = x.size(2);
  args.Wi = x.size(3);
  args.Ho = call.Ho;
  args.Wo = call.Wo;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const size_t smem = fft_crop_tc_smem_bytes(args);
  if (prop->major < 8 || smem == 0 || smem > prop->sharedMemPerBlockOptin) return false;
  C10_CUDA_CHECK(launch_fft_crop_tc(args, stream));
  return true;
}

at::Tensor apply(const CropCall& call) {
  const c10::cuda::CUDAGuard guard(call.x.device());
  const at::Tensor& x = call.x;
  const AxisOp &rows = *call.rows, &cols = *call.cols;
  const at::Tensor &scale = call.scale, &shift = call.shift;
  const int64_t H = x.size(2), W = x.size(3), Ho = call.Ho, Wo = call.Wo;
  const at::ScalarType out_dtype = call.out_dtype;
  if (call.acc == at::kDouble) return apply_double(x, rows, cols, scale, shift).contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), Ho, Wo}, x.options().dtype(out_dtype));
  const int64_t slices = x.size(0) * x.size(1);
  if (slices == 0) return out;
  const bool rank_one = rows.has_imag() && cols.has_imag();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (launch_fused(call, out, stream)) return out;
  // Rx = [R; rv^T]: stage 1 then also produces X rv in its last column.
  at::Tensor rx = rank_one ? at::cat({cols.L, cols.lv.unsqueeze(0)}, 0).contiguous() : cols.L;
  const int64_t nt = rx.size(0);
  at::Tensor t = at::empty({slices, H, nt}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_fft_crop_stage1(x.data_ptr(), to_dtype(x.scalar_type()), rx.data_ptr<float>(),
                                        t.data_ptr<float>(), slices, H, W, nt, stream));
  C10_CUDA_CHECK(launch_fft_crop_stage2(
      rows.L.data_ptr<float>(), t.data_ptr<float>(), out.data_ptr(), to_dtype(out_dtype), slices, x.size(1), Ho, H,
      Wo, nt, rank_one ? rows.lu.data_ptr<float>() : nullptr, rank_one ? rows.lv.data_ptr<float>() : nullptr,
      rank_one ? cols.lu.data_ptr<float>() : nullptr, scale.defined() ? scale.data_ptr<float>() : nullptr,
      shift.defined() ? shift.data_ptr<float>() : nullptr, stream));
  return out;
}

at::Tensor fft_crop_cuda(const at::Tensor& x, at::IntArrayRef size, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& std) {
  const at::NoGradGuard no_grad;  // the kernel's own ATen calls are not part of the autograd graph
  return apply(prepare_fft_crop(x, size, mean, std));
}

at::Tensor fft_crop_backward_cuda(const at::Tensor& grad, at::IntArrayRef input_size,
                                 const std::optional<at::Tensor>& std) {
  const at::NoGradGuard no_grad;
  return apply(prepare_fft_crop_backward(grad, input_size, std));
}

}  // namespace

TORCH_LIBRARY_IMPL(effkern, CUDA, m) {
  m.impl("fft_crop", &fft_crop_cuda);
  m.impl("fft_crop_backward", &fft_crop_backward_cuda);
}

}  // namespace effkern
