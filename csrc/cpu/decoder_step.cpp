// The decode step in C++. In NumPy a decode step is ~10 calls per layer on rows of a few hundred floats, and the
// Python and NumPy overhead of those calls (~80 us a layer on a 2-core Xeon) was a third of the step's time. Here
// the products and the attention run on the thread pool (quant_gemm.cpp, paged_attention.cpp) and the small ops
// (norms, RoPE, SwiGLU, the cache write) on the calling thread: with one row per sequence they are too small to
// be worth waking a thread for.
#include "decoder_step.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "paged_attention.h"

namespace smolvlm_cpu {
namespace {

// residual[s] += x[s]; y[s] = weight * residual[s] / rms(residual[s]) — as ops.rms_norm with its residual.
void add_rms_norm(const float* x, float* residual, const float* weight, int64_t S, int64_t D, float eps, float* y) {
    for (int64_t s = 0; s < S; ++s) {
        float* r = residual + s * D;
        float sum_sq = 0.f;
        for (int64_t d = 0; d < D; ++d) {
            r[d] += x[s * D + d];
            sum_sq += r[d] * r[d];
        }
        const float rms = std::sqrt(sum_sq / static_cast<float>(D) + eps);
        for (int64_t d = 0; d < D; ++d) y[s * D + d] = r[d] / rms * weight[d];
    }
}

// Rotate-half RoPE of n_heads heads [n_heads, Dh] in place, on the first R features; cs [R]: cos | sin.
void rope(float* heads, int64_t n_heads, int64_t Dh, int64_t R, const float* cs) {
    const int64_t half = R / 2;
    const float* cos = cs;
    const float* sin = cs + half;
    for (int64_t h = 0; h < n_heads; ++h) {
        float* v = heads + h * Dh;
        for (int64_t j = 0; j < half; ++j) {
            const float x1 = v[j], x2 = v[j + half];
            v[j] = x1 * cos[j] - x2 * sin[j];
            v[j + half] = x2 * cos[j] + x1 * sin[j];
        }
    }
}

// gate_up [S, 2I] -> out [S, I] = silu(gate) * up.
void silu_and_mul(const float* gate_up, int64_t S, int64_t I, float* out) {
    for (int64_t s = 0; s < S; ++s)
        for (int64_t i = 0; i < I; ++i) {
            const float g = gate_up[s * 2 * I + i];
            out[s * I + i] = g / (1.0f + std::exp(-g)) * gate_up[s * 2 * I + I + i];
        }
}

// Scratch for one step, reused across steps on this thread (sizes grow to the largest batch seen).
struct Scratch {
    std::vector<float> residual, h, qkv, q, attn, gate_up, act;
    void resize(int64_t S, const DecoderShape& c) {
        const int64_t qkv_width = (c.Hq + 2 * c.Hkv) * c.Dh;
        residual.assign(S * c.D, 0.f);  // zero: the first layer's "add" leaves the embeddings themselves
        h.resize(S * c.D);
        qkv.resize(S * qkv_width);
        q.resize(S * c.Hq * c.Dh);
        attn.resize(S * c.Hq * c.Dh);
        gate_up.resize(S * 2 * c.I);
        act.resize(S * c.I);
    }
};

// Self-attention of layer `l` for the batch: h [S, D] (normed) -> out [S, D] (o_proj applied).
void attention(const DecoderLayer& l, const DecoderShape& c, const DecodeBatch& b, Scratch& t, float* out) {
    const int64_t S = b.S, Dh = c.Dh, q_size = c.Hq * Dh, kv_size = c.Hkv * Dh, width = q_size + 2 * kv_size;
    linear(t.h.data(), S, l.qkv, t.qkv.data(), c.int8_activations);  // [S, width]: q | k | v
    for (int64_t s = 0; s < S; ++s) {
        float* row = t.qkv.data() + s * width;
        const float* cs = b.cos_sin + static_cast<int64_t>(b.positions[s]) * c.rotary_dim;
        std::memcpy(t.q.data() + s * q_size, row, q_size * sizeof(float));
        rope(t.q.data() + s * q_size, c.Hq, Dh, c.rotary_dim, cs);
        rope(row + q_size, c.Hkv, Dh, c.rotary_dim, cs);
        const int64_t slot = b.slot_mapping[s];
        if (slot < 0) continue;
        std::memcpy(l.k_cache + slot * kv_size, row + q_size, kv_size * sizeof(float));
        std::memcpy(l.v_cache + slot * kv_size, row + q_size + kv_size, kv_size * sizeof(float));
    }
    PagedDecode a{};
    a.q = t.q.data();
    a.k_cache = l.k_cache;
    a.v_cache = l.v_cache;
    a.block_tables = b.block_tables;
    a.seq_lens = b.seq_lens;
    a.S = S;
    a.Hq = c.Hq;
    a.Hkv = c.Hkv;
    a.Dh = Dh;
    a.block_size = b.block_size;
    a.max_blocks = b.max_blocks;
    a.scale = c.scale;
    paged_decode_attention(a, t.attn.data());  // [S, Hq, Dh]
    linear(t.attn.data(), S, l.o, out, c.int8_activations);      // [S, D]
}

}  // namespace

void linear(const float* x, int64_t M, const Linear& w, float* out, bool int8_x) {
    switch (w.kind) {
        case Linear::Kind::int4:
            if (!int8_x || !int4_gemm_int8(x, M, w.int4, out)) int4_gemm(x, M, w.int4, out);
            break;
        case Linear::Kind::q8: q8_gemm(x, M, w.q8, out); break;
        case Linear::Kind::f32: f32_gemm(x, M, w.f32, out); break;
    }
    if (w.bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < w.N; ++n) out[m * w.N + n] += w.bias[n];
}

void decode_step(const std::vector<DecoderLayer>& layers, const float* final_norm, const DecoderShape& c,
                 const DecodeBatch& b, float* x) {
    thread_local Scratch t;
    t.resize(b.S, c);
    const int64_t S = b.S;
    for (const DecoderLayer& l : layers) {
        add_rms_norm(x, t.residual.data(), l.input_norm, S, c.D, c.eps, t.h.data());  // h = norm(x + residual)
        attention(l, c, b, t, x);                                                      // x = attention(h)
        add_rms_norm(x, t.residual.data(), l.post_norm, S, c.D, c.eps, t.h.data());
        linear(t.h.data(), S, l.gate_up, t.gate_up.data(), c.int8_activations);  // [S, 2I]
        silu_and_mul(t.gate_up.data(), S, c.I, t.act.data());  // [S, I]
        linear(t.act.data(), S, l.down, x, c.int8_activations);  // [S, D]
    }
    add_rms_norm(x, t.residual.data(), final_norm, S, c.D, c.eps, x);  // in place: y[d] only reads r[d]
}

}  // namespace smolvlm_cpu
