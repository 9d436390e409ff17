// The whole Llama decoder for one step in one call — a decode step (one new token per sequence) or a prefill
// (many packed tokens per sequence): every layer's norms, products, RoPE, KV-cache write and paged attention,
// then the final norm (none for a segment followed by cross-attention layers). float32 activations; each weight in
// the kind its checkpoint holds (float32, int4, Q8_0) or bf16 (packed, bf16_gemm.h: precision bfloat16); the KV cache float32 or float16. The caller (bindings.cpp)
// checks every argument.
#pragma once

#include <cstdint>
#include <vector>

#include "bf16_gemm.h"
#include "paged_attention.h"
#include "quant_gemm.h"

namespace smolvlm_cpu {

// One weight matrix [N, K] of whichever kind, and an optional bias [N].
struct Linear {
    enum class Kind { f32, int4, q8, bf16 };
    Kind kind = Kind::f32;
    F32Matrix f32{};
    Int4Matrix int4{};
    Q8Matrix q8{};
    Bf16Matrix bf16{};
    const float* bias = nullptr;
    int64_t N = 0, K = 0;

    static Linear of(const F32Matrix& m) { return make(Kind::f32, m.N, m.K, [&](Linear& l) { l.f32 = m; }); }
    static Linear of(const Int4Matrix& m) { return make(Kind::int4, m.N, m.K, [&](Linear& l) { l.int4 = m; }); }
    static Linear of(const Q8Matrix& m) { return make(Kind::q8, m.N, m.K, [&](Linear& l) { l.q8 = m; }); }
    static Linear of(const Bf16Matrix& m) { return make(Kind::bf16, m.N, m.K, [&](Linear& l) { l.bf16 = m; }); }

private:
    template <class Set>
    static Linear make(Kind kind, int64_t N, int64_t K, Set set) {
        Linear l;
        l.kind = kind;
        l.N = N;
        l.K = K;
        set(l);
        return l;
    }
};

// out [M, N] = x [M, K] @ W^T (+ bias), by the kernel that suits M and the weight's kind. int8_x: int4 weights
// meet x rounded to int8 (int4_gemm_int8, where the build has VNNI); returns whether that happened. bf16: products
// of many rows in bf16 (prefill_gemm_bf16) where the CPU has bf16 dot products. A bf16 weight always takes
// bf16_gemm (any M: the same kernel serves decode and prefill).
bool linear(const float* x, int64_t M, const Linear& w, float* out, bool int8_x = false, bool bf16 = false);

struct DecoderLayer {
    const float* input_norm;  // [D]
    Linear qkv;               // [(Hq + 2 Hkv) Dh, D]: q_proj | k_proj | v_proj rows
    Linear o;                 // [D, Hq Dh]
    const float* post_norm;   // [D]
    Linear gate_up;           // [2 I, D]: gate_proj | up_proj rows
    Linear down;              // [D, I]
    void* k_cache;            // [num_blocks, block_size, Hkv, Dh] of kv: float, or float16 bits (half.h)
    void* v_cache;
    KvType kv = KvType::f32;  // float16: the new K/V rounded to nearest on the way in
};

struct DecoderShape {
    int64_t D, I, Hq, Hkv, Dh, rotary_dim;
    float eps, scale;
    bool int8_activations;  // decode-sized int4 products round x to int8 per block (llama.cpp's arithmetic)
    bool bf16_prefill;      // prefill-sized products in bf16 (x and W rounded, float32 sums): precision bfloat16
};

struct StepBatch {                   // T new tokens of S sequences, packed sequence after sequence
    int64_t T, S;
    const int32_t* positions;        // [T]: rows of cos_sin
    const int32_t* slot_mapping;     // [T]: cache slot of each token's K/V; -1 writes nothing
    const int32_t* query_start_loc;  // [S + 1]: sequence s owns tokens query_start_loc[s] .. [s + 1] - 1
    const int32_t* block_tables;     // [S, max_blocks]
    const int32_t* seq_lens;         // [S]: keys each sequence attends to, its new ones included
    int64_t max_blocks, block_size;
    const float* cos_sin;            // [positions, rotary_dim]: cos | sin
};

// x [T, D]: the new tokens' embeddings in, the final norm's output out; final_norm null: no final norm, x comes
// out as the whole hidden state x + residual (a segment of the decoder, with cross-attention layers after it).
void decoder_step(const std::vector<DecoderLayer>& layers, const float* final_norm, const DecoderShape& shape,
                  const StepBatch& batch, float* x);

}  // namespace smolvlm_cpu
