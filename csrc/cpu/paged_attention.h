// Decode attention over the paged KV cache on the CPU: one query per sequence, float32 throughout.
// The caller (bindings.cpp) checks every argument; this function trusts them.
#pragma once

#include <cstdint>

namespace smolvlm_cpu {

struct PagedDecode {
    const float* q;              // [S, Hq, Dh], already rotated
    const float* k_cache;        // [num_blocks, block_size, Hkv, Dh]
    const float* v_cache;        // [num_blocks, block_size, Hkv, Dh]
    const int32_t* block_tables; // [S, max_blocks]: ids < num_blocks for the blocks below seq_len
    const int32_t* seq_lens;     // [S]: 1 .. max_blocks * block_size
    int64_t S, Hq, Hkv, Dh, block_size, max_blocks;
    float scale;
};

// out [S, Hq, Dh]: query head h of sequence s attends to the seq_lens[s] keys of its KV head h / (Hq / Hkv).
void paged_decode_attention(const PagedDecode& a, float* out);

}  // namespace smolvlm_cpu
