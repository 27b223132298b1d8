// python_module.cpp -- the Python module effkern._C.  It carries build
// information only: the ops register with the dispatcher when the library loads
// (effkern_ops.cpp) and are reached through torch.ops.effkern.* and effkern.ops.
#include <torch/extension.h>

#include "cpu/fft_crop_cpu.h"
#include "cpu/fft_lanes.h"

#ifndef EFFKERN_VERSION
#define EFFKERN_VERSION "unknown"
#endif
#ifndef EFFKERN_CUDA_ARCH_LIST
#define EFFKERN_CUDA_ARCH_LIST ""
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = EFFKERN_VERSION;
  info["cpu_kernels"] = true;
  info["cpu_isa"] = effkern::fft_lanes::active_isa();
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
  module.def("fft_crop_cpu_algorithm", &effkern::fft_crop_cpu_algorithm, py::arg("H"), py::arg("W"), py::arg("h"),
             py::arg("w"), "The algorithm ('fft' or 'gemm') the CPU fft_crop kernel uses for (H, W) -> (h, w).");
}
