// Software fp16 / bf16 for the CUDA emulator (csrc/cuda/emu/cuda_emu.h): __half, __nv_bfloat16 and their pairs as
// 16-bit storage, with the conversions cuda_fp16.h / cuda_bf16.h give the kernels, rounding to nearest even (as the
// _rn intrinsics do), subnormals, infinities and NaN included. Host C++ only; nvcc builds never see this file.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;  // x in the low 16 bits, as in a 32-bit register
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace smolvlm_emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (mag < 0x38800000u) {  // below 2^-14: a subnormal half, units of 2^-24 (the scaling is exact)
    const float units = bits_float(mag) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(units)));  // ties to even
  }
  const uint32_t rounded = mag + 0xfffu + ((mag >> 13) & 1u);  // to nearest even at bit 13; a carry bumps the exponent
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return bits_float(sign | float_bits(static_cast<float>(m) * 5.9604644775390625e-8f));  // m * 2^-24
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN stays a quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace smolvlm_emu

inline float __half2float(__half h) { return smolvlm_emu::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{smolvlm_emu::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return smolvlm_emu::bf16_bits_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{smolvlm_emu::float_to_bf16_bits(f)}; }
inline __half2 __float2half2_rn(float f) { return __half2{__float2half_rn(f), __float2half_rn(f)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float f) {
  return __nv_bfloat162{__float2bfloat16_rn(f), __float2bfloat16_rn(f)};
}

// a - b per half in float, then rounded to 16 bits: exact for the kernels' operands (integers and magic numbers)
inline __half2 __hsub2(__half2 a, __half2 b) {
  auto sub = [](__half p, __half q) {
    return __float2half_rn(__half2float(p) - __half2float(q));
  };
  return __half2{sub(a.x, b.x), sub(a.y, b.y)};
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  auto sub = [](__nv_bfloat16 p, __nv_bfloat16 q) {
    return __float2bfloat16_rn(__bfloat162float(p) - __bfloat162float(q));
  };
  return __nv_bfloat162{sub(a.x, b.x), sub(a.y, b.y)};
}
