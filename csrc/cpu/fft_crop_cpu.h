// fft_crop_cpu.h -- what the CPU fft_crop kernel will do for a shape (for
// build_info, the benchmarks and the tests).
#pragma once

#include <cstdint>

namespace effkern {

// "fft" or "gemm": the algorithm the CPU kernel picks for (Hi, Wi) -> (Ho, Wo)
// (EFFKERN_FFT_CROP_CPU=fft|gemm overrides the rule).
const char* fft_crop_cpu_algorithm(int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo);

}  // namespace effkern
