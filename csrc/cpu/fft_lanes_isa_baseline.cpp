// fft_lanes_isa_baseline.cpp -- the FFT-path kernels with the compiler's default
// instruction set (the fallback on every machine).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/fft_lanes_isa.h"

#define EFFKERN_ISA_AVX2 0
#define EFFKERN_ISA_NS baseline
#include "cpu/fft_lanes_kernels.inc"
#undef EFFKERN_ISA_NS
#undef EFFKERN_ISA_AVX2
