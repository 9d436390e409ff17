// Attention over the paged KV cache, float32 scores, softmax and accumulation. Cache rows are found through the
// block table: key t of a sequence is row t % block_size of block block_tables[s, t / block_size]. A float16 cache
// (KvType::f16) is widened in registers as decode reads it (the kernels are templates on the element type), and a
// block at a time into float32 scratch for a prefill tile, whose float32 kernels then run unchanged.
//
// Decode (one query per sequence), flash-decoding: each sequence is cut into pieces of keys that the threads share,
// so one long sequence keeps every core busy. A piece covers every KV head of its keys (it reads whole cache rows,
// front to back). It scores 4 keys at a time for up to 3 query heads of a KV head (each key row loaded once for
// them; dot products over head_dim, then a transposing reduction that puts 16 keys' scores in 16 lanes), takes a
// softmax over its keys (max m, numerators, sum l) and adds the value rows into per-head accumulators, held in
// registers over 16 keys. The last piece of a sequence to finish merges the pieces' (m, l, acc) in piece order, so
// the result depends neither on the threads nor on the other sequences of the batch (pieces follow seq_len only).
//
// Prefill (several queries), flash attention with the query rows in the SIMD lanes: a tile is (sequence, KV head,
// up to ~64 / G queries, 128 / G without the causal mask), its rows r = (query j, head g) hold the scaled queries
// transposed, Qt [Dh, rows]. For each block of KB keys: scores St [KB, rows] = K Qt (each key element broadcast to
// all rows: every key load serves the G heads and the tile's queries), the causal mask on blocks that reach past
// the tile's first query, an online softmax per row (running max and sum, all vertical: no horizontal reductions),
// then Ot [Dh, rows] = alpha * Ot + V^T P. Sequences with a single query take the decode path.
//
// SIMD through V16 (16 float lanes): one AVX-512 register, two AVX2 registers, or plain loops.
#include "paged_attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "half.h"
#include "simd.h"
#include "simd_math.h"  // exp16 and the exp constants (after the intrinsics' include above)
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace {

// ---------------------------------------------------------------- 16 float lanes

// vexp: simd_math.h's exp (its constants), but below kExpMin (e^-87.3, the smallest normal float) exactly 0: masked
// scores (-inf) weigh nothing, and no denormals are made.

#if SMOLVLM_AVX512
struct V16 {
    __m512 v;
};
inline __mmask16 first_n(int n) { return static_cast<__mmask16>((1u << n) - 1); }  // n in 0 .. 16
inline V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V16 load_n(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_n(n), p)}; }  // lanes >= n: 0
inline V16 load(const uint16_t* p) {  // 16 float16 -> float32
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline V16 load_n(const uint16_t* p, int n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_n(n), p))}; }
inline void store(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline void store_n(float* p, V16 a, int n) { _mm512_mask_storeu_ps(p, first_n(n), a.v); }
inline V16 set1(float x) { return {_mm512_set1_ps(x)}; }
inline V16 fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline float reduce_add(V16 a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(V16 a) { return _mm512_reduce_max_ps(a.v); }
// a >= b ? x : y, lane by lane
inline V16 select_ge(V16 a, V16 b, V16 x, V16 y) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ), y.v, x.v)};
}

inline V16 vexp(V16 a) {
    const __mmask16 keep = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ);  // NaN stays NaN
    return {_mm512_maskz_mov_ps(keep, exp16(a.v))};
}

// Horizontal sums of 16 vectors by a transposing tree (15 shuffle-and-add steps, not 16 full reductions), in two
// halves so that the caller can hold 4 vectors at a time: sum4 folds a[0 .. 3] into one vector holding their sums
// in pieces, sum16 turns 4 such vectors (a[0 .. 3], a[4 .. 7], ...) into lane j = the sum of a[j]'s lanes.
inline V16 sum4(const V16* a) {
    // per 128-bit lane: a0 (0 + 2, 1 + 3) interleaved with a1, then the same for a2, a3
    const __m512 r0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0].v, a[1].v), _mm512_unpackhi_ps(a[0].v, a[1].v));
    const __m512 r1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2].v, a[3].v), _mm512_unpackhi_ps(a[2].v, a[3].v));
    const __m512d x = _mm512_castps_pd(r0), y = _mm512_castps_pd(r1);  // per 128-bit lane: partial sums of a0 .. a3
    return {_mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))};
}
inline V16 sum16(const V16* w) {
    const auto fold = [](__m512 x, __m512 y) {  // [x.L0 + x.L2, x.L1 + x.L3, y.L0 + y.L2, y.L1 + y.L3]
        return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
    };
    const __m512 lo = fold(w[0].v, w[1].v), hi = fold(w[2].v, w[3].v);
    return {_mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)))};
}

#elif SMOLVLM_AVX2
struct V16 {
    __m256 lo, hi;
};
inline __m256i first_n8(int n) {  // lanes < n (n may be < 0 or > 8) all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V16 load_n(const float* p, int n) {
    return {_mm256_maskload_ps(p, first_n8(n)), _mm256_maskload_ps(p + 8, first_n8(n - 8))};
}
inline V16 load(const uint16_t* p) {  // 16 float16 -> float32
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline V16 load_n(const uint16_t* p, int n) {  // no 16-bit masked loads in AVX2: through a zeroed copy
    alignas(32) uint16_t t[16] = {};
    std::memcpy(t, p, static_cast<size_t>(n) * sizeof(uint16_t));
    return load(t);
}
inline void store(float* p, V16 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
inline void store_n(float* p, V16 a, int n) {
    _mm256_maskstore_ps(p, first_n8(n), a.lo);
    _mm256_maskstore_ps(p + 8, first_n8(n - 8), a.hi);
}
inline V16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 fma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_add(V16 a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max(V16 a) {
    const __m256 m = _mm256_max_ps(a.lo, a.hi);
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline V16 select_ge(V16 a, V16 b, V16 x, V16 y) {
    return {_mm256_blendv_ps(y.lo, x.lo, _mm256_cmp_ps(a.lo, b.lo, _CMP_GE_OQ)),
            _mm256_blendv_ps(y.hi, x.hi, _mm256_cmp_ps(a.hi, b.hi, _CMP_GE_OQ))};
}

inline V16 vexp(V16 a) { return {exp8(a.lo), exp8(a.hi)}; }

// sum4: the sums of a[0 .. 3] in pieces (lane j and j + 4 of .lo: a[j]'s two halves); sum16: lane 4i + j = the
// sum of the vector sum4 folded into w[i] at j.
inline V16 sum4(const V16* a) {
    __m256 s[4];
    for (int j = 0; j < 4; ++j) s[j] = _mm256_add_ps(a[j].lo, a[j].hi);
    return {_mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3])), _mm256_setzero_ps()};
}
inline V16 sum16(const V16* w) {
    const auto halves = [](__m256 x, __m256 y) {
        return _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
    };
    return {halves(w[0].lo, w[1].lo), halves(w[2].lo, w[3].lo)};
}

#else
struct V16 {
    float v[16];
};
inline V16 load(const float* p) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = p[i];
    return r;
}
inline V16 load_n(const float* p, int n) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = i < n ? p[i] : 0.f;
    return r;
}
inline V16 load(const uint16_t* p) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = f16_to_f32(p[i]);
    return r;
}
inline V16 load_n(const uint16_t* p, int n) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = i < n ? f16_to_f32(p[i]) : 0.f;
    return r;
}
inline void store(float* p, V16 a) {
    for (int i = 0; i < 16; ++i) p[i] = a.v[i];
}
inline void store_n(float* p, V16 a, int n) {
    for (int i = 0; i < n; ++i) p[i] = a.v[i];
}
inline V16 set1(float x) {
    V16 r;
    for (float& e : r.v) e = x;
    return r;
}
template <class F>
inline V16 lanes(V16 a, V16 b, F f) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = f(a.v[i], b.v[i]);
    return r;
}
inline V16 fma(V16 a, V16 b, V16 c) {
    for (int i = 0; i < 16; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
}
inline V16 operator+(V16 a, V16 b) { return lanes(a, b, [](float x, float y) { return x + y; }); }
inline V16 operator-(V16 a, V16 b) { return lanes(a, b, [](float x, float y) { return x - y; }); }
inline V16 operator*(V16 a, V16 b) { return lanes(a, b, [](float x, float y) { return x * y; }); }
inline V16 vmax(V16 a, V16 b) { return lanes(a, b, [](float x, float y) { return x > y ? x : y; }); }
inline float reduce_add(V16 a) {
    float s = 0.f;
    for (float e : a.v) s += e;
    return s;
}
inline float reduce_max(V16 a) {
    float m = a.v[0];
    for (float e : a.v) m = e > m ? e : m;
    return m;
}
inline V16 select_ge(V16 a, V16 b, V16 x, V16 y) {
    for (int i = 0; i < 16; ++i) x.v[i] = a.v[i] >= b.v[i] ? x.v[i] : y.v[i];
    return x;
}
inline V16 vexp(V16 a) {
    for (float& e : a.v) e = e < kExpMin ? 0.f : std::exp(e);
    return a;
}
// sum4: lane j < 4 = the sum of a[j]; sum16: lane 4i + j = lane j of w[i].
inline V16 sum4(const V16* a) {
    V16 r = set1(0.f);
    for (int j = 0; j < 4; ++j) r.v[j] = reduce_add(a[j]);
    return r;
}
inline V16 sum16(const V16* w) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = w[i / 4].v[i % 4];
    return r;
}
#endif

inline V16 zero() { return set1(0.f); }

// ---------------------------------------------------------------- shared

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch, 64-byte aligned so that the row vectors of the tiles never straddle cache lines.
template <class T>
T* scratch(std::vector<T>& buf, int64_t n) {
    constexpr int64_t pad = 64 / sizeof(T);
    if (static_cast<int64_t>(buf.size()) < n + pad) buf.resize(static_cast<size_t>(n + pad));
    const auto addr = reinterpret_cast<uintptr_t>(buf.data());
    return buf.data() + ((64 - addr % 64) % 64) / sizeof(T);
}

// off[i] = where KV head h's row of key t0 + i starts in the cache (in elements), for i < n.
void key_offsets(const PagedDecode& a, const int32_t* table, int64_t h, int64_t t0, int64_t n, int64_t* off) {
    const int64_t row = a.Hkv * a.Dh, block = a.block_size * row;
    int64_t b = t0 / a.block_size, o = t0 % a.block_size;
    for (int64_t i = 0; i < n; ++i) {
        off[i] = table[b] * block + o * row + h * a.Dh;
        if (++o == a.block_size) o = 0, ++b;
    }
}

// f(integral_constant<N>) for the runtime n in N .. MAX: the tile shapes below are template parameters.
template <int N, int MAX, class F>
void with_int(int n, F&& f) {
    if constexpr (N < MAX) {
        if (n != N) return with_int<N + 1, MAX>(n, f);
    }
    f(std::integral_constant<int, N>{});
}

// f(integral_constant<A>, integral_constant<B>) for runtime A in 1 .. MA, B in 1 .. MB.
template <int MA, int MB, class F>
void dispatch(int A, int B, F&& f) {
    with_int<1, MA>(A, [&](auto a) { with_int<1, MB>(B, [&](auto b) { f(a, b); }); });
}

// ---------------------------------------------------------------- decode pieces

constexpr int64_t kPieceKeys = 128;  // the shortest piece: pays for claiming it (contended atomics) and the merge
constexpr int64_t kMaxPieces = 16;   // longer contexts get longer pieces, so the merge stays small

int64_t piece_keys(int64_t seq_len) {
    return round_up(std::max(kPieceKeys, (seq_len + kMaxPieces - 1) / kMaxPieces), 16);
}

// Asks for every cache line of the rows at off[0 .. n) (`row` elements each) ahead of use. A decode step reads
// the cache once, after the weights have streamed through L3, so the rows come from memory; and a tile reads its
// rows KV head by KV head (a third of each row, then the next third), which the hardware prefetchers follow badly.
template <class E>
inline void prefetch_rows(const E* cache, const int64_t* off, int64_t n, int64_t row) {
    const uintptr_t bytes = static_cast<uintptr_t>(row) * sizeof(E);
    for (int64_t j = 0; j < n; ++j) {
        const auto start = reinterpret_cast<uintptr_t>(cache + off[j]);
        // into L2 (locality 1: prefetcht2): a piece's rows fit there, and L1 misses stay free for the loads
        for (uintptr_t line = start & ~uintptr_t{63}; line < start + bytes; line += 64)
            __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 1);
    }
}

// s[g, j] (+)= q_g . k_j for NG <= 3 heads (q [NG, ldq], zero-padded) over one d-chunk of NV <= 4 vectors (the
// last one `tail` lanes wide), keys j < nk <= 16. Four keys at a time: each key row is loaded once for the NG heads,
// whose queries stay in registers, and each head's 4 sums are folded at once (sum4), finished every 16 keys.
// FULL (nk = 16) drops the checks for missing keys.
template <int NV, int NG, bool FULL, class E>
void score16(const float* q, int64_t ldq, const E* cache, const int64_t* off, int nk, int tail, float* s,
             int64_t lds, bool add) {
    V16 qv[NG][NV], w[NG][4];
    for (int g = 0; g < NG; ++g)
        for (int v = 0; v < NV; ++v) qv[g][v] = load(q + g * ldq + 16 * v);
#pragma GCC unroll 4
    for (int grp = 0; grp < 4; ++grp) {
        V16 acc[NG][4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            if (!FULL && 4 * grp + j >= nk) {
                for (int g = 0; g < NG; ++g) acc[g][j] = zero();
                continue;
            }
            const E* k = cache + off[4 * grp + j];
            V16 kv[NV];
            for (int v = 0; v < NV - 1; ++v) kv[v] = load(k + 16 * v);
            kv[NV - 1] = load_n(k + 16 * (NV - 1), tail);
            for (int g = 0; g < NG; ++g) {
                V16 x = kv[0] * qv[g][0];
                for (int v = 1; v < NV; ++v) x = fma(kv[v], qv[g][v], x);
                acc[g][j] = x;
            }
        }
        for (int g = 0; g < NG; ++g) w[g][grp] = sum4(acc[g]);
    }
    if (FULL) nk = 16;
    for (int g = 0; g < NG; ++g) {
        V16 r = sum16(w[g]);
        if (add) r = r + load_n(s + g * lds, nk);
        store_n(s + g * lds, r, nk);
    }
}

// s [Hq, lds] = q_i . k_j for up to 16 keys (rows at off) and every query head (qs [Hq, ldq], zero-padded): KV head
// by KV head, so the keys' rows are read front to back; its query heads 3 at a time, d in chunks of 64.
template <class E>
void score_tile(const PagedDecode& a, const float* qs, int64_t ldq, const int64_t* off, int nk, float* s,
                int64_t lds) {
    const int64_t G = a.Hq / a.Hkv;
    for (int64_t h = 0; h < a.Hkv; ++h)
        for (int64_t g0 = h * G; g0 < (h + 1) * G; g0 += 3)
            for (int64_t d0 = 0; d0 < a.Dh; d0 += 64) {
                const int64_t width = std::min<int64_t>(64, a.Dh - d0), nv = (width + 15) / 16;
                const int tail = static_cast<int>(width - 16 * (nv - 1));
                const E* k = static_cast<const E*>(a.k_cache) + h * a.Dh + d0;
                dispatch<4, 3>(static_cast<int>(nv), static_cast<int>(std::min<int64_t>(3, (h + 1) * G - g0)),
                               [&](auto nvc, auto ng) {
                                   constexpr int NV = decltype(nvc)::value, NG = decltype(ng)::value;
                                   if (nk == 16)
                                       score16<NV, NG, true>(qs + g0 * ldq + d0, ldq, k, off, 16, tail, s + g0 * lds,
                                                             lds, d0 > 0);
                                   else
                                       score16<NV, NG, false>(qs + g0 * ldq + d0, ldq, k, off, nk, tail, s + g0 * lds,
                                                              lds, d0 > 0);
                               });
            }
}

// acc[g, d0 .. d0 + width) += sum_t p[g, t] v_t for NG heads, NV vectors of d and n keys, in registers meanwhile.
template <int NG, int NV, class E>
void values_tile(const float* p, int64_t ldp, const E* cache, const int64_t* off, int64_t n, int tail,
                 float* acc, int64_t lda) {
    V16 a[NG][NV];
    for (int g = 0; g < NG; ++g) {
        for (int i = 0; i < NV - 1; ++i) a[g][i] = load(acc + g * lda + 16 * i);
        a[g][NV - 1] = load_n(acc + g * lda + 16 * (NV - 1), tail);
    }
    for (int64_t t = 0; t < n; ++t) {
        const E* v = cache + off[t];
        V16 vv[NV];
        for (int i = 0; i < NV - 1; ++i) vv[i] = load(v + 16 * i);
        vv[NV - 1] = load_n(v + 16 * (NV - 1), tail);
        for (int g = 0; g < NG; ++g) {
            const V16 w = set1(p[g * ldp + t]);
            for (int i = 0; i < NV; ++i) a[g][i] = fma(w, vv[i], a[g][i]);
        }
    }
    for (int g = 0; g < NG; ++g) {
        for (int i = 0; i < NV - 1; ++i) store(acc + g * lda + 16 * i, a[g][i]);
        store_n(acc + g * lda + 16 * (NV - 1), a[g][NV - 1], tail);
    }
}

// acc [Hq, Dh] += p [Hq, ldp] times the value rows at off (n keys), KV head by KV head, in tiles of 4 query heads
// x 64 features.
template <class E>
void values_keys(const PagedDecode& a, const float* p, int64_t ldp, const int64_t* off, int64_t n, float* acc) {
    const int64_t G = a.Hq / a.Hkv, Dh = a.Dh;
    for (int64_t h = 0; h < a.Hkv; ++h)
        for (int64_t g0 = h * G; g0 < (h + 1) * G; g0 += 4)
            for (int64_t d0 = 0; d0 < Dh; d0 += 64) {
                const int64_t width = std::min<int64_t>(64, Dh - d0), nv = (width + 15) / 16;
                const int tail = static_cast<int>(width - 16 * (nv - 1));
                dispatch<4, 4>(static_cast<int>(std::min<int64_t>(4, (h + 1) * G - g0)), static_cast<int>(nv),
                               [&](auto ng, auto nvc) {
                                   values_tile<decltype(ng)::value, decltype(nvc)::value>(
                                       p + g0 * ldp, ldp, static_cast<const E*>(a.v_cache) + h * Dh + d0, off, n,
                                       tail, acc + g0 * Dh + d0, Dh);
                               });
            }
}

// Turns s[0 .. n) into exp(s - max), padded with zeros up to a multiple of 16; returns the max, *sum their sum.
float softmax_numerators(float* s, int64_t n, float* sum) {
    const int64_t n16 = round_up(n, 16);
    std::fill(s + n, s + n16, -INFINITY);
    V16 m = set1(-INFINITY);
    for (int64_t t = 0; t < n16; t += 16) m = vmax(m, load(s + t));
    const float mx = reduce_max(m);
    const V16 mv = set1(mx);
    V16 acc = zero();
    for (int64_t t = 0; t < n16; t += 16) {
        const V16 e = vexp(load(s + t) - mv);
        store(s + t, e);
        acc = acc + e;
    }
    *sum = reduce_add(acc);
    return mx;
}

// ---------------------------------------------------------------- prefill tiles

constexpr int64_t kTileRows = 64;        // rows (queries x G heads) per causal tile: Qt, Ot, scores stay in L1
constexpr int64_t kDenseTileRows = 128;  // non-causal (the vision encoder): fewer passes over K and V, ~4% faster
constexpr int64_t kKeyBlock = 64;        // keys per online-softmax step
// Register tiles (keys x row vectors of St, features x row vectors of Ot): 6 x 4 accumulators fill AVX-512's 32
// registers (~8% faster than 4 x 4 on the vision shape); AVX2 has half the registers (and two per V16).
#if SMOLVLM_AVX512
constexpr int kTileKeys = 6, kTileFeatures = 6;
#else
constexpr int kTileKeys = 4, kTileFeatures = 4;
#endif

// St[k, rv] = sum_d K[k, d] Qt[d, rv] for KT keys and RV row vectors (of 16 rows).
template <int KT, int RV>
void qk_tile(const float* cache, const int64_t* off, const float* qt, int64_t ldq, int64_t Dh, float* st,
             int64_t lds) {
    V16 acc[KT][RV];
    for (auto& row : acc)
        for (V16& x : row) x = zero();
    const float* k[KT];
    for (int i = 0; i < KT; ++i) k[i] = cache + off[i];
    for (int64_t d = 0; d < Dh; ++d) {
        V16 qv[RV];
        for (int r = 0; r < RV; ++r) qv[r] = load(qt + d * ldq + 16 * r);
        for (int i = 0; i < KT; ++i) {
            const V16 kb = set1(k[i][d]);
            for (int r = 0; r < RV; ++r) acc[i][r] = fma(kb, qv[r], acc[i][r]);
        }
    }
    for (int i = 0; i < KT; ++i)
        for (int r = 0; r < RV; ++r) store(st + i * lds + 16 * r, acc[i][r]);
}

// Ot[d, rv] = alpha[rv] Ot[d, rv] + sum_k V[k, d] P[k, rv] for DT features and RV row vectors.
template <int DT, int RV>
void pv_tile(const float* cache, const int64_t* off, int64_t nk, const float* p, int64_t ldp, const float* alpha,
             float* ot, int64_t ldo) {
    V16 acc[DT][RV];
    for (int r = 0; r < RV; ++r) {
        const V16 al = load(alpha + 16 * r);
        for (int i = 0; i < DT; ++i) acc[i][r] = load(ot + i * ldo + 16 * r) * al;
    }
    for (int64_t k = 0; k < nk; ++k) {
        const float* v = cache + off[k];
        V16 pv[RV];
        for (int r = 0; r < RV; ++r) pv[r] = load(p + k * ldp + 16 * r);
        for (int i = 0; i < DT; ++i) {
            const V16 vb = set1(v[i]);
            for (int r = 0; r < RV; ++r) acc[i][r] = fma(vb, pv[r], acc[i][r]);
        }
    }
    for (int i = 0; i < DT; ++i)
        for (int r = 0; r < RV; ++r) store(ot + i * ldo + 16 * r, acc[i][r]);
}

// One tile's state, all [.., W] with W = its rows rounded up to 16 (the padding rows copy the last query's
// position, so they stay finite; their results are dropped).
struct TileState {
    int64_t W;
    float *qt, *ot, *st;       // [Dh, W] scaled queries, [Dh, W] output accumulators, [kKeyBlock, W] scores
    float *m, *l, *alpha, *j;  // [W] running max, running sum, this block's rescale, the row's query index
    int64_t* off;              // [kKeyBlock] cache offsets of the block's keys
};

// St = K Qt for the nk keys at cache + off[i].
void block_scores(const TileState& t, const float* cache, const int64_t* off, int64_t nk, int64_t Dh) {
    for (int64_t k0 = 0; k0 < nk; k0 += kTileKeys)
        for (int64_t r0 = 0; r0 < t.W / 16; r0 += 4)
            dispatch<kTileKeys, 4>(static_cast<int>(std::min<int64_t>(kTileKeys, nk - k0)),
                                   static_cast<int>(std::min<int64_t>(4, t.W / 16 - r0)), [&](auto kt, auto rv) {
                                       qk_tile<decltype(kt)::value, decltype(rv)::value>(
                                           cache, off + k0, t.qt + 16 * r0, t.W, Dh, t.st + k0 * t.W + 16 * r0, t.W);
                                   });
}

// Keys past a row's own position -> -inf. rel = key position - the tile's first query position, per key.
void causal_mask(const TileState& t, int64_t nk, int64_t rel0) {
    const V16 ninf = set1(-INFINITY);
    for (int64_t k = std::max<int64_t>(0, 1 - rel0); k < nk; ++k) {  // rel <= 0: every row sees the key
        const V16 rel = set1(static_cast<float>(rel0 + k));
        for (int64_t r = 0; r < t.W; r += 16) {
            float* s = t.st + k * t.W + r;
            store(s, select_ge(load(t.j + r), rel, load(s), ninf));
        }
    }
}

// Online softmax: m = max(m, block max), alpha = exp(old m - m), St -> exp(St - m), l = alpha l + row sums.
// The first block turns m from -inf to finite (every row sees key 0), so alpha = exp(-inf) = 0 there.
void block_softmax(const TileState& t, int64_t nk) {
    for (int64_t r = 0; r < t.W; r += 16) {
        V16 bm = set1(-INFINITY);
        for (int64_t k = 0; k < nk; ++k) bm = vmax(bm, load(t.st + k * t.W + r));
        const V16 m_old = load(t.m + r), m = vmax(m_old, bm);
        const V16 alpha = vexp(m_old - m);
        V16 sum = zero();
        for (int64_t k = 0; k < nk; ++k) {
            const V16 e = vexp(load(t.st + k * t.W + r) - m);
            store(t.st + k * t.W + r, e);
            sum = sum + e;
        }
        store(t.m + r, m);
        store(t.alpha + r, alpha);
        store(t.l + r, fma(load(t.l + r), alpha, sum));
    }
}

// Ot = alpha Ot + V^T P for the nk keys at cache + off[i].
void block_values(const TileState& t, const float* cache, const int64_t* off, int64_t nk, int64_t Dh) {
    for (int64_t d0 = 0; d0 < Dh; d0 += kTileFeatures)
        for (int64_t r0 = 0; r0 < t.W / 16; r0 += 4)
            dispatch<kTileFeatures, 4>(
                static_cast<int>(std::min<int64_t>(kTileFeatures, Dh - d0)),
                static_cast<int>(std::min<int64_t>(4, t.W / 16 - r0)), [&](auto dt, auto rv) {
                    pv_tile<decltype(dt)::value, decltype(rv)::value>(cache + d0, off, nk, t.st + 16 * r0, t.W,
                                                                      t.alpha + 16 * r0, t.ot + d0 * t.W + 16 * r0,
                                                                      t.W);
                });
}

// dst [n, Dh] = the float16 rows at src + off[i], widened: a float16 cache's key block for the float32 tiles.
void widen_rows(const uint16_t* src, const int64_t* off, int64_t n, int64_t Dh, float* dst) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t d0 = 0; d0 < Dh; d0 += 16) {
            const int w = static_cast<int>(std::min<int64_t>(16, Dh - d0));
            store_n(dst + i * Dh + d0, load_n(src + off[i] + d0, w), w);
        }
}

// ---------------------------------------------------------------- work items

struct Item {
    int64_t row;     // q / out row of its first query
    int64_t cost;    // multiply-adds, to hand out the big items first
    int32_t s, h;
    int32_t t0, t1;  // a decode piece: keys t0 .. t1 - 1; a tile: its first query's position, keys it sees (< t1)
    int32_t nq;      // a tile's queries; 0 for a decode piece
    int32_t split;   // a decode piece: its sequence's slot in Job::splits, -1 when it is the only piece
    int32_t piece;
};

struct Split {  // a sequence whose decode is cut into pieces
    int64_t row, offset;  // its query row, its pieces' partial results in Job::partial
    int32_t pieces;
};

struct Job {
    const PagedDecode& a;
    float* out;
    std::vector<Item> items;
    std::vector<Split> splits;
    std::unique_ptr<std::atomic<int32_t>[]> remaining;  // per split: pieces not finished yet
    std::unique_ptr<float[]> partial;                    // per piece: m [Hq], l [Hq], acc [Hq, Dh]
    bool causal = true;                                  // prefill tiles: false, every query sees all the keys

    int64_t G() const { return a.Hq / a.Hkv; }
    int64_t piece_floats() const { return a.Hq * (a.Dh + 2); }

    void add_decode(int32_t s, int64_t row);
    void add_prefill(int32_t s, int64_t row, int64_t q_len);
    void run();
    template <class E>
    void run_piece(const Item& it);  // E: the cache's element type
    void merge(const Split& sp) const;
    void run_tile(const Item& it) const;

    static void task(void* ctx, int64_t i) {
        Job& job = *static_cast<Job*>(ctx);
        const Item& it = job.items[static_cast<size_t>(i)];
        if (it.nq != 0) job.run_tile(it);
        else if (job.a.kv == KvType::f16) job.run_piece<uint16_t>(it);
        else job.run_piece<float>(it);
    }
};

// The decode pieces of sequence s (its query in row `row`); a piece covers every KV head of its keys, so that it
// reads whole cache rows.
void Job::add_decode(int32_t s, int64_t row) {
    const int64_t L = a.seq_lens[s], len = piece_keys(L), pieces = (L + len - 1) / len;
    int32_t split = -1;
    if (pieces > 1) {
        split = static_cast<int32_t>(splits.size());
        const int64_t offset = splits.empty() ? 0 : splits.back().offset + splits.back().pieces * piece_floats();
        splits.push_back({row, offset, static_cast<int32_t>(pieces)});
    }
    for (int64_t i = 0; i < pieces; ++i) {
        const int64_t t0 = i * len, t1 = std::min(L, t0 + len);
        items.push_back({row, 2 * a.Hq * (t1 - t0) * a.Dh, s, 0, static_cast<int32_t>(t0), static_cast<int32_t>(t1),
                         0, split, static_cast<int32_t>(i)});
    }
}

// The query tiles of sequence s (q_len queries from row `row`), for every KV head.
void Job::add_prefill(int32_t s, int64_t row, int64_t q_len) {
    const int64_t first = a.seq_lens[s] - q_len;
    const int64_t per_tile = std::max<int64_t>(1, (causal ? kTileRows : kDenseTileRows) / G());
    for (int64_t q0 = 0; q0 < q_len; q0 += per_tile) {
        const int64_t nq = std::min(per_tile, q_len - q0), seen = causal ? first + q0 + nq : a.seq_lens[s];
        for (int32_t h = 0; h < a.Hkv; ++h)
            items.push_back({row + q0, 2 * G() * nq * seen * a.Dh, s, h, static_cast<int32_t>(first + q0),
                             static_cast<int32_t>(seen), static_cast<int32_t>(nq), -1, 0});
    }
}

void Job::run() {
    if (items.empty()) return;
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
    if (!splits.empty()) {
        remaining.reset(new std::atomic<int32_t>[splits.size()]);
        for (size_t i = 0; i < splits.size(); ++i) remaining[i].store(splits[i].pieces, std::memory_order_relaxed);
        // not zeroed: each piece writes its whole slot (zeroing here would pull the lines the other cores
        // wrote last call over to this one, before any piece starts)
        partial.reset(new float[static_cast<size_t>(splits.back().offset + splits.back().pieces * piece_floats())]);
    }
    int64_t work = 0;
    for (const Item& it : items) work += it.cost;
    parallel_for(&Job::task, this, static_cast<int64_t>(items.size()), work);
}

template <class E>
void Job::run_piece(const Item& it) {
    const int64_t Hq = a.Hq, Dh = a.Dh, n = it.t1 - it.t0, W = round_up(Dh, 16), n16 = round_up(n, 16);
    thread_local std::vector<float> floats;
    thread_local std::vector<int64_t> offsets;
    float* qs = scratch(floats, Hq * W + Hq * n16 + Hq * (Dh + 2));  // [Hq, W] scaled queries, zero-padded
    float* sc = qs + Hq * W;                                         // [Hq, n16] scores, then numerators
    float* m = sc + Hq * n16;                                        // m [Hq], l [Hq], acc [Hq, Dh]
    float *l = m + Hq, *acc = l + Hq;
    int64_t* off = scratch(offsets, n);                              // KV head 0's row of each key
    // K, then V, 16 keys at a time, the next 16 keys' rows asked for meanwhile (the first ones before the work
    // that precedes each pass)
    const E *kc = static_cast<const E*>(a.k_cache), *vc = static_cast<const E*>(a.v_cache);
    const int64_t row = a.Hkv * Dh;
    key_offsets(a, a.block_tables + it.s * a.max_blocks, 0, it.t0, n, off);
    prefetch_rows(kc, off, std::min<int64_t>(16, n), row);
    const float* q = a.q + it.row * Hq * Dh;
    for (int64_t i = 0; i < Hq; ++i) {
        for (int64_t d = 0; d < Dh; ++d) qs[i * W + d] = q[i * Dh + d] * a.scale;
        std::fill(qs + i * W + Dh, qs + (i + 1) * W, 0.f);
    }
    for (int64_t t = 0; t < n; t += 16) {
        prefetch_rows(kc, off + t + 16, std::min<int64_t>(16, n - t - 16), row);
        score_tile<E>(a, qs, W, off + t, static_cast<int>(std::min<int64_t>(16, n - t)), sc + t, n16);
    }
    prefetch_rows(vc, off, std::min<int64_t>(16, n), row);
    for (int64_t i = 0; i < Hq; ++i) m[i] = softmax_numerators(sc + i * n16, n, l + i);
    std::fill(acc, acc + Hq * Dh, 0.f);
    for (int64_t t = 0; t < n; t += 16) {
        prefetch_rows(vc, off + t + 16, std::min<int64_t>(16, n - t - 16), row);
        values_keys<E>(a, sc + t, n16, off + t, std::min<int64_t>(16, n - t), acc);
    }

    if (it.split < 0) {
        float* o = out + it.row * Hq * Dh;
        for (int64_t i = 0; i < Hq; ++i)
            for (int64_t d = 0; d < Dh; ++d) o[i * Dh + d] = acc[i * Dh + d] / l[i];
        return;
    }
    // accumulated here, in this core's cache; the slot, which the merging thread reads, is written once
    std::copy(m, m + piece_floats(), partial.get() + splits[it.split].offset + it.piece * piece_floats());
    if (remaining[it.split].fetch_sub(1, std::memory_order_acq_rel) == 1)
        merge(splits[it.split]);  // the last piece: the others' partial results are visible now
}

// out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i over the split's pieces, M = max_i m_i, in piece order.
void Job::merge(const Split& sp) const {
    const int64_t Hq = a.Hq, Dh = a.Dh, stride = piece_floats();
    const float* base = partial.get() + sp.offset;  // piece i: m [Hq], l [Hq], acc [Hq, Dh] at base + i stride
    float* o = out + sp.row * Hq * Dh;
    for (int64_t h = 0; h < Hq; ++h) {
        alignas(64) float w[kMaxPieces];  // the pieces' m_i, then their weights e^(m_i - M), all at once
        float M = -INFINITY, den = 0.f;
        for (int32_t i = 0; i < sp.pieces; ++i) M = std::max(M, w[i] = base[i * stride + h]);
        store_n(w, vexp(load_n(w, sp.pieces) - set1(M)), sp.pieces);
        for (int32_t i = 0; i < sp.pieces; ++i) den += w[i] * base[i * stride + Hq + h];
        for (int64_t d0 = 0; d0 < Dh; d0 += 16) {
            const int n = static_cast<int>(std::min<int64_t>(16, Dh - d0));
            V16 num = zero();
            for (int32_t i = 0; i < sp.pieces; ++i)
                num = fma(set1(w[i]), load_n(base + i * stride + 2 * Hq + h * Dh + d0, n), num);
            store_n(o + h * Dh + d0, num * set1(1.f / den), n);
        }
    }
}

void Job::run_tile(const Item& it) const {
    const int64_t G = this->G(), Dh = a.Dh, R = G * it.nq, W = round_up(R, 16);
    thread_local std::vector<float> floats;
    thread_local std::vector<int64_t> offsets;
    const bool f16 = a.kv == KvType::f16;
    float* base = scratch(floats, (2 * Dh + kKeyBlock + 4) * W + (f16 ? 2 * kKeyBlock * Dh : 0));
    TileState t{W, base, base + Dh * W, base + 2 * Dh * W, nullptr, nullptr, nullptr, nullptr,
                scratch(offsets, 2 * kKeyBlock)};
    t.m = t.st + kKeyBlock * W, t.l = t.m + W, t.alpha = t.l + W, t.j = t.alpha + W;
    // a float16 cache: each key block's K and V rows widened into kf, vf [kKeyBlock, Dh], row i at dense[i]
    float *kf = t.j + W, *vf = kf + kKeyBlock * Dh;
    int64_t* dense = t.off + kKeyBlock;
    for (int64_t i = 0; i < kKeyBlock; ++i) dense[i] = i * Dh;

    // Qt[d, r] = scale q[row + r / G, h G + r % G, d]; padding rows 0
    std::fill(t.qt, t.qt + Dh * W, 0.f);
    for (int64_t r = 0; r < R; ++r) {
        const float* q = a.q + ((it.row + r / G) * a.Hq + it.h * G + r % G) * Dh;
        for (int64_t d = 0; d < Dh; ++d) t.qt[d * W + r] = q[d] * a.scale;
    }
    for (int64_t r = 0; r < W; ++r) t.j[r] = static_cast<float>(std::min(r, R - 1) / G);
    std::fill(t.ot, t.ot + Dh * W, 0.f);
    std::fill(t.m, t.m + W, -INFINITY);
    std::fill(t.l, t.l + W, 0.f);

    const int32_t* table = a.block_tables + it.s * a.max_blocks;
    for (int64_t k0 = 0; k0 < it.t1; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, it.t1 - k0);
        key_offsets(a, table, it.h, k0, nk, t.off);
        const float *kc = static_cast<const float*>(a.k_cache), *vc = static_cast<const float*>(a.v_cache);
        const int64_t* off = t.off;
        if (f16) {
            widen_rows(static_cast<const uint16_t*>(a.k_cache), t.off, nk, Dh, kf);
            widen_rows(static_cast<const uint16_t*>(a.v_cache), t.off, nk, Dh, vf);
            kc = kf, vc = vf, off = dense;
        }
        block_scores(t, kc, off, nk, Dh);
        if (causal && k0 + nk - 1 > it.t0) causal_mask(t, nk, k0 - it.t0);
        block_softmax(t, nk);
        block_values(t, vc, off, nk, Dh);
    }

    for (int64_t r = 0; r < R; ++r) {
        float* o = out + ((it.row + r / G) * a.Hq + it.h * G + r % G) * Dh;
        const float inv = 1.f / t.l[r];
        for (int64_t d = 0; d < Dh; ++d) o[d] = t.ot[d * W + r] * inv;
    }
}

}  // namespace

void paged_decode_attention(const PagedDecode& a, float* out) {
    if (a.S == 0 || a.Hkv == 0) return;
    Job job{a, out, {}, {}, {}, {}};
    for (int32_t s = 0; s < a.S; ++s) job.add_decode(s, s);
    job.run();
}

void paged_prefill_attention(const PagedPrefill& a, float* out) {
    if (a.S == 0 || a.Hkv == 0) return;
    Job job{a, out, {}, {}, {}, {}, a.causal};
    for (int32_t s = 0; s < a.S; ++s) {
        const int64_t row = a.query_start_loc[s], q_len = a.query_start_loc[s + 1] - row;
        if (q_len == 1) job.add_decode(s, row);
        else if (q_len > 1) job.add_prefill(s, row, q_len);
    }
    job.run();
}

}  // namespace smolvlm_cpu
