// Matrix products with many rows of x (prefill, the vision encoder): out[M, N] = x[M, K] @ W[N, K]^T, float32
// arithmetic, W float32 or dequantized on the fly from int4 / Q8_0 a small panel at a time (never whole).
#pragma once

#include <cstdint>

#include "quant_gemm.h"

namespace smolvlm_cpu {

// One of f32 / int4 / q8 is set (the others nullptr).
struct AnyMatrix {
    const F32Matrix* f32 = nullptr;
    const Int4Matrix* int4 = nullptr;
    const Q8Matrix* q8 = nullptr;
};

// False (doing nothing) where this build has no AVX-512: the caller keeps to its other path.
bool prefill_gemm(const float* x, int64_t M, const AnyMatrix& w, float* out);

}  // namespace smolvlm_cpu
