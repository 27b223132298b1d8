// effkern.cpp -- the effkern operator library: schemas (declared once, here) and
// the Python module effkern._C (build information only; the ops are reached
// through torch.ops.effkern.* and the wrappers in effkern/ops/).
#include <torch/extension.h>
#include <torch/library.h>

#ifndef EFFKERN_VERSION
#define EFFKERN_VERSION "unknown"
#endif
#ifndef EFFKERN_CUDA_ARCH_LIST
#define EFFKERN_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(effkern, m) {
  m.def("fft_crop(Tensor x, int[2] size, Tensor? mean=None, Tensor? std=None) -> Tensor");
  m.def("fft_crop_backward(Tensor grad, int[2] input_size, Tensor? std=None) -> Tensor");
}

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = EFFKERN_VERSION;
  info["cpu_kernels"] = true;
#ifdef EFFKERN_WITH_CUDA
  info["cuda_kernels"] = true;
  info["cuda_arch_list"] = EFFKERN_CUDA_ARCH_LIST;
#else
  info["cuda_kernels"] = false;
  info["cuda_arch_list"] = "";
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "effkern compiled kernels (C++ CPU, CUDA); ops live under torch.ops.effkern";
  module.def("build_info", &build_info, "What this extension was compiled with.");
}
