// fft_lanes_isa.h -- the per-instruction-set builds of the FFT-path kernels.
//
// fft_lanes_kernels.inc is compiled three times: for AVX-512 and AVX2+FMA (x86-64
// with GCC, through `#pragma GCC target`, so no special compiler flags and no
// global -march) and once with the default flags (every machine).  The
// dispatcher (fft_lanes_dispatch.cpp) picks one at run time.
#pragma once

#include "cpu/fft_lanes.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFFKERN_FFT_LANES_X86 1
#else
#define EFFKERN_FFT_LANES_X86 0
#endif

namespace effkern::fft_lanes {

#define EFFKERN_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                             \
  template <typename T>                                                                      \
  void crop_slice(const SliceGeometry<T>& g, const SliceJob<T>& job, Workspace<T>& ws);      \
  }

EFFKERN_DECLARE_ISA(baseline)
#if EFFKERN_FFT_LANES_X86
EFFKERN_DECLARE_ISA(avx2)
EFFKERN_DECLARE_ISA(avx512)
#endif

#undef EFFKERN_DECLARE_ISA

}  // namespace effkern::fft_lanes
