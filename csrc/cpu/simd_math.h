// Vector math shared by the CPU kernels: exp on 16 lanes (AVX-512 builds) or 8 (AVX2 builds) with the same
// constants; callers keep a scalar path for other machines.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace smolvlm_cpu {

// exp(x) = 2^n e^r with n = round(x log2 e), r = x - n ln2 (ln2 split in two for exactness, |r| <= ln2 / 2), and
// Cephes expf's degree-6 polynomial for e^r: within a few ulp.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpMin = -87.33f;  // e^-87.3: the smallest normal float
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// gelu_tanh(z) = 0.5 z (1 + tanh u), u = sqrt(2/pi) (z + 0.044715 z^3), computed as z / (1 + exp(-2u)) (the same
// value: 1 + tanh u = 2 / (1 + e^-2u)) so that z -> -inf does not cancel 1 + tanh u near -1. exp's argument is
// clamped to [kGeluExpLo, kGeluExpHi]: e^88 < FLT_MAX, so 1 + exp(-2u) stays finite, and e^-80 is a normal float
// (a denormal from exp would cost a microcode assist per lane; 1 + e^-80 is 1 all the same).
constexpr float kGeluC0 = 0.7978845608028654f;             // sqrt(2 / pi)
constexpr float kGeluC1 = 0.044715f * 0.7978845608028654f;  // 0.044715 sqrt(2 / pi)
constexpr float kGeluExpLo = -80.f, kGeluExpHi = 88.f;

inline float gelu1(float z) {
    const float u = z * (kGeluC0 + kGeluC1 * z * z);
    return z / (1.f + std::exp(std::min(kGeluExpHi, std::max(kGeluExpLo, -2.f * u))));
}

#if defined(__AVX512F__)
// exp(x) for 16 lanes; scalef takes very negative x smoothly to 0 and very large x to +inf.
inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

inline __m512 gelu16(__m512 z) {
    const __m512 u = _mm512_mul_ps(z, _mm512_fmadd_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(kGeluC1),
                                                      _mm512_set1_ps(kGeluC0)));
    __m512 a = _mm512_mul_ps(u, _mm512_set1_ps(-2.f));
    a = _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(kGeluExpLo)), _mm512_set1_ps(kGeluExpHi));
    return _mm512_div_ps(z, _mm512_add_ps(exp16(a), _mm512_set1_ps(1.f)));
}

// Lanes below n (n <= 16) of a 16-lane group.
inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}
#endif

#if SMOLVLM_AVX2
// exp(x) for 8 lanes (AVX2 builds): the same polynomial; exactly 0 below kExpMin (no denormals), NaN stays NaN.
inline __m256 exp8(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_NLT_UQ);
    // clamped so that 2^n is a normal float (no scalef here); the lanes below kExpMin are zeroed at the end
    const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpMin)), _mm256_set1_ps(88.3f));
    const __m256 n =
        _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_and_ps(y, keep);  // NaN in, NaN out
}
#endif

}  // namespace smolvlm_cpu
