// write_kv_cache with RoPE fused: k_cache/v_cache[slot // block_size, slot % block_size] = rope(k[t]), v[t] for each
// token t whose slot_mapping[t] is not negative.
//
//   k, v             [T, Hkv, Dh], head_dim contiguous, token / head strides free (slices of a fused qkv output)
//   k_cache/v_cache  [num_blocks, block_size, Hkv, Dh], head_dim contiguous (k's dtype)
//   slot_mapping     [T] int32 / int64        positions [T] int32 / int64
//   cos_sin          [max_position, >= rotary_dim] (cos_sin_dtype), first half cos, second half sin; 0: no RoPE
// RoPE is rotate-half on the first rotary_dim features of each head; cos and sin are rounded to k's dtype first (as
// the reference does), the rotation is done in fp32 and rounded once.
// Declarations only (host C++): bindings.cpp includes this file.
#pragma once

#include <cstdint>

namespace smolvlm_cuda {

// The arguments of write_kv_cache (Python: _C.WriteKvCacheArgs(field=..., ...)); strides in elements, dtypes as codes.
struct WriteKvCacheArgs {
  std::uintptr_t k, v;                // [T, Hkv, Dh]
  std::uintptr_t k_cache, v_cache;    // [num_blocks, block_size, Hkv, Dh]
  std::uintptr_t slot_mapping;        // [T]
  std::uintptr_t cos_sin, positions;  // RoPE on k, or 0
  int64_t num_tokens, num_heads, head_dim, block_size, num_blocks;
  int64_t stride_kt, stride_kh, stride_vt, stride_vh;                              // k, v: token, head
  int64_t stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch;  // caches: block, slot, head
  int64_t stride_cs;                                                               // cos_sin rows
  int64_t rotary_dim;
  bool slots_int64, positions_int64;
  int cos_sin_dtype, dtype, device;  // dtype: k's (v's and the caches' too)
  std::uintptr_t stream;             // cudaStream_t
};

void write_kv_cache(const WriteKvCacheArgs& args);

}  // namespace smolvlm_cuda
