// fft_lanes_isa_avx512.cpp -- the FFT-path kernels compiled for AVX-512 (512-bit vectors)
// (x86-64, GCC); picked at run time only on CPUs that have it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/fft_lanes_isa.h"

#if EFFKERN_FFT_LANES_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")
#define EFFKERN_ISA_AVX2 1
#define EFFKERN_ISA_NS avx512
#include "cpu/fft_lanes_kernels.inc"
#undef EFFKERN_ISA_NS
#undef EFFKERN_ISA_AVX2
#pragma GCC pop_options
#endif
