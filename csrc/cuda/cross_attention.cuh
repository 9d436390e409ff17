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

// The arguments of cross_attention (Python: _C.CrossAttentionArgs(field=..., ...)); addresses 0 when absent, strides
// in elements, dtypes as codes; the splits as paged_attention.cuh's.
struct CrossAttentionArgs {
  std::uintptr_t out, q;   // [B * S, Hq, Dh]
  std::uintptr_t k, v;     // [B, T, Hkv, Dh]
  std::uintptr_t kv_lens;  // [B] int32 / int64, or 0
  std::uintptr_t partial_acc, partial_max, partial_sum;  // fp32 workspaces when num_splits > 1
  int64_t batch, queries_per_batch, kv_tokens, num_q_heads, num_kv_heads, head_dim;  // B, S, T, Hq, Hkv, Dh
  int64_t stride_qt, stride_qh, stride_ot, stride_oh;                       // q, out: token, head
  int64_t stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh;  // k, v: batch, token, head
  bool kv_lens_int64;
  double scale;  // softmax scale
  int64_t split_size, num_splits;
  int dtype, device;     // q's dtype (k's, v's and out's too), CUDA device
  std::uintptr_t stream;  // cudaStream_t
};

void cross_attention(const CrossAttentionArgs& args);

}  // namespace smolvlm_cuda
