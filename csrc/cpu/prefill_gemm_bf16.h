// The bf16 product (bf16_gemm.h) for weights kept in another format: float32, int4 or Q8_0 (AnyMatrix), for
// the decoder's prefill with GGUF weights. W is dequantized and packed into the bf16 layout a panel of 32 rows at
// a time, by the thread that uses the panel (never whole).
#pragma once

#include <cstdint>

#include "prefill_gemm.h"

namespace smolvlm_cpu {

// out[M, N] = bf16(x[M, K]) @ bf16(W)^T, float32 sums, out overwritten (out and x C-contiguous). False (doing
// nothing) where bf16_isa() is f32: without bf16 dot products prefill_gemm's float32 arithmetic is as fast and
// more exact, so the caller keeps to it.
bool prefill_gemm_bf16(const float* x, int64_t M, const AnyMatrix& w, float* out);

}  // namespace smolvlm_cpu
