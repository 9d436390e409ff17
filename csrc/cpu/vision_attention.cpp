// Flash attention for the vision encoder (vision_attention.h), written for AVX-512 with AVX512-BF16.
//
// First q, k and v are rounded to bf16 once, per (tile, head), into the layouts the dot products read (Dp = Dh
// padded with zeros to 32, Sp = S padded with zero keys to 16):
//   q [S][Dp]; k [Sp / 16][Dp / 2][16][2]: 16 keys in the lanes, each lane a pair of features (one vdpbf16ps
//   operand); v [Sp / 2][Dp][2]: 16 features in the lanes, each lane a pair of keys;
// and per tile a key bias, 0 or -inf (a masked or padding key).
// Then work items of (tile, head, 64 queries). For each block of 64 keys and each group of 6 of the item's
// queries: the group's scores (6 x 4 accumulators; per feature pair, 4 key vectors loaded and 6 query pairs
// broadcast), an online softmax per query (running max and sum), the probabilities rounded to bf16, and
// O = alpha O + P V (6 x 4 accumulators over 64 features; per key pair, 4 value vectors and 6 probability pairs).
// A block's keys and values (16 KB for Dh = 64) stay in L1 while the item's queries pass over them.
// The softmax sums the rounded probabilities, so the output is exactly their weighted mean of the value rows.
#include "vision_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "simd.h"
#include "simd_math.h"  // exp16 and the exp constants
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace {

constexpr int64_t kQueries = 64;   // queries per work item
constexpr int64_t kKeys = 64;      // keys per online-softmax step: 4 vectors of 16
constexpr int kGroup = 6;          // queries per register tile (6 x 4 accumulators of AVX-512's 32 registers)
constexpr int64_t kFeatures = 64;  // output features per register tile: 4 vectors

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline uint16_t to_bf16(float f) {  // nearest even; NaN stays a (quiet) NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

[[maybe_unused]] inline float from_bf16(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint32_t pair_at(const uint16_t* p) {  // two bf16 (p[0] low, p[1] high): one 32-bit lane of vdpbf16ps
    uint32_t u;
    std::memcpy(&u, p, 4);
    return u;
}

// f(integral_constant<N>) for the runtime n in N .. MAX: the register tiles' shapes are template parameters.
template <int N, int MAX, class F>
void with_int(int n, F&& f) {
    if constexpr (N < MAX) {
        if (n != N) return with_int<N + 1, MAX>(n, f);
    }
    f(std::integral_constant<int, N>{});
}

// ---------------------------------------------------------------- the dot products, per instruction set
// qk<NQ, KV>: s[i, 16 v + j] = scale * q_i . k_(16 v + j) + bias[16 v + j] for NQ queries (rows of q, ldq apart) and
// KV vectors of 16 keys (k: the block's first key group; groups `pairs` * 32 apart); s rows kKeys apart.
// pv<NQ, DV>: o[i, 16 d + j] = alpha[i] o[i, 16 d + j] + sum_kp p_i[kp] . v[kp][16 d + j] over `pairs` key pairs,
// for DV vectors of 16 features (v: the block's first key pair at this feature offset; pairs Dp * 2 apart).

#if SMOLVLM_AVX512
struct Bf16Dot {
    template <int NQ, int KV>
    __attribute__((target("avx512f,avx512bf16"))) static void qk(const uint16_t* q, int64_t ldq, const uint16_t* k,
                                                                 int64_t pairs, float scale, const float* bias,
                                                                 float* s) {
        __m512 acc[NQ][KV];
        for (auto& row : acc)
            for (__m512& x : row) x = _mm512_setzero_ps();
        for (int64_t dp = 0; dp < pairs; ++dp) {
            __m512i kv[KV];
            for (int v = 0; v < KV; ++v) kv[v] = _mm512_loadu_si512(k + (v * pairs + dp) * 32);
            for (int i = 0; i < NQ; ++i) {
                const __m512i qv = _mm512_set1_epi32(static_cast<int>(pair_at(q + i * ldq + 2 * dp)));
                for (int v = 0; v < KV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)qv, (__m512bh)kv[v]);
            }
        }
        const __m512 sc = _mm512_set1_ps(scale);
        for (int i = 0; i < NQ; ++i)
            for (int v = 0; v < KV; ++v)
                _mm512_storeu_ps(s + i * kKeys + 16 * v, _mm512_fmadd_ps(acc[i][v], sc, _mm512_loadu_ps(bias + 16 * v)));
    }

    template <int NQ, int DV>
    __attribute__((target("avx512f,avx512bf16"))) static void pv(const uint16_t* p, int64_t pairs, const uint16_t* v,
                                                                 int64_t Dp, const float* alpha, float* o) {
        __m512 acc[NQ][DV];
        for (int i = 0; i < NQ; ++i)
            for (int d = 0; d < DV; ++d)
                acc[i][d] = _mm512_mul_ps(_mm512_loadu_ps(o + i * Dp + 16 * d), _mm512_set1_ps(alpha[i]));
        for (int64_t kp = 0; kp < pairs; ++kp) {
            __m512i vv[DV];
            for (int d = 0; d < DV; ++d) vv[d] = _mm512_loadu_si512(v + (kp * Dp + 16 * d) * 2);
            for (int i = 0; i < NQ; ++i) {
                const __m512i pa = _mm512_set1_epi32(static_cast<int>(pair_at(p + i * kKeys + 2 * kp)));
                for (int d = 0; d < DV; ++d) acc[i][d] = _mm512_dpbf16_ps(acc[i][d], (__m512bh)pa, (__m512bh)vv[d]);
            }
        }
        for (int i = 0; i < NQ; ++i)
            for (int d = 0; d < DV; ++d) _mm512_storeu_ps(o + i * Dp + 16 * d, acc[i][d]);
    }
};

// vdpbf16ps done with float32 FMAs: each 32-bit lane's low bf16 (even) and high bf16 (odd) as floats.
struct F32Dot {
    static __m512 even(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
    static __m512 odd(__m512i x) {
        return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    }

    template <int NQ, int KV>
    static void qk(const uint16_t* q, int64_t ldq, const uint16_t* k, int64_t pairs, float scale, const float* bias,
                   float* s) {
        __m512 acc[NQ][KV];
        for (auto& row : acc)
            for (__m512& x : row) x = _mm512_setzero_ps();
        for (int64_t dp = 0; dp < pairs; ++dp)
            for (int v = 0; v < KV; ++v) {
                const __m512i kv = _mm512_loadu_si512(k + (v * pairs + dp) * 32);
                const __m512 ke = even(kv), ko = odd(kv);
                for (int i = 0; i < NQ; ++i) {
                    const uint16_t* qi = q + i * ldq + 2 * dp;
                    acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(from_bf16(qi[0])), ke, acc[i][v]);
                    acc[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(from_bf16(qi[1])), ko, acc[i][v]);
                }
            }
        const __m512 sc = _mm512_set1_ps(scale);
        for (int i = 0; i < NQ; ++i)
            for (int v = 0; v < KV; ++v)
                _mm512_storeu_ps(s + i * kKeys + 16 * v, _mm512_fmadd_ps(acc[i][v], sc, _mm512_loadu_ps(bias + 16 * v)));
    }

    template <int NQ, int DV>
    static void pv(const uint16_t* p, int64_t pairs, const uint16_t* v, int64_t Dp, const float* alpha, float* o) {
        __m512 acc[NQ][DV];
        for (int i = 0; i < NQ; ++i)
            for (int d = 0; d < DV; ++d)
                acc[i][d] = _mm512_mul_ps(_mm512_loadu_ps(o + i * Dp + 16 * d), _mm512_set1_ps(alpha[i]));
        for (int64_t kp = 0; kp < pairs; ++kp)
            for (int d = 0; d < DV; ++d) {
                const __m512i vv = _mm512_loadu_si512(v + (kp * Dp + 16 * d) * 2);
                const __m512 ve = even(vv), vo = odd(vv);
                for (int i = 0; i < NQ; ++i) {
                    const uint16_t* pi = p + i * kKeys + 2 * kp;
                    acc[i][d] = _mm512_fmadd_ps(_mm512_set1_ps(from_bf16(pi[0])), ve, acc[i][d]);
                    acc[i][d] = _mm512_fmadd_ps(_mm512_set1_ps(from_bf16(pi[1])), vo, acc[i][d]);
                }
            }
        for (int i = 0; i < NQ; ++i)
            for (int d = 0; d < DV; ++d) _mm512_storeu_ps(o + i * Dp + 16 * d, acc[i][d]);
    }
};
using FallbackDot = F32Dot;

#else
// Builds without AVX-512: the same arithmetic in plain loops.
struct PlainDot {
    template <int NQ, int KV>
    static void qk(const uint16_t* q, int64_t ldq, const uint16_t* k, int64_t pairs, float scale, const float* bias,
                   float* s) {
        float acc[NQ][16 * KV] = {};
        for (int64_t dp = 0; dp < pairs; ++dp)
            for (int v = 0; v < KV; ++v)
                for (int j = 0; j < 16; ++j) {
                    const uint16_t* kj = k + (v * pairs + dp) * 32 + 2 * j;
                    for (int i = 0; i < NQ; ++i)
                        acc[i][16 * v + j] += from_bf16(q[i * ldq + 2 * dp]) * from_bf16(kj[0]) +
                                              from_bf16(q[i * ldq + 2 * dp + 1]) * from_bf16(kj[1]);
                }
        for (int i = 0; i < NQ; ++i)
            for (int j = 0; j < 16 * KV; ++j) s[i * kKeys + j] = acc[i][j] * scale + bias[j];
    }

    template <int NQ, int DV>
    static void pv(const uint16_t* p, int64_t pairs, const uint16_t* v, int64_t Dp, const float* alpha, float* o) {
        for (int i = 0; i < NQ; ++i)
            for (int j = 0; j < 16 * DV; ++j) {
                float acc = o[i * Dp + j] * alpha[i];
                for (int64_t kp = 0; kp < pairs; ++kp) {
                    const uint16_t* vj = v + (kp * Dp + j) * 2;
                    acc += from_bf16(p[i * kKeys + 2 * kp]) * from_bf16(vj[0]) +
                           from_bf16(p[i * kKeys + 2 * kp + 1]) * from_bf16(vj[1]);
                }
                o[i * Dp + j] = acc;
            }
    }
};
using FallbackDot = PlainDot;
#endif

// ---------------------------------------------------------------- the online softmax

// For NG queries' scores s (rows kKeys apart, nkv vectors of 16 keys): m = max(m, the block's max), alpha =
// exp(old m - m), p = bf16(exp(s - m)) (rows kKeys apart), l = alpha l + sum(p). While every key so far is masked
// (m = -inf) the shift is 0, so p = 0 and alpha = 0 rather than NaN.
#if SMOLVLM_AVX512
void softmax_rows(int ng, int64_t nkv, const float* s, float* m, float* l, float* alpha, uint16_t* p) {
    for (int i = 0; i < ng; ++i) {
        const float* row = s + i * kKeys;
        __m512 bm = _mm512_set1_ps(-INFINITY);
        for (int64_t v = 0; v < nkv; ++v) bm = _mm512_max_ps(bm, _mm512_loadu_ps(row + 16 * v));
        const float mx = std::max(m[i], _mm512_reduce_max_ps(bm)), shift = mx == -INFINITY ? 0.f : mx;
        alpha[i] = std::exp(m[i] - shift);
        m[i] = mx;
        const __m512 sh = _mm512_set1_ps(shift);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t v = 0; v < nkv; ++v) {
            const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(row + 16 * v), sh);
            const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ);  // -inf -> 0
            const __m512i u = _mm512_castps_si512(_mm512_maskz_mov_ps(keep, exp16(x)));
            // nearest even (p is finite and >= 0; a NaN stays a NaN)
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i * kKeys + 16 * v), _mm512_cvtepi32_epi16(r));
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
        }
        l[i] = alpha[i] * l[i] + _mm512_reduce_add_ps(sum);
    }
}
#else
void softmax_rows(int ng, int64_t nkv, const float* s, float* m, float* l, float* alpha, uint16_t* p) {
    for (int i = 0; i < ng; ++i) {
        const float* row = s + i * kKeys;
        float mx = m[i];
        for (int64_t j = 0; j < 16 * nkv; ++j) mx = std::max(mx, row[j]);
        const float shift = mx == -INFINITY ? 0.f : mx;
        alpha[i] = std::exp(m[i] - shift);
        m[i] = mx;
        float sum = 0.f;
        for (int64_t j = 0; j < 16 * nkv; ++j) {
            const float x = row[j] - shift;
            p[i * kKeys + j] = to_bf16(x < kExpMin ? 0.f : std::exp(x));
            sum += from_bf16(p[i * kKeys + j]);
        }
        l[i] = alpha[i] * l[i] + sum;
    }
}
#endif

// ---------------------------------------------------------------- the jobs

struct Layout {
    int64_t S, Sp, Dh, Dp;
    int64_t q_elems() const { return S * Dp; }     // one (tile, head)'s q
    int64_t kv_elems() const { return Sp * Dp; }   // its k, or its v
    int64_t head_elems() const { return q_elems() + 2 * kv_elems(); }
};

struct Job {
    const VisionAttention& a;
    Layout L;
    uint16_t* bf16;     // per (tile, head): q | k | v as above
    const float* bias;  // [B, Sp]
    float* out;
    int64_t blocks;     // work items per (tile, head)
};

// (tile, head) bh's q, k and v rounded into their layouts, padding included (every element written).
void pack_task(void* ctx, int64_t bh) {
    const Job& j = *static_cast<const Job*>(ctx);
    const VisionAttention& a = j.a;
    const Layout& L = j.L;
    const int64_t ld = 3 * a.H * a.Dh, b = bh / a.H, h = bh % a.H, Dp = L.Dp;
    const float* q = a.qkv + b * a.S * ld + h * a.Dh;  // row s at q + s * ld
    const float *k = q + a.H * a.Dh, *v = k + a.H * a.Dh;
    uint16_t* qb = j.bf16 + bh * L.head_elems();
    uint16_t *kb = qb + L.q_elems(), *vb = kb + L.kv_elems();
    for (int64_t s = 0; s < a.S; ++s)
        for (int64_t d = 0; d < Dp; ++d) qb[s * Dp + d] = d < a.Dh ? to_bf16(q[s * ld + d]) : 0;
    for (int64_t t = 0; t < L.Sp; ++t)
        for (int64_t d = 0; d < Dp; ++d) {
            const bool real = t < a.S && d < a.Dh;
            kb[((t / 16 * (Dp / 2) + d / 2) * 16 + t % 16) * 2 + d % 2] = real ? to_bf16(k[t * ld + d]) : 0;
            vb[(t / 2 * Dp + d) * 2 + t % 2] = real ? to_bf16(v[t * ld + d]) : 0;
        }
}

template <class Dot>
void item_task(void* ctx, int64_t item) {
    const Job& j = *static_cast<const Job*>(ctx);
    const VisionAttention& a = j.a;
    const Layout& L = j.L;
    const int64_t Dp = L.Dp, bh = item / j.blocks, q0 = item % j.blocks * kQueries, nq = std::min(kQueries, a.S - q0);
    const int64_t b = bh / a.H, h = bh % a.H;
    const uint16_t* qb = j.bf16 + bh * L.head_elems() + q0 * Dp;
    const uint16_t* kb = j.bf16 + bh * L.head_elems() + L.q_elems();
    const uint16_t* vb = kb + L.kv_elems();
    const float* bias = j.bias + b * L.Sp;

    thread_local std::vector<float> floats;
    thread_local std::vector<uint16_t> probs;
    floats.resize(static_cast<size_t>(kQueries * (Dp + 3) + kGroup * kKeys));
    probs.resize(static_cast<size_t>(kGroup * kKeys));
    float* o = floats.data();  // [nq, Dp] output accumulators, then m, l, alpha [nq] and one group's scores
    float *m = o + kQueries * Dp, *l = m + kQueries, *alpha = l + kQueries, *s = alpha + kQueries;
    uint16_t* p = probs.data();  // [kGroup, kKeys] one group's probabilities
    std::fill(o, o + nq * Dp, 0.f);
    std::fill(m, m + nq, -INFINITY);
    std::fill(l, l + nq, 0.f);

    for (int64_t k0 = 0; k0 < L.Sp; k0 += kKeys) {
        const int nkv = static_cast<int>(std::min<int64_t>(4, (L.Sp - k0) / 16));
        const uint16_t* kblock = kb + k0 / 16 * (Dp / 2) * 32;
        const uint16_t* vblock = vb + k0 / 2 * Dp * 2;
        for (int64_t g0 = 0; g0 < nq; g0 += kGroup) {
            const int ng = static_cast<int>(std::min<int64_t>(kGroup, nq - g0));
            with_int<1, kGroup>(ng, [&](auto NQ) {
                with_int<1, 4>(nkv, [&](auto KV) {
                    Dot::template qk<decltype(NQ)::value, decltype(KV)::value>(qb + g0 * Dp, Dp, kblock, Dp / 2, a.scale, bias + k0, s);
                });
            });
            softmax_rows(ng, nkv, s, m + g0, l + g0, alpha + g0, p);
            for (int64_t d0 = 0; d0 < Dp; d0 += kFeatures) {
                const int dv = static_cast<int>(std::min<int64_t>(4, (Dp - d0) / 16));
                with_int<1, kGroup>(ng, [&](auto NQ) {
                    with_int<1, 4>(dv, [&](auto DV) {
                        Dot::template pv<decltype(NQ)::value, decltype(DV)::value>(p, 8 * nkv, vblock + d0 * 2, Dp, alpha + g0, o + g0 * Dp + d0);
                    });
                });
            }
        }
    }

    for (int64_t i = 0; i < nq; ++i) {
        float* row = j.out + (b * a.S + q0 + i) * a.H * a.Dh + h * a.Dh;
        const float inv = 1.f / l[i];
        for (int64_t d = 0; d < a.Dh; ++d) row[d] = o[i * Dp + d] * inv;
    }
}

}  // namespace

bool vision_attention_has_bf16_dot() {
#if SMOLVLM_AVX512
    return __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

bool vision_attention_default_bf16_dot() {
    static const bool use = [] {
        const char* env = std::getenv("SMOLVLM_FAST_CPU_ISA");
        return vision_attention_has_bf16_dot() && !(env && std::string(env) == "f32");
    }();
    return use;
}

void vision_attention(const VisionAttention& a, bool bf16_dot, VisionAttentionWork& work, float* out) {
    if (a.B <= 0 || a.S <= 0 || a.H <= 0 || a.Dh <= 0) return;
    const Layout L{a.S, round_up(a.S, 16), a.Dh, round_up(a.Dh, 32)};
    work.bf16.resize(static_cast<size_t>(a.B * a.H * L.head_elems()));
    work.bias.resize(static_cast<size_t>(a.B * L.Sp));
    for (int64_t b = 0; b < a.B; ++b)
        for (int64_t t = 0; t < L.Sp; ++t)
            work.bias[b * L.Sp + t] = t < a.S && (!a.key_mask || a.key_mask[b * a.S + t]) ? 0.f : -INFINITY;
    Job job{a, L, work.bf16.data(), work.bias.data(), out, (a.S + kQueries - 1) / kQueries};
    const int64_t heads = a.B * a.H;
    parallel_for(&pack_task, &job, heads, 4 * heads * L.head_elems());
#if SMOLVLM_AVX512
    const ChunkFn task = bf16_dot && vision_attention_has_bf16_dot() ? &item_task<Bf16Dot> : &item_task<FallbackDot>;
#else
    const ChunkFn task = &item_task<FallbackDot>;
    (void)bf16_dot;
#endif
    parallel_for(task, &job, heads * job.blocks, 2 * heads * a.S * L.Sp * L.Dp);
}

}  // namespace smolvlm_cpu
