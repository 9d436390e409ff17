// paged_attention for decode: one query token per thread block row of the grid, GQA heads sharing each loaded key,
// the context split across thread blocks and merged by a second kernel (decode_attention.cuh has the design).
//
//   q                [T, Hq, Dh]                        out [T, Hq, Dh] (q's dtype, the caches' too)
//   k_cache/v_cache  [num_blocks, block_size, Hkv, Dh]   head_dim contiguous; strides in elements
//   block_tables     [num_seqs, max_blocks] int32        seq_lens [num_seqs] int32
//   query_start_loc  [num_seqs + 1] int32, or 0 for one query per sequence (T == num_seqs)
//   cos_sin          [max_position, >= rotary_dim] (dtype cos_sin_dtype) and positions [T] (int32 / int64), or 0
// Query j of sequence s (q_len_s queries) sits at position seq_lens[s] - q_len_s + j and sees the keys at positions
// <= its own. Every token is computed on its own, so any query_start_loc is handled correctly; the kernel is made
// for one query per sequence (ops/cuda.py sends prefill batches to the Triton kernel, which tiles the queries).
// Declarations only (host C++): bindings.cpp includes this file.
#pragma once

#include <cstdint>

namespace smolvlm_cuda {

// Keys per split at most (the split's scores stay in shared memory).
constexpr int kPagedAttentionMaxSplit = 512;

// num_splits > 1 needs the fp32 workspaces partial_acc [T, Hq, num_splits, Dh], partial_max and partial_sum
// [T, Hq, num_splits] (contiguous); split s covers keys [s * split_size, (s + 1) * split_size).
void paged_attention(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                     std::uintptr_t block_tables, std::uintptr_t seq_lens, std::uintptr_t query_start_loc,
                     std::uintptr_t cos_sin, std::uintptr_t positions, std::uintptr_t partial_acc,
                     std::uintptr_t partial_max, std::uintptr_t partial_sum, int64_t num_tokens, int64_t num_seqs,
                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                     int64_t stride_qt, int64_t stride_qh, int64_t stride_ot, int64_t stride_oh, int64_t stride_kb,
                     int64_t stride_ks, int64_t stride_kh, int64_t stride_vb, int64_t stride_vs, int64_t stride_vh,
                     int64_t stride_bt, int64_t stride_cs, int64_t rotary_dim, int cos_sin_dtype,
                     bool positions_int64, double scale, int64_t split_size, int64_t num_splits, int dtype,
                     int device, std::uintptr_t stream);

// Whether the kernel is compiled for this head_dim (64, 80, 96, 128).
bool decode_attention_head_dim_supported(int64_t head_dim);

}  // namespace smolvlm_cuda
