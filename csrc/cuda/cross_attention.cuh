// cross_attention for decode: text queries over the cached image keys/values of their batch row, not causal, with
// padded image tokens masked by kv_lens. The kernel is decode_attention.cuh's with dense K/V addressing: one query
// token (b, s) per grid row, the GQA heads of a KV head sharing each loaded image key, the image tokens split across
// thread blocks when B * Hkv blocks alone would leave the GPU idle.
//
//   q    [B * S, Hq, Dh] (token b * S + s)    out likewise (q's dtype)
//   k, v [B, T, Hkv, Dh], head_dim contiguous, strides in elements      kv_lens [B] int32 / int64, or 0
// A batch row with kv_len 0 gets zeros (the reference's "no image tokens, no update").
// Declarations only (host C++): bindings.cpp includes this file.
#pragma once

#include <cstdint>

namespace smolvlm_cuda {

void cross_attention(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t kv_lens,
                     std::uintptr_t partial_acc, std::uintptr_t partial_max, std::uintptr_t partial_sum,
                     int64_t batch, int64_t queries_per_batch, int64_t kv_tokens, int64_t num_q_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t stride_qt, int64_t stride_qh, int64_t stride_ot,
                     int64_t stride_oh, int64_t stride_kb, int64_t stride_kt, int64_t stride_kh, int64_t stride_vb,
                     int64_t stride_vt, int64_t stride_vh, bool kv_lens_int64, double scale, int64_t split_size,
                     int64_t num_splits, int dtype, int device, std::uintptr_t stream);

}  // namespace smolvlm_cuda
