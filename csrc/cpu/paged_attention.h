// Attention over the paged KV cache on the CPU: decode (one query per sequence) and prefill (several packed queries
// per sequence, causal). float32 queries, scores, softmax and sums; the cache float32 or float16 (KvType), a
// float16 cache widened to float32 as it is read. The caller (bindings.cpp) checks every argument; these trust them.
#pragma once

#include <cstdint>

namespace smolvlm_cpu {

// The cache's elements: float, or float16 bits (uint16_t, half.h), half the bytes a decode step reads.
enum class KvType { f32, f16 };

struct PagedDecode {
    const float* q;              // [S, Hq, Dh], already rotated
    const void* k_cache;         // [num_blocks, block_size, Hkv, Dh] of kv
    const void* v_cache;         // [num_blocks, block_size, Hkv, Dh] of kv
    KvType kv = KvType::f32;
    const int32_t* block_tables; // [S, max_blocks]: ids < num_blocks for the blocks below seq_len
    const int32_t* seq_lens;     // [S]: 1 .. max_blocks * block_size
    int64_t S, Hq, Hkv, Dh, block_size, max_blocks;
    float scale;
};

// out [S, Hq, Dh]: query head h of sequence s attends to the seq_lens[s] keys of its KV head h / (Hq / Hkv).
// Call it from outside the thread pool's tasks (it runs its own parallel_for).
void paged_decode_attention(const PagedDecode& a, float* out);

// Packed queries: q is [T, Hq, Dh] here. Sequence s owns queries query_start_loc[s] .. query_start_loc[s + 1] - 1
// (q_len_s of them, 0 <= q_len_s <= seq_lens[s]); its query j sits at position seq_lens[s] - q_len_s + j and sees
// the keys at positions <= its own.
struct PagedPrefill : PagedDecode {
    const int32_t* query_start_loc = nullptr;  // [S + 1]: 0 = query_start_loc[0] <= ... <= query_start_loc[S] = T
    int64_t T = 0;
    bool causal = true;  // false: every query of sequence s sees all seq_lens[s] keys (the vision encoder)
};

// out [T, Hq, Dh]. A sequence with one query is computed exactly as paged_decode_attention computes it.
void paged_prefill_attention(const PagedPrefill& a, float* out);

}  // namespace smolvlm_cpu
