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

void write_kv_cache(std::uintptr_t k, std::uintptr_t v, std::uintptr_t k_cache, std::uintptr_t v_cache,
                    std::uintptr_t slot_mapping, std::uintptr_t cos_sin, std::uintptr_t positions,
                    int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
                    int64_t stride_kt, int64_t stride_kh, int64_t stride_vt, int64_t stride_vh,
                    int64_t stride_kcb, int64_t stride_kcs, int64_t stride_kch, int64_t stride_vcb,
                    int64_t stride_vcs, int64_t stride_vch, int64_t stride_cs, int64_t rotary_dim,
                    bool slots_int64, bool positions_int64, int cos_sin_dtype, int dtype, int device,
                    std::uintptr_t stream);

}  // namespace smolvlm_cuda
