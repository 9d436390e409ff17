// CPU matrix products with int4 (Int4Weight), int8 (GGUF Q8_0) and float32 weights: out[M, N] = x[M, K] @ W[N, K]^T,
// accumulated in float32 (x is never quantized, except by int4_gemm_int8). Layouts: smolvlm_fast/formats/int4.py's docstring.
// The caller (bindings.cpp) checks every argument; these functions trust them.
#pragma once

#include <cstdint>

namespace smolvlm_cpu {

struct Int4Matrix {
    const uint8_t* qweight;   // [N, K / 2], 32-element blocks: byte j = element j (low nibble), j + 16 (high)
    const uint16_t* scales;   // float16 bits [N, K / group_size]
    const uint16_t* mins;     // float16 bits [N, K / group_size]; nullptr: symmetric, w = d * (q - 8)
    int64_t N, K;
    int group_size;           // 32, 64 or 128
};

struct Q8Matrix {
    const int8_t* q;          // [N, K]
    const uint16_t* scales;   // float16 bits [N, K / 32]
    int64_t N, K;
};

struct F32Matrix {
    const float* w;           // [N, K]
    int64_t N, K;
};

void int4_gemm(const float* x, int64_t M, const Int4Matrix& w, float* out);
// The same product with each 32-element block of x rounded to int8 (scale max|x| / 127, llama.cpp's Q8_0 for
// activations) and integer dot products (AVX512-VNNI): ~2x faster decode, at ~1e-3 relative error in out.
// Returns false, doing nothing, where this build has no VNNI.
bool int4_gemm_int8(const float* x, int64_t M, const Int4Matrix& w, float* out);
void q8_gemm(const float* x, int64_t M, const Q8Matrix& w, float* out);
// Float32 weights, for the fused decode step (decoder_step.cpp) on float checkpoints: few rows of x, where
// NumPy's BLAS would cost a Python call per product.
void f32_gemm(const float* x, int64_t M, const F32Matrix& w, float* out);
// out [N, K] = W as float32, on the calling thread only (prefill dequantizes a chunk of rows and hands it to
// BLAS, whose threads would compete with ours).
void int4_dequantize(const Int4Matrix& w, float* out);
void q8_dequantize(const Q8Matrix& w, float* out);

const char* simd_name();      // "avx512", "avx2" or "scalar": what this build was compiled for

}  // namespace smolvlm_cpu
