// IEEE float16 (binary16) <-> float32 for the 16-bit KV cache: the cache holds float16 bits (uint16_t); the
// attention widens them in registers (paged_attention.cpp), the decoder step narrows K/V on their way in
// (decoder_step.cpp). Narrowing rounds to nearest, ties to even, as NumPy's astype(np.float16) does: past 65504
// -> inf, NaN stays NaN. F16C (every SIMD build: simd.h) does both in hardware; the plain path does it in bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace smolvlm_cpu {

inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: normalize
        exp = 113;
        while (!(man & 0x400)) man <<= 1, --exp;
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
    const uint32_t abs = bits & 0x7fffffff;
    if (abs > 0x7f800000) return sign | 0x7e00 | static_cast<uint16_t>((abs >> 13) & 0x3ff);  // NaN, quiet
    if (abs >= 0x477ff000) return sign | 0x7c00;  // >= 65520 rounds past 65504: inf
    if (abs < 0x38800000) {                       // below 2^-14: a subnormal half (or 0)
        if (abs < 0x33000000) return sign;        // <= 2^-25 rounds to 0 (a tie at 2^-25 goes to even 0)
        const uint32_t man = (abs & 0x7fffff) | 0x800000, shift = 126 - (abs >> 23);  // |f| = man 2^-(shift + 24)
        const uint32_t half = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        return sign | static_cast<uint16_t>(half + (rest > mid || (rest == mid && (half & 1))));
    }
    const uint32_t r = abs + 0xfff + ((abs >> 13) & 1);  // ties to even on the 13 bits dropped
    return sign | static_cast<uint16_t>((r - 0x38000000) >> 13);
#endif
}

// dst[i] = f32_to_f16(src[i]) for i < n.
inline void narrow_to_f16(const float* src, int64_t n, uint16_t* dst) {
    int64_t i = 0;
#if SMOLVLM_AVX512
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif SMOLVLM_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

}  // namespace smolvlm_cpu
