// fft_lanes_dispatch.cpp -- picks the instruction-set build of the FFT-path
// kernels once, from the CPU's features (EFFKERN_CPU_ISA may ask for a lower one).
#include <cstdlib>
#include <cstring>

#include "cpu/fft_lanes_isa.h"

namespace effkern::fft_lanes {
namespace {

enum class Isa { baseline, avx2, avx512 };

Isa best_supported() {
#if EFFKERN_FFT_LANES_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

Isa pick() {
  const Isa best = best_supported();
  const char* env = std::getenv("EFFKERN_CPU_ISA");
  if (env == nullptr) return best;
  Isa wanted = best;
  if (std::strcmp(env, "baseline") == 0) wanted = Isa::baseline;
  else if (std::strcmp(env, "avx2") == 0) wanted = Isa::avx2;
  else if (std::strcmp(env, "avx512") == 0) wanted = Isa::avx512;
  return static_cast<int>(wanted) <= static_cast<int>(best) ? wanted : best;
}

Isa active() {
  static const Isa isa = pick();
  return isa;
}

}  // namespace

template <typename T>
void crop_slice(const SliceGeometry<T>& g, const SliceJob<T>& job, Workspace<T>& ws) {
  switch (active()) {
#if EFFKERN_FFT_LANES_X86
    case Isa::avx512: return avx512::crop_slice<T>(g, job, ws);
    case Isa::avx2: return avx2::crop_slice<T>(g, job, ws);
#endif
    default: return baseline::crop_slice<T>(g, job, ws);
  }
}

template void crop_slice<float>(const SliceGeometry<float>&, const SliceJob<float>&, Workspace<float>&);
template void crop_slice<double>(const SliceGeometry<double>&, const SliceJob<double>&, Workspace<double>&);

const char* active_isa() {
  switch (active()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace effkern::fft_lanes
