// int4_gemm for decode: y [M, N] = x [M, K] @ dequantize(w).T (+ bias), M = 1..16, fp16 / bf16 x, fp32 accumulation.
//
// The weight is smolvlm_fast.quant.Int4Weight's layout (the Triton kernel reads the same bytes):
//   qweight uint8 [N, K/2]   each row K/32 blocks of 16 bytes; byte j of a block holds element j (low nibble) and
//                            element j + 16 (high nibble) of the block's 32
//   scales  fp16  [N, K/G]   d        mins fp16 [N, K/G] m (asymmetric), or none (symmetric)
//   asymmetric: w = d * q + m          symmetric: w = d * (q - 8)          G = group_size in {32, 64, 128}
// Declarations only (host C++): bindings.cpp includes this file.
#pragma once

#include <cstdint>

namespace smolvlm_cuda {

// Rows of x one launch takes (ops/cuda.py hands larger M to the next implementation).
constexpr int kInt4GemmMaxM = 16;

// All pointers are device addresses (0 for none). Sizes and strides in elements, except stride_q in bytes.
//   y       [M, N] of x's dtype, row stride stride_y         x [M, K], row stride stride_x (16-byte aligned rows)
//   mins    0 means symmetric                                 bias [N] (bias_dtype) or 0
//   splits  slices of K run by separate thread blocks; with splits > 1, workspace is fp32 [splits, M, N]
//           (contiguous) for their partial sums, added in a second kernel in a fixed order (deterministic)
//   dtype   x's and y's dtype code (1 fp16, 2 bf16)
void int4_gemm(std::uintptr_t y, std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t mins,
               std::uintptr_t bias, std::uintptr_t workspace, int64_t M, int64_t N, int64_t K, int64_t group_size,
               int64_t stride_y, int64_t stride_x, int64_t stride_q, int64_t stride_s, int dtype, int bias_dtype,
               int64_t splits, int device, std::uintptr_t stream);

}  // namespace smolvlm_cuda
