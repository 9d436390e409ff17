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

// The arguments of paged_attention (Python: _C.PagedAttentionArgs(field=..., ...)); addresses 0 when absent, strides
// in elements, dtypes as codes (0 fp32, 1 fp16, 2 bf16).
struct PagedAttentionArgs {
  std::uintptr_t out, q;                    // [T, Hq, Dh]
  std::uintptr_t k_cache, v_cache;          // [num_blocks, block_size, Hkv, Dh]
  std::uintptr_t block_tables, seq_lens;    // int32 [num_seqs, max_blocks], [num_seqs]
  std::uintptr_t query_start_loc;           // int32 [num_seqs + 1], or 0: one query per sequence
  std::uintptr_t cos_sin, positions;        // RoPE on q, or 0
  // num_splits > 1 needs the fp32 workspaces partial_acc [T, Hq, num_splits, Dh], partial_max and partial_sum
  // [T, Hq, num_splits] (contiguous); split s covers keys [s * split_size, (s + 1) * split_size).
  std::uintptr_t partial_acc, partial_max, partial_sum;
  int64_t num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size;
  int64_t stride_qt, stride_qh, stride_ot, stride_oh;                       // q, out: token, head
  int64_t stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh;  // caches: block, slot, head
  int64_t stride_bt, stride_cs;                                             // block_tables, cos_sin rows
  int64_t rotary_dim;
  int cos_sin_dtype;
  bool positions_int64;
  double scale;  // softmax scale
  int64_t split_size, num_splits;
  int dtype, device;     // q's dtype (the caches' and out's too), CUDA device
  std::uintptr_t stream;  // cudaStream_t
};

void paged_attention(const PagedAttentionArgs& args);

// Whether the kernel is compiled for this head_dim (64, 80, 96, 128).
bool decode_attention_head_dim_supported(int64_t head_dim);

}  // namespace smolvlm_cuda
