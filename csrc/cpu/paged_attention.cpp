// Decode attention over the paged KV cache: one query per sequence, float32 scores, softmax and accumulation.
//
// A chunk of work is one (sequence, KV head): its G = Hq / Hkv query heads are scaled once, then every key row
// (found through the block table) is read once for all G dot products, the scores get a numerically stable
// softmax (max, exp, sum), and every value row is read once and added into G float32 accumulators. Chunks write
// disjoint heads of `out`, so the thread pool runs them in any order with identical results.
// SIMD over head_dim: AVX-512 (a masked tail for head_dim % 16), AVX2 (a scalar tail), else plain loops.
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "quant_gemm.h"  // parallel_for

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__)
#define SMOLVLM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define SMOLVLM_AVX2 1
#endif

#if SMOLVLM_AVX512 || SMOLVLM_AVX2
#include <immintrin.h>
#endif

namespace smolvlm_cpu {
namespace {

#if SMOLVLM_AVX2
inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// sum_d a[d] * b[d]
inline float dot(const float* a, const float* b, int64_t n) {
    int64_t d = 0;
#if SMOLVLM_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    if (d < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - d)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + d), _mm512_maskz_loadu_ps(k, b + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.f;
#if SMOLVLM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    s = hsum256(acc);
#endif
    for (; d < n; ++d) s += a[d] * b[d];
    return s;
#endif
}

// y[d] += w * x[d]
inline void axpy(float w, const float* x, float* y, int64_t n) {
    int64_t d = 0;
#if SMOLVLM_AVX512
    const __m512 wv = _mm512_set1_ps(w);
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(y + d, _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
    if (d < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - d)) - 1);
        _mm512_mask_storeu_ps(y + d, k,
                              _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(k, x + d), _mm512_maskz_loadu_ps(k, y + d)));
    }
    return;
#elif SMOLVLM_AVX2
    const __m256 wv = _mm256_set1_ps(w);
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(y + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
#endif
    for (; d < n; ++d) y[d] += w * x[d];
}

#if SMOLVLM_AVX512
// exp(x) for 16 lanes, within a few ulp (Cephes expf: 2^n * e^r, |r| <= ln2 / 2, degree-6 polynomial); scalef
// takes very negative x smoothly to 0.
inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif

// sc[t] = exp(sc[t] - max(sc)) for t < n; returns their sum.
float softmax_numerators(float* sc, int64_t n) {
    int64_t t = 0;
#if SMOLVLM_AVX512
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sc + t));
    if (t < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - t)) - 1);
        mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, sc + t));
    }
#endif
    float m = -INFINITY;
#if SMOLVLM_AVX512
    m = _mm512_reduce_max_ps(mv);
#else
    for (; t < n; ++t) m = std::max(m, sc[t]);
#endif
    float sum = 0.f;
    t = 0;
#if SMOLVLM_AVX512
    const __m512 mm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + t), mm));
        _mm512_storeu_ps(sc + t, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (t < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + t), mm));
        _mm512_mask_storeu_ps(sc + t, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#else
    for (; t < n; ++t) sum += (sc[t] = std::exp(sc[t] - m));
#endif
    return sum;
}

struct Decode {
    const PagedDecode* a;
    float* out;

    static void task(void* ctx, int64_t chunk) { static_cast<Decode*>(ctx)->run(chunk); }

    void run(int64_t chunk) const {
        const PagedDecode& p = *a;
        const int64_t s = chunk / p.Hkv, h = chunk % p.Hkv, G = p.Hq / p.Hkv, Dh = p.Dh, L = p.seq_lens[s];
        const int64_t row_stride = p.Hkv * Dh, block_stride = p.block_size * row_stride;
        const int32_t* table = p.block_tables + s * p.max_blocks;
        thread_local std::vector<float> buf;
        buf.resize(static_cast<size_t>(G * (2 * Dh + L + 1)));
        float* qs = buf.data();       // [G, Dh] scaled queries
        float* acc = qs + G * Dh;     // [G, Dh] weighted sums of values
        float* scores = acc + G * Dh; // [G, L]
        float* total = scores + G * L; // [G] softmax denominators
        const float* q = p.q + (s * p.Hq + h * G) * Dh;
        for (int64_t i = 0; i < G * Dh; ++i) qs[i] = q[i] * p.scale;

        // scores[g, t] = q_g . k_t, each key row read once for the G heads
        for (int64_t t0 = 0, b = 0; t0 < L; t0 += p.block_size, ++b) {
            const float* k = p.k_cache + table[b] * block_stride + h * Dh;
            const int64_t n = std::min(p.block_size, L - t0);
            for (int64_t j = 0; j < n; ++j, k += row_stride)
                for (int64_t g = 0; g < G; ++g) scores[g * L + t0 + j] = dot(qs + g * Dh, k, Dh);
        }
        // softmax numerators, their sums
        for (int64_t g = 0; g < G; ++g) total[g] = softmax_numerators(scores + g * L, L);
        // acc[g] = sum_t p[g, t] v_t, each value row read once for the G heads
        std::fill(acc, acc + G * Dh, 0.f);
        for (int64_t t0 = 0, b = 0; t0 < L; t0 += p.block_size, ++b) {
            const float* v = p.v_cache + table[b] * block_stride + h * Dh;
            const int64_t n = std::min(p.block_size, L - t0);
            for (int64_t j = 0; j < n; ++j, v += row_stride)
                for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + t0 + j], v, acc + g * Dh, Dh);
        }
        float* o = out + (s * p.Hq + h * G) * Dh;
        for (int64_t g = 0; g < G; ++g) {
            const float inv = 1.f / total[g];
            for (int64_t d = 0; d < Dh; ++d) o[g * Dh + d] = acc[g * Dh + d] * inv;
        }
    }
};

}  // namespace

void paged_decode_attention(const PagedDecode& a, float* out) {
    if (a.S == 0 || a.Hkv == 0) return;
    int64_t keys = 0;
    for (int64_t s = 0; s < a.S; ++s) keys += a.seq_lens[s];
    Decode job{&a, out};
    parallel_for(&Decode::task, &job, a.S * a.Hkv, 2 * keys * a.Hq * a.Dh);
}

}  // namespace smolvlm_cpu
