// Which vector code the CPU kernels compile: SMOLVLM_AVX512 (AVX-512 F/BW/VL with FMA and F16C: Skylake-X and
// later) or SMOLVLM_AVX2 (AVX2 + FMA + F16C), else the plain loops; and the intrinsics header for either.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__)
#define SMOLVLM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SMOLVLM_AVX2 1
#endif

#if defined(__x86_64__) || defined(__i386__)
// GCC 12 flags the deliberately undefined pass-through register of some intrinsics (unpack, maskz loads)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
