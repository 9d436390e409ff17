// A decoder step in C++. In NumPy a decode step is ~10 calls per layer on rows of a few hundred floats, and the
// Python and NumPy overhead of those calls (~80 us a layer on a 2-core Xeon) was a third of the step's time; in a
// prefill the small ops (norms, RoPE, SwiGLU) each pass over memory several times. Here the products and the
// attention (quant_gemm.cpp / prefill_gemm.cpp, paged_attention.cpp) run on the thread pool (thread_pool.h) and
// the small ops on the calling thread, one pass each. The MLP goes kMlpRows tokens at a time so a long prompt's
// [T, 2I] never exists whole.
#include "decoder_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "half.h"
#include "paged_attention.h"
#include "prefill_gemm.h"
#include "prefill_gemm_bf16.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace {

// f(r0, r1) for row ranges covering [0, rows), on the thread pool when rows * work_per_row multiply-adds pay
// for it (a prefill), else here (a decode step's few rows).
template <class F>
void for_rows(int64_t rows, int64_t work_per_row, F&& f) {
    constexpr int64_t kRowsPerChunk = 16;
    struct Ctx {
        F* f;
        int64_t rows;
    } ctx{&f, rows};
    parallel_for(
        [](void* p, int64_t c) {
            const auto* x = static_cast<const Ctx*>(p);
            (*x->f)(c * kRowsPerChunk, std::min(x->rows, (c + 1) * kRowsPerChunk));
        },
        &ctx, (rows + kRowsPerChunk - 1) / kRowsPerChunk, rows * work_per_row);
}

// residual[s] += x[s]; y[s] = weight * residual[s] / rms(residual[s]) — as ops.rms_norm with its residual.
// y may be x (each row is read before it is written).
void add_rms_norm(const float* x, float* residual, const float* weight, int64_t S, int64_t D, float eps, float* y) {
    for_rows(S, 3 * D, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
            float* r = residual + s * D;
            const float* xs = x + s * D;
            float* ys = y + s * D;
            float sum_sq = 0.f;
            int64_t d = 0;
#if defined(__AVX512F__)
            __m512 acc = _mm512_setzero_ps();
            for (; d < D; d += 16) {
                const __mmask16 k = first_lanes(D - d);
                const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, r + d), _mm512_maskz_loadu_ps(k, xs + d));
                _mm512_mask_storeu_ps(r + d, k, v);
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            sum_sq = _mm512_reduce_add_ps(acc);
#else
            for (; d < D; ++d) {
                r[d] += xs[d];
                sum_sq += r[d] * r[d];
            }
#endif
            const float rms = std::sqrt(sum_sq / static_cast<float>(D) + eps);
            for (d = 0; d < D; ++d) ys[d] = r[d] / rms * weight[d];
        }
    });
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

// gate_up [S, 2I] -> out [S, I] = silu(gate) * up, silu(g) = g / (1 + e^-g).
void silu_and_mul(const float* gate_up, int64_t S, int64_t I, float* out) {
    for_rows(S, 8 * I, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) {
            const float* g = gate_up + s * 2 * I;
            const float* u = g + I;
            float* o = out + s * I;
            int64_t i = 0;
#if defined(__AVX512F__)
            for (; i < I; i += 16) {
                const __mmask16 k = first_lanes(I - i);
                const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
                const __m512 denom = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
                _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_div_ps(gv, denom), _mm512_maskz_loadu_ps(k, u + i)));
            }
#endif
            for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
        }
    });
}

constexpr int64_t kMlpRows = 256;

// Scratch for one step, reused across steps on this thread (sizes grow to the largest step seen).
struct Scratch {
    std::vector<float> residual, h, qkv, q, attn, gate_up, act;
    void resize(int64_t T, const DecoderShape& c) {
        const int64_t qkv_width = (c.Hq + 2 * c.Hkv) * c.Dh, mlp_rows = std::min(T, kMlpRows);
        residual.assign(T * c.D, 0.f);  // zero: the first layer's "add" leaves the embeddings themselves
        h.resize(T * c.D);
        qkv.resize(T * qkv_width);
        q.resize(T * c.Hq * c.Dh);
        attn.resize(T * c.Hq * c.Dh);
        gate_up.resize(mlp_rows * 2 * c.I);
        act.resize(mlp_rows * c.I);
    }
};

// One token's k, v [kv_size] into layer l's cache at element `at`, narrowed for a float16 cache.
void write_kv(const DecoderLayer& l, int64_t at, const float* k, const float* v, int64_t kv_size) {
    if (l.kv == KvType::f16) {
        narrow_to_f16(k, kv_size, static_cast<uint16_t*>(l.k_cache) + at);
        narrow_to_f16(v, kv_size, static_cast<uint16_t*>(l.v_cache) + at);
        return;
    }
    std::memcpy(static_cast<float*>(l.k_cache) + at, k, kv_size * sizeof(float));
    std::memcpy(static_cast<float*>(l.v_cache) + at, v, kv_size * sizeof(float));
}

// Self-attention of layer `l` for the step: h [T, D] (normed) -> out [T, D] (o_proj applied).
void attention(const DecoderLayer& l, const DecoderShape& c, const StepBatch& b, Scratch& t, float* out) {
    const int64_t T = b.T, Dh = c.Dh, q_size = c.Hq * Dh, kv_size = c.Hkv * Dh, width = q_size + 2 * kv_size;
    linear(t.h.data(), T, l.qkv, t.qkv.data(), c.int8_activations, c.bf16_prefill);  // [T, width]: q | k | v
    for_rows(T, width, [&](int64_t t0, int64_t t1) {  // RoPE on q and k, q to its own array, k and v to the cache
        for (int64_t s = t0; s < t1; ++s) {
            float* row = t.qkv.data() + s * width;
            const float* cs = b.cos_sin + static_cast<int64_t>(b.positions[s]) * c.rotary_dim;
            std::memcpy(t.q.data() + s * q_size, row, q_size * sizeof(float));
            rope(t.q.data() + s * q_size, c.Hq, Dh, c.rotary_dim, cs);
            rope(row + q_size, c.Hkv, Dh, c.rotary_dim, cs);
            const int64_t slot = b.slot_mapping[s];
            if (slot < 0) continue;
            write_kv(l, slot * kv_size, row + q_size, row + q_size + kv_size, kv_size);
        }
    });
    PagedPrefill a{};
    a.q = t.q.data();
    a.k_cache = l.k_cache;
    a.v_cache = l.v_cache;
    a.kv = l.kv;
    a.block_tables = b.block_tables;
    a.seq_lens = b.seq_lens;
    a.S = b.S;
    a.Hq = c.Hq;
    a.Hkv = c.Hkv;
    a.Dh = Dh;
    a.block_size = b.block_size;
    a.max_blocks = b.max_blocks;
    a.scale = c.scale;
    a.query_start_loc = b.query_start_loc;
    a.T = T;
    paged_prefill_attention(a, t.attn.data());  // [T, Hq, Dh]; one-query sequences take its decode path
    linear(t.attn.data(), T, l.o, out, c.int8_activations, c.bf16_prefill);  // [T, D]
}

}  // namespace

bool linear(const float* x, int64_t M, const Linear& w, float* out, bool int8_x, bool bf16) {
    // From kPrefillRows rows of x on, prefill_gemm (a dequantized panel of W in L1/L2 under a 32 x 12 register
    // tile) beats the decode tiles, which unpack each weight block for at most 8 rows of x; with bf16, the same
    // panels dequantized into bf16 for dot products of pairs (prefill_gemm_bf16.h: twice the float32 rate).
    constexpr int64_t kPrefillRows = 32;
    bool int8_done = false;
    AnyMatrix any;
    const auto many_rows = [&] {
        return M >= kPrefillRows && ((bf16 && prefill_gemm_bf16(x, M, any, out)) || prefill_gemm(x, M, any, out));
    };
    switch (w.kind) {
        case Linear::Kind::int4:
            any.int4 = &w.int4;
            // int8 x only for decode-sized products: with many rows the float panel GEMM is faster still
            int8_done = int8_x && M < kPrefillRows && int4_gemm_int8(x, M, w.int4, out);
            if (!int8_done && !many_rows()) int4_gemm(x, M, w.int4, out);
            break;
        case Linear::Kind::q8:
            any.q8 = &w.q8;
            if (!many_rows()) q8_gemm(x, M, w.q8, out);
            break;
        case Linear::Kind::f32:
            any.f32 = &w.f32;
            if (!many_rows()) f32_gemm(x, M, w.f32, out);
            break;
        case Linear::Kind::bf16:
            bf16_gemm(x, M, w.K, w.bf16, nullptr, Epilogue::none, false, out, w.N);
            break;
    }
    if (w.bias)
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < w.N; ++n) out[m * w.N + n] += w.bias[n];
    return int8_done;
}

void decoder_step(const std::vector<DecoderLayer>& layers, const float* final_norm, const DecoderShape& c,
                  const StepBatch& b, float* x) {
    thread_local Scratch t;
    t.resize(b.T, c);
    const int64_t T = b.T;
    for (const DecoderLayer& l : layers) {
        add_rms_norm(x, t.residual.data(), l.input_norm, T, c.D, c.eps, t.h.data());  // h = norm(x + residual)
        attention(l, c, b, t, x);                                                      // x = attention(h)
        add_rms_norm(x, t.residual.data(), l.post_norm, T, c.D, c.eps, t.h.data());
        for (int64_t r0 = 0; r0 < T; r0 += kMlpRows) {  // x = mlp(h), kMlpRows tokens at a time
            const int64_t rows = std::min(kMlpRows, T - r0);
            linear(t.h.data() + r0 * c.D, rows, l.gate_up, t.gate_up.data(), c.int8_activations, c.bf16_prefill);  // [rows, 2I]
            silu_and_mul(t.gate_up.data(), rows, c.I, t.act.data());                            // [rows, I]
            linear(t.act.data(), rows, l.down, x + r0 * c.D, c.int8_activations, c.bf16_prefill);               // [rows, D]
        }
    }
    if (final_norm == nullptr) {
        for (int64_t i = 0; i < T * c.D; ++i) x[i] += t.residual[i];  // the whole hidden state
        return;
    }
    add_rms_norm(x, t.residual.data(), final_norm, T, c.D, c.eps, x);  // in place: y[d] only reads r[d]
}

}  // namespace smolvlm_cpu
