// Flash attention for the vision encoder (vision_attention.h): the dot products on the AMX tile unit, AVX512-BF16
// register tiles, or float32 FMAs; the online softmax in AVX-512 float32 in every kernel.
//
// Arithmetic (every kernel): q, k, v rounded to bf16 (nearest even); float32 scores s = scale q . k + bias, the
// bias 0 or -inf (a masked or padding key, whose probability is then exactly 0); per block of 64 keys (the same
// blocks in every kernel, so all of them round the same probabilities) and per query a running max m, the
// rescaling alpha = exp(old m - m), p = bf16(exp(s - m)) and l = alpha l + sum(p): l sums the ROUNDED p, so the
// output O / l is exactly their weighted mean of the value rows. A tile needs a real key. The kernels differ only
// in float32 summation order (and the AMX kernel's alpha comes from exp16, within a few ulp of std::exp).
//
// First q, k and v are rounded once, per (tile, head), into the layouts the kernel reads (Dp = Dh padded with
// zeros to 32; Sq, Sp = S padded with zero queries, zero keys to 32), by tasks of 32 rows of qkv read whole.
//   register kernels (avx512bf16, f32):
//     q [Sq][Dp];
//     k [Sp / 16][Dp / 2][16][2]: 16 keys in the lanes, each lane a pair of features (one vdpbf16ps operand);
//     v [Sp / 2][Dp][2]: 16 features in the lanes, each lane a pair of keys.
//   amx, transposed so that each float32 vector of the softmax holds 16 queries of one key:
//     qT [Sq / 16][Dp / 2][16][2]: 16 rows (16 feature pairs x 16 queries, 1 KB) are one B tile of Q^T;
//     k [Sp][Dp]: an A tile is 16 keys x 32 features;
//     vT [Sp / 64][Dp][64]: per key block, features x keys; an A tile is 16 features x 32 keys.
// Then work items, each with its output accumulators in float32:
//   register kernels: (tile, head, 64 queries); per key block and group of 6 queries, the scores (6 x 4
//     accumulators; per feature pair, 4 key vectors loaded and 6 query pairs broadcast), the online softmax per
//     query row, then O = alpha O + P V (6 x 4 accumulators over 64 features; per key pair, 4 value vectors and 6
//     probability pairs). A block's keys and values (16 KB for Dh = 64) stay in L1 while the queries pass.
//   amx: (tile, head, 32 queries); per key block, sT = k qT [keys][32 queries] as 2 x 2 C tiles per 32 keys, stored;
//     the online softmax on those columns (lane-wise max, sum and rescaling; the probabilities written as pT, per
//     key pair and query one 32-bit word: a B tile's rows), which also scales oT [Dp][32] by alpha; then
//     oT += vT pT as 2 x 2 C tiles per 32 features, loaded from oT and stored back. The item's state and a block's
//     k and vT (about 40 KB for Dh = 64) stay in L1. The loop is written once over amx_tiles.h's interface: on the
//     hardware, and emulated in software (any CPU: tests).
#include "vision_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "amx_tiles.h"
#include "bf16_kernels.h"  // amx_compiled, amx_request_permission
#include "simd.h"
#include "simd_math.h"  // exp16 and the exp constants
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace {

constexpr int64_t kQueries = 64;   // queries per work item
constexpr int64_t kKeys = 64;      // keys per online-softmax step: 4 vectors of 16
constexpr int kGroup = 6;          // queries per register tile (6 x 4 accumulators of AVX-512's 32 registers)
constexpr int64_t kFeatures = 64;  // output features per register tile: 4 vectors
constexpr int64_t kAmxRows = 32;   // queries per AMX work item: two B tiles of 16 (so S pads to 32 queries)
constexpr int64_t kPad = 32;       // S, for queries and keys, and Dh pad to this (an AMX tile's 32 bf16)

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

// Per (tile, head): q | k | v in the layouts of the header comment; Sq == Sp here, but kept apart for reading.
struct Layout {
    int64_t S, Sq, Sp, Dh, Dp;
    int64_t q_elems() const { return Sq * Dp; }    // one (tile, head)'s q
    int64_t k_elems() const { return Sp * Dp; }    // its k
    int64_t v_elems() const { return round_up(Sp, kKeys) * Dp; }  // its v (AMX: whole key blocks)
    int64_t head_elems() const { return q_elems() + k_elems() + v_elems(); }
};

struct Job {
    const VisionAttention& a;
    Layout L;
    bool amx;           // the AMX kernel's layouts (qT, k rows, vT), else the register kernels' (q rows, k, v pairs)
    uint16_t* bf16;     // per (tile, head): q | k | v
    const float* bias;  // [B, Sp]
    float* out;
    int64_t queries;    // per work item: kAmxRows (AMX), else kQueries
    int64_t blocks;     // work items per (tile, head)
};

// ---------------------------------------------------------------- packing q, k, v

#if SMOLVLM_AVX512
// r[k] <- column k of the 16 x 16 block in r (rows r[0..15]).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; ++i)
        for (int c = 0; c < 4; ++c) {
            t[8 * i + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
            t[8 * i + 4 + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0xDD);
        }
    for (int c = 0; c < 8; ++c) {
        r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
    }
}

#endif

// n floats rounded to bf16 (nearest even, as to_bf16) into dst, zeros from n up to np (np a multiple of 16).
#if SMOLVLM_AVX512
void round_row(const float* src, int64_t n, int64_t np, uint16_t* dst) {
    for (int64_t d = 0; d < np; d += 16) {
        const __mmask16 in = d < n ? first_lanes(n - d) : __mmask16(0);
        const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(in, src + d));
        const __m512i hi = _mm512_srli_epi32(u, 16);
        const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                      _mm512_set1_epi32(0x7f800000));
        r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));  // a NaN stays a (quiet) NaN
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm512_cvtepi32_epi16(r));
    }
}
#else
void round_row(const float* src, int64_t n, int64_t np, uint16_t* dst) {
    for (int64_t d = 0; d < np; ++d) dst[d] = d < n ? to_bf16(src[d]) : 0;
}
#endif

// src [rows][Dp] -> dst [rows / 16][Dp / 2][16][2]: per 16 rows and feature pair, the 16 rows' pairs (a
// transpose of 32-bit pair words: 16 x 16 blocks in registers).
void to_pair_blocks(const uint16_t* src, int64_t rows, int64_t Dp, uint16_t* dst) {
#if SMOLVLM_AVX512
    for (int64_t g = 0; g < rows / 16; ++g)
        for (int64_t p0 = 0; p0 < Dp / 2; p0 += 16) {
            __m512 r[16];
            for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(src + (g * 16 + j) * Dp + 2 * p0);
            transpose16(r);
            for (int p = 0; p < 16; ++p) _mm512_storeu_ps(dst + (g * (Dp / 2) + p0 + p) * 32, r[p]);
        }
#else
    for (int64_t g = 0; g < rows / 16; ++g)
        for (int64_t dp = 0; dp < Dp / 2; ++dp)
            for (int64_t j = 0; j < 16; ++j)
                std::memcpy(dst + ((g * (Dp / 2) + dp) * 16 + j) * 2, src + (g * 16 + j) * Dp + 2 * dp, 4);
#endif
}

// src [rows][Dp] -> dst [rows / 2][Dp][2]: per pair of rows and feature, the two rows' values.
void to_row_pairs(const uint16_t* src, int64_t rows, int64_t Dp, uint16_t* dst) {
    for (int64_t t = 0; t < rows; ++t)
        for (int64_t d = 0; d < Dp; ++d) dst[(t / 2 * Dp + d) * 2 + t % 2] = src[t * Dp + d];
}

// src [32][Dp] -> dst's first 32 columns of [Dp][ld]: the row pairs' words (as to_row_pairs), then 16 x 16
// transposes of those words, whose columns are 32 consecutive rows' values.
void to_columns(const uint16_t* src, int64_t Dp, int64_t ld, uint16_t* dst) {
#if SMOLVLM_AVX512
    for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) {
            const auto row = [&](int t) {
                return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + t * Dp + d0)));
            };
            r[i] = _mm512_castsi512_ps(_mm512_or_si512(row(2 * i), _mm512_slli_epi32(row(2 * i + 1), 16)));
        }
        transpose16(r);
        for (int f = 0; f < 16; ++f) _mm512_storeu_ps(dst + (d0 + f) * ld, r[f]);
    }
#else
    for (int64_t d = 0; d < Dp; ++d)
        for (int64_t t = 0; t < 32; ++t) dst[d * ld + t] = src[t * Dp + d];
#endif
}

constexpr int64_t kPackRows = kPad;  // rows of qkv per packing task (Sq = Sp, a multiple): whole pair blocks
static_assert(kPackRows == 32, "to_columns packs 32 rows");

// Packing task c: kPackRows rows (from t0 = c % (Sp / kPackRows) * kPackRows) of tile b = c / (Sp / kPackRows),
// every head's q, k and v rounded into the job's layouts, padding included (every element written). The rows are
// read whole, in order (one head's 64 floats of each would be 256 bytes 9 KB apart), into
// rows [3 H][kPackRows][Dp], then each of those 3 H blocks goes to its place.
void pack_task(void* ctx, int64_t c) {
    const Job& j = *static_cast<const Job*>(ctx);
    const VisionAttention& a = j.a;
    const Layout& L = j.L;
    const int64_t ld = 3 * a.H * a.Dh, Dp = L.Dp, R = kPackRows, per_tile = L.Sp / R;
    const int64_t b = c / per_tile, t0 = c % per_tile * R, real = std::max<int64_t>(0, std::min(R, a.S - t0));
    thread_local std::vector<uint16_t> rows;
    rows.resize(static_cast<size_t>(3 * a.H * R * Dp));
    for (int64_t t = 0; t < R; ++t)
        for (int64_t seg = 0; seg < 3 * a.H; ++seg) {
            uint16_t* dst = rows.data() + (seg * R + t) * Dp;
            if (t < real) round_row(a.qkv + (b * a.S + t0 + t) * ld + seg * a.Dh, a.Dh, Dp, dst);
            else std::fill(dst, dst + Dp, uint16_t(0));
        }
    for (int64_t h = 0; h < a.H; ++h) {
        const uint16_t *q = rows.data() + h * R * Dp, *k = q + a.H * R * Dp, *v = k + a.H * R * Dp;
        uint16_t* qb = j.bf16 + (b * a.H + h) * L.head_elems();
        uint16_t *kb = qb + L.q_elems(), *vb = kb + L.k_elems();
        if (j.amx) {
            to_pair_blocks(q, R, Dp, qb + t0 * Dp);
            std::copy(k, k + R * Dp, kb + t0 * Dp);
            uint16_t* vblock = vb + t0 / kKeys * Dp * kKeys;
            to_columns(v, Dp, kKeys, vblock + t0 % kKeys);
            if (t0 + R == L.Sp && t0 % kKeys + R < kKeys)  // a last half block: its padding columns (never read)
                for (int64_t d = 0; d < Dp; ++d) std::fill(vblock + d * kKeys + R, vblock + (d + 1) * kKeys, uint16_t(0));
        } else {
            std::copy(q, q + R * Dp, qb + t0 * Dp);
            to_pair_blocks(k, R, Dp, kb + t0 * Dp);
            to_row_pairs(v, R, Dp, vb + t0 * Dp);
        }
    }
}

// ---------------------------------------------------------------- the work items

// One work item's queries, its head's k and v, and its float32 state (thread-local buffers, reused between items).
struct Item {
    const Job& j;
    int64_t b, h, q0, nq;          // tile, head, first query, real queries (<= j.queries)
    const uint16_t *q, *k, *v;     // q at the item's first query (16 queries take 16 Dp elements in either layout)
    const float* bias;             // [Sp] the tile's key biases
    // o: O, [kQueries][Dp] (register kernels) or oT [Dp][kAmxRows] (AMX); m, l, alpha [kQueries]; s: one block's
    // scores, [kGroup][kKeys] or sT [kKeys][kAmxRows]; p: their probabilities, [kGroup][kKeys] or pT (pair words)
    float *o, *m, *l, *alpha, *s;
    uint16_t* p;

    Item(const Job& job, int64_t item) : j(job) {
        const VisionAttention& a = j.a;
        const Layout& L = j.L;
        const int64_t bh = item / j.blocks;
        b = bh / a.H, h = bh % a.H, q0 = item % j.blocks * j.queries, nq = std::min(j.queries, a.S - q0);
        q = j.bf16 + bh * L.head_elems() + q0 * L.Dp;
        k = j.bf16 + bh * L.head_elems() + L.q_elems();
        v = k + L.k_elems();
        bias = j.bias + b * L.Sp;
        thread_local std::vector<float> floats;
        thread_local std::vector<uint16_t> probs;
        floats.resize(static_cast<size_t>(kQueries * (L.Dp + 3) + kAmxRows * kKeys));
        probs.resize(static_cast<size_t>(kAmxRows * kKeys));
        o = floats.data(), m = o + kQueries * L.Dp, l = m + kQueries, alpha = l + kQueries, s = alpha + kQueries;
        p = probs.data();
        std::fill(o, o + kQueries * L.Dp, 0.f);  // all of it: the AMX items carry padding queries along
        std::fill(m, m + kQueries, -INFINITY);
        std::fill(l, l + kQueries, 0.f);
    }

    float* out_row(int64_t i) const { return j.out + (b * j.a.S + q0 + i) * j.a.H * j.a.Dh + h * j.a.Dh; }

    // The item's real output rows: O / l, from o [kQueries][Dp].
    void finish() const {
        for (int64_t i = 0; i < nq; ++i) {
            float* row = out_row(i);
            const float inv = 1.f / l[i];
            for (int64_t d = 0; d < j.a.Dh; ++d) row[d] = o[i * j.L.Dp + d] * inv;
        }
    }
};

template <class Dot>
void item_task(void* ctx, int64_t item) {
    Item it(*static_cast<const Job*>(ctx), item);
    const Layout& L = it.j.L;
    const int64_t Dp = L.Dp;
    for (int64_t k0 = 0; k0 < L.Sp; k0 += kKeys) {
        const int nkv = static_cast<int>(std::min<int64_t>(4, (L.Sp - k0) / 16));
        const uint16_t* kblock = it.k + k0 / 16 * (Dp / 2) * 32;
        const uint16_t* vblock = it.v + k0 / 2 * Dp * 2;
        for (int64_t g0 = 0; g0 < it.nq; g0 += kGroup) {
            const int ng = static_cast<int>(std::min<int64_t>(kGroup, it.nq - g0));
            with_int<1, kGroup>(ng, [&](auto NQ) {
                with_int<1, 4>(nkv, [&](auto KV) {
                    Dot::template qk<decltype(NQ)::value, decltype(KV)::value>(it.q + g0 * Dp, Dp, kblock, Dp / 2,
                                                                               it.j.a.scale, it.bias + k0, it.s);
                });
            });
            softmax_rows(ng, nkv, it.s, it.m + g0, it.l + g0, it.alpha + g0, it.p);
            for (int64_t d0 = 0; d0 < Dp; d0 += kFeatures) {
                const int dv = static_cast<int>(std::min<int64_t>(4, (Dp - d0) / 16));
                with_int<1, kGroup>(ng, [&](auto NQ) {
                    with_int<1, 4>(dv, [&](auto DV) {
                        Dot::template pv<decltype(NQ)::value, decltype(DV)::value>(
                            it.p, 8 * nkv, vblock + d0 * 2, Dp, it.alpha + g0, it.o + g0 * Dp + d0);
                    });
                });
            }
        }
    }
    it.finish();
}

// ---------------------------------------------------------------- the AMX kernel

// The AMX kernel works transposed: its tiles make sT = k qT (keys down, 32 queries across) and oT += vT pT, so
// that each float32 vector holds 16 queries and the softmax's per-query max, sum and rescaling are lane-wise.
//
// softmax_columns: an item's online softmax over the block's `keys` keys, from sT [keys][kAmxRows] (raw
// dot products). Per query, as softmax_rows: s = scale dot + bias[key] (the register kernels' fused multiply-add),
// m = max(m, the block's max), alpha = exp(old m - m) (0 while every key so far is masked), p = bf16(exp(s - m)),
// l = alpha l + sum(p). Writes pT [keys / 2][kAmxRows] pairs: per key pair and query one 32-bit word, the even
// key's p in its low half (an AMX B tile's row). alpha here comes from exp16, within a few ulp of std::exp.
// rescale_columns: oT [Dp][kAmxRows] times alpha (per column), skipped when every alpha is 1 (exact either way).
#if SMOLVLM_AVX512
// exp(x - shift) for 16 lanes; exactly 0 below kExpMin (so for a masked key's -inf too).
inline __m512 shifted_exp(__m512 x, __m512 shift) {
    const __m512 y = _mm512_sub_ps(x, shift);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ), exp16(y));
}

// One key pair's probabilities for 16 queries, rounded to bf16 (nearest even): the pair words (the even key's in
// the low half), with the rounded values added into sum.
#if defined(__AVX512BF16__)
// vcvtne2ps2bf16 rounds to nearest even (its DAZ / FTZ change nothing: p is 0 or a normal float), a word permute
// interleaves the two keys, and vdpbf16ps against bf16 ones adds the rounded pair into sum.
struct PairRounder {
    const __m512i interleave, ones;
    PairRounder()
        : interleave(_mm512_or_si512(
              _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),  // word 2n <- n (even)
              _mm512_setr_epi32(16 << 16, 17 << 16, 18 << 16, 19 << 16, 20 << 16, 21 << 16, 22 << 16, 23 << 16,
                                24 << 16, 25 << 16, 26 << 16, 27 << 16, 28 << 16, 29 << 16, 30 << 16, 31 << 16))),
          ones(_mm512_set1_epi32(0x3f803f80)) {}
    __m512i operator()(__m512 even, __m512 odd, __m512& sum) const {
        const __m512i w = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
        sum = _mm512_dpbf16_ps(sum, (__m512bh)w, (__m512bh)ones);
        return w;
    }
};
#else
// Integer rounding (as round_row; p is finite and >= 0).
struct PairRounder {
    static __m512i rounded(__m512 p) {  // float32 bits with the low 16 zero
        const __m512i u = _mm512_castps_si512(p);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        return _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
    }
    __m512i operator()(__m512 even, __m512 odd, __m512& sum) const {
        const __m512i e = rounded(even), o = rounded(odd);
        sum = _mm512_add_ps(_mm512_add_ps(sum, _mm512_castsi512_ps(e)), _mm512_castsi512_ps(o));
        return _mm512_or_si512(_mm512_srli_epi32(e, 16), o);
    }
};
#endif

void softmax_columns(int64_t keys, const float* sT, float scale, const float* bias, float* m, float* l, float* alpha,
                     uint16_t* pT) {
    constexpr int J = kAmxRows / 16;  // vectors of 16 queries per key: each loop runs them side by side
    const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    const auto score = [&](int64_t t, int j) {
        return _mm512_fmadd_ps(_mm512_loadu_ps(sT + t * kAmxRows + 16 * j), sc, _mm512_set1_ps(bias[t]));
    };
    __m512 bm[2][J];  // the block's max, over even and odd keys apart (independent chains)
    for (auto& row : bm)
        for (__m512& x : row) x = ninf;
    for (int64_t t = 0; t < keys; t += 2)
        for (int j = 0; j < J; ++j) {
            bm[0][j] = _mm512_max_ps(bm[0][j], score(t, j));
            bm[1][j] = _mm512_max_ps(bm[1][j], score(t + 1, j));
        }
    __m512 shift[J], al[J], sum[J];
    for (int j = 0; j < J; ++j) {
        const __m512 old = _mm512_loadu_ps(m + 16 * j), mx = _mm512_max_ps(old, _mm512_max_ps(bm[0][j], bm[1][j]));
        shift[j] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mx, ninf, _CMP_NEQ_OQ), mx);
        al[j] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(old, ninf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(old, shift[j])));
        sum[j] = _mm512_setzero_ps();
        _mm512_storeu_ps(m + 16 * j, mx);
        _mm512_storeu_ps(alpha + 16 * j, al[j]);
    }
    const PairRounder round_pair;
    for (int64_t t = 0; t < keys; t += 2)
        for (int j = 0; j < J; ++j) {
            const __m512i w = round_pair(shifted_exp(score(t, j), shift[j]), shifted_exp(score(t + 1, j), shift[j]), sum[j]);
            _mm512_storeu_si512(pT + (t / 2 * kAmxRows + 16 * j) * 2, w);
        }
    for (int j = 0; j < J; ++j)
        _mm512_storeu_ps(l + 16 * j, _mm512_add_ps(_mm512_mul_ps(al[j], _mm512_loadu_ps(l + 16 * j)), sum[j]));
}

void rescale_columns(int64_t Dp, const float* alpha, float* oT) {
    const __m512 a0 = _mm512_loadu_ps(alpha), a1 = _mm512_loadu_ps(alpha + 16), one = _mm512_set1_ps(1.f);
    if ((_mm512_cmp_ps_mask(a0, one, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(a1, one, _CMP_EQ_OQ)) == 0xffff) return;
    for (int64_t d = 0; d < Dp; ++d) {
        float* row = oT + d * kAmxRows;
        _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_loadu_ps(row), a0));
        _mm512_storeu_ps(row + 16, _mm512_mul_ps(_mm512_loadu_ps(row + 16), a1));
    }
}
#else
void softmax_columns(int64_t keys, const float* sT, float scale, const float* bias, float* m, float* l, float* alpha,
                     uint16_t* pT) {
    for (int i = 0; i < kAmxRows; ++i) {
        float mx = m[i];
        for (int64_t t = 0; t < keys; ++t) mx = std::max(mx, sT[t * kAmxRows + i] * scale + bias[t]);
        const float shift = mx == -INFINITY ? 0.f : mx;
        alpha[i] = m[i] == -INFINITY ? 0.f : std::exp(m[i] - shift);
        m[i] = mx;
        float sum = 0.f;
        for (int64_t t = 0; t < keys; ++t) {
            const float x = sT[t * kAmxRows + i] * scale + bias[t] - shift;
            const uint16_t r = to_bf16(x < kExpMin ? 0.f : std::exp(x));
            pT[(t / 2 * kAmxRows + i) * 2 + t % 2] = r;
            sum += from_bf16(r);
        }
        l[i] = alpha[i] * l[i] + sum;
    }
}

void rescale_columns(int64_t Dp, const float* alpha, float* oT) {
    for (int64_t d = 0; d < Dp; ++d)
        for (int i = 0; i < kAmxRows; ++i) oT[d * kAmxRows + i] *= alpha[i];
}
#endif

// finish_columns: the AMX item's real output rows, O / l, from oT [Dp][kAmxRows] (columns).
#if SMOLVLM_AVX512
// Per 16 queries and 16 features (d0 + 16 <= Dp), one register transpose; masked stores past Dh.
void finish_columns(const Item& it) {
    const int64_t Dh = it.j.a.Dh;
    for (int64_t i0 = 0; i0 < it.nq; i0 += 16) {
        const int64_t n = std::min<int64_t>(16, it.nq - i0);
        float inv[16];
        for (int64_t k = 0; k < n; ++k) inv[k] = 1.f / it.l[i0 + k];
        for (int64_t d0 = 0; d0 < Dh; d0 += 16) {
            __m512 r[16];
            for (int f = 0; f < 16; ++f) r[f] = _mm512_loadu_ps(it.o + (d0 + f) * kAmxRows + i0);
            transpose16(r);
            for (int64_t k = 0; k < n; ++k)
                _mm512_mask_storeu_ps(it.out_row(i0 + k) + d0, first_lanes(Dh - d0),
                                      _mm512_mul_ps(r[k], _mm512_set1_ps(inv[k])));
        }
    }
}
#else
void finish_columns(const Item& it) {
    for (int64_t i = 0; i < it.nq; ++i) {
        float* row = it.out_row(i);
        const float inv = 1.f / it.l[i];
        for (int64_t d = 0; d < it.j.a.Dh; ++d) row[d] = it.o[d * kAmxRows + i] * inv;
    }
}
#endif

const bf16::TileConfig kTiles = bf16::full_tiles();  // in memory once, whole, for _tile_loadconfig to read

#if SMOLVLM_AMX_COMPILED
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")  // so that AmxHardware's members inline into the loops
#endif

// sT [keys][kAmxRows] = the raw dot products of `keys` keys (k rows, Dp apart; keys a multiple of 32) with the
// group's 32 queries (qT: its two 16-query pair blocks, 16 Dp apart). Per 32 keys a 2 x 2 of C tiles (C 2i + j:
// keys 16 i.., queries 16 j..) summed over Dp / 32 steps of A tiles (16 keys x 32 features of k) and B tiles (16
// feature pairs x 16 queries of qT: 16 rows of 64 bytes, contiguous).
template <class Ops>
void amx_scores(const uint16_t* qT, const uint16_t* k, int64_t Dp, int64_t keys, float* sT) {
    const int64_t k_bytes = Dp * 2, s_bytes = kAmxRows * 4;
    for (int64_t t0 = 0; t0 < keys; t0 += 32) {
        Ops::template zero<0>();
        Ops::template zero<1>();
        Ops::template zero<2>();
        Ops::template zero<3>();
        for (int64_t d0 = 0; d0 < Dp; d0 += 32) {
            Ops::template load<4>(k + t0 * Dp + d0, k_bytes);
            Ops::template load<5>(k + (t0 + 16) * Dp + d0, k_bytes);
            Ops::template load<6>(qT + d0 * 16, 64);  // feature pair d0 / 2 on
            Ops::template load<7>(qT + 16 * Dp + d0 * 16, 64);
            Ops::template dp<0, 4, 6>();
            Ops::template dp<1, 4, 7>();
            Ops::template dp<2, 5, 6>();
            Ops::template dp<3, 5, 7>();
        }
        float* st = sT + t0 * kAmxRows;
        Ops::template store<0>(st, s_bytes);
        Ops::template store<1>(st + 16, s_bytes);
        Ops::template store<2>(st + 16 * kAmxRows, s_bytes);
        Ops::template store<3>(st + 16 * kAmxRows + 16, s_bytes);
    }
}

// oT [Dp][kAmxRows] += vT pT over `keys` keys: per 32 features a 2 x 2 of C tiles
// (C 2i + j: features 16 i.., queries 16 j..) loaded from oT, summed over steps of 32 keys of A tiles (16 features x
// 32 keys of the block's vT, rows kKeys apart) and B tiles (16 key pairs x 16 queries of pT), and stored back.
template <class Ops>
void amx_values(const uint16_t* pT, const uint16_t* vT, int64_t Dp, int64_t keys, float* oT) {
    const int64_t o_bytes = kAmxRows * 4, v_bytes = kKeys * 2, p_bytes = kAmxRows * 4;
    for (int64_t f0 = 0; f0 < Dp; f0 += 32) {
        float* of = oT + f0 * kAmxRows;
        Ops::template load<0>(of, o_bytes);
        Ops::template load<1>(of + 16, o_bytes);
        Ops::template load<2>(of + 16 * kAmxRows, o_bytes);
        Ops::template load<3>(of + 16 * kAmxRows + 16, o_bytes);
        for (int64_t t0 = 0; t0 < keys; t0 += 32) {
            const uint16_t* pt = pT + t0 / 2 * kAmxRows * 2;  // key pair t0 / 2
            Ops::template load<4>(vT + f0 * kKeys + t0, v_bytes);
            Ops::template load<5>(vT + (f0 + 16) * kKeys + t0, v_bytes);
            Ops::template load<6>(pt, p_bytes);
            Ops::template load<7>(pt + 32, p_bytes);
            Ops::template dp<0, 4, 6>();
            Ops::template dp<1, 4, 7>();
            Ops::template dp<2, 5, 6>();
            Ops::template dp<3, 5, 7>();
        }
        Ops::template store<0>(of, o_bytes);
        Ops::template store<1>(of + 16, o_bytes);
        Ops::template store<2>(of + 16 * kAmxRows, o_bytes);
        Ops::template store<3>(of + 16 * kAmxRows + 16, o_bytes);
    }
}

// One item (32 queries) on the tiles: per key block the scores on the tiles, the online softmax in float32, oT's
// rescaling, then oT += vT pT on the tiles. (Issuing the next block's scores before this block's softmax gained
// nothing measurable: the tile unit and the vector units hardly overlap here.) Padding queries are zero columns of
// qT: they run along harmlessly and are not written out. Each item loads its own tile configuration (every
// thread of the pool needs one) and releases it.
template <class Ops>
void amx_item_task(void* ctx, int64_t item) {
    Item it(*static_cast<const Job*>(ctx), item);
    const int64_t Dp = it.j.L.Dp, Sp = it.j.L.Sp;
    Ops::config(kTiles);
    for (int64_t k0 = 0; k0 < Sp; k0 += kKeys) {
        const int64_t keys = std::min(kKeys, Sp - k0);  // 32 or 64: Sp is a multiple of 32
        amx_scores<Ops>(it.q, it.k + k0 * Dp, Dp, keys, it.s);
        softmax_columns(keys, it.s, it.j.a.scale, it.bias + k0, it.m, it.l, it.alpha, it.p);
        rescale_columns(Dp, it.alpha, it.o);
        amx_values<Ops>(it.p, it.v + k0 * Dp, Dp, keys, it.o);
    }
    Ops::release();
    finish_columns(it);
}

#if SMOLVLM_AMX_COMPILED
#pragma GCC pop_options
#endif

// AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24, 22) in a build that has the instructions, and the OS's permission.
bool amx_runnable() {
#if defined(__x86_64__) && SMOLVLM_AMX_COMPILED
    static const bool ok = [] {
        unsigned r[4];
        return bf16::amx_compiled() && __get_cpuid_count(7, 0, &r[0], &r[1], &r[2], &r[3]) && (r[3] >> 24 & 1u) &&
               (r[3] >> 22 & 1u) && bf16::amx_request_permission();
    }();
    return ok;
#else
    return false;
#endif
}

ChunkFn kernel_of(Bf16Isa isa) {  // isa runnable
    switch (isa) {
#if SMOLVLM_AMX_COMPILED
        case Bf16Isa::amx: return &amx_item_task<bf16::AmxHardware>;
#endif
        case Bf16Isa::amx_emulated: return &amx_item_task<bf16::AmxEmulated>;
#if SMOLVLM_AVX512
        case Bf16Isa::avx512bf16: return &item_task<Bf16Dot>;
#endif
        default: return &item_task<FallbackDot>;
    }
}

}  // namespace

bool vision_attention_runnable(Bf16Isa isa) {
    switch (isa) {
        case Bf16Isa::amx: return amx_runnable();
#if SMOLVLM_AVX512
        case Bf16Isa::avx512bf16: return __builtin_cpu_supports("avx512bf16");
#else
        case Bf16Isa::avx512bf16: return false;
#endif
        case Bf16Isa::f32:
        case Bf16Isa::amx_emulated: return true;
    }
    return false;
}

Bf16Isa vision_attention_default_isa() {
    const Bf16Isa isa = bf16_isa();
    return vision_attention_runnable(isa) ? isa : Bf16Isa::f32;
}

void vision_attention(const VisionAttention& a, Bf16Isa isa, VisionAttentionWork& work, float* out) {
    if (a.B <= 0 || a.S <= 0 || a.H <= 0 || a.Dh <= 0) return;
    const Layout L{a.S, round_up(a.S, kPad), round_up(a.S, kPad), a.Dh, round_up(a.Dh, kPad)};
    work.bf16.resize(static_cast<size_t>(a.B * a.H * L.head_elems()));
    work.bias.resize(static_cast<size_t>(a.B * L.Sp));
    for (int64_t b = 0; b < a.B; ++b)
        for (int64_t t = 0; t < L.Sp; ++t)
            work.bias[b * L.Sp + t] = t < a.S && (!a.key_mask || a.key_mask[b * a.S + t]) ? 0.f : -INFINITY;
    const Bf16Isa run = vision_attention_runnable(isa) ? isa : Bf16Isa::f32;
    const bool amx = run == Bf16Isa::amx || run == Bf16Isa::amx_emulated;
    const int64_t queries = amx ? kAmxRows : kQueries;
    Job job{a, L, amx, work.bf16.data(), work.bias.data(), out, queries, (a.S + queries - 1) / queries};
    const int64_t heads = a.B * a.H;
    parallel_for(&pack_task, &job, a.B * L.Sp / kPackRows, 4 * heads * L.head_elems());
    parallel_for(kernel_of(run), &job, heads * job.blocks, 2 * heads * a.S * L.Sp * L.Dp);
}

}  // namespace smolvlm_cpu
