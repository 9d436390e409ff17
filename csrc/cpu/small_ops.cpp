// LayerNorm and GELU (tanh) over the rows of a float32 matrix, chunks of rows shared out on the thread pool.
// A LayerNorm row takes three passes while it sits in L1 (sum, squared deviations, the affine output); GELU is
// one pass, z / (1 + exp(-2u)) with u = sqrt(2/pi) (z + 0.044715 z^3): 0.5 z (1 + tanh u) without the cancellation
// of 1 + tanh(u) near -1, and simd_math.h's exp. Lanes: 16 (AVX-512), 8 (AVX2 + FMA) or plain loops.
#include "small_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>


#include "simd.h"
#include "simd_math.h"  // exp16, gelu1, gelu16
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace {

#if SMOLVLM_AVX512
void gelu_row(const float* x, const float* bias, int64_t D, float* out) {
    for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 k = first_lanes(D - i);
        __m512 z = _mm512_maskz_loadu_ps(k, x + i);
        if (bias) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(k, bias + i));
        _mm512_mask_storeu_ps(out + i, k, gelu16(z));
    }
}

void layer_norm_row(const float* x, const float* w, const float* b, float eps, int64_t D, float* out) {
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 64 <= D; i += 64)
        for (int j = 0; j < 4; ++j) s[j] = _mm512_add_ps(s[j], _mm512_loadu_ps(x + i + 16 * j));
    for (; i < D; i += 16) s[0] = _mm512_add_ps(s[0], _mm512_maskz_loadu_ps(first_lanes(D - i), x + i));
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))) / D;
    const __m512 m = _mm512_set1_ps(mean);
    for (__m512& v : s) v = _mm512_setzero_ps();
    for (i = 0; i + 64 <= D; i += 64)
        for (int j = 0; j < 4; ++j) {
            const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16 * j), m);
            s[j] = _mm512_fmadd_ps(c, c, s[j]);
        }
    for (; i < D; i += 16) {
        const __mmask16 k = first_lanes(D - i);
        const __m512 c = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, x + i), m);
        s[0] = _mm512_fmadd_ps(c, c, s[0]);
    }
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))) / D;
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(var + eps));
    for (i = 0; i < D; i += 16) {
        const __mmask16 k = first_lanes(D - i);
        const __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m), r);
        const __m512 bb = b ? _mm512_maskz_loadu_ps(k, b + i) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(out + i, k, _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(k, w + i), bb));
    }
}

#elif SMOLVLM_AVX2
void gelu_row(const float* x, const float* bias, int64_t D, float* out) {
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
        __m256 z = _mm256_loadu_ps(x + i);
        if (bias) z = _mm256_add_ps(z, _mm256_loadu_ps(bias + i));
        const __m256 u = _mm256_mul_ps(z, _mm256_fmadd_ps(_mm256_mul_ps(z, z), _mm256_set1_ps(kGeluC1),
                                                          _mm256_set1_ps(kGeluC0)));
        __m256 a = _mm256_mul_ps(u, _mm256_set1_ps(-2.f));
        a = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(kGeluExpLo)), _mm256_set1_ps(kGeluExpHi));
        _mm256_storeu_ps(out + i, _mm256_div_ps(z, _mm256_add_ps(exp8(a), _mm256_set1_ps(1.f))));
    }
    for (; i < D; ++i) out[i] = gelu1(bias ? x[i] + bias[i] : x[i]);
}

inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

void layer_norm_row(const float* x, const float* w, const float* b, float eps, int64_t D, float* out) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + i + 8));
    }
    float sum = hsum8(_mm256_add_ps(s0, s1));
    for (; i < D; ++i) sum += x[i];
    const float mean = sum / D;
    const __m256 m = _mm256_set1_ps(mean);
    s0 = s1 = _mm256_setzero_ps();
    for (i = 0; i + 16 <= D; i += 16) {
        const __m256 c0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), m), c1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), m);
        s0 = _mm256_fmadd_ps(c0, c0, s0);
        s1 = _mm256_fmadd_ps(c1, c1, s1);
    }
    float sq = hsum8(_mm256_add_ps(s0, s1));
    for (; i < D; ++i) sq += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / std::sqrt(sq / D + eps);
    const __m256 r = _mm256_set1_ps(rstd);
    for (i = 0; i + 8 <= D; i += 8) {
        const __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r);
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(y, _mm256_loadu_ps(w + i),
                                                  b ? _mm256_loadu_ps(b + i) : _mm256_setzero_ps()));
    }
    for (; i < D; ++i) out[i] = (x[i] - mean) * rstd * w[i] + (b ? b[i] : 0.f);
}

#else
void gelu_row(const float* x, const float* bias, int64_t D, float* out) {
    for (int64_t i = 0; i < D; ++i) out[i] = gelu1(bias ? x[i] + bias[i] : x[i]);
}

void layer_norm_row(const float* x, const float* w, const float* b, float eps, int64_t D, float* out) {
    float sum = 0.f, sq = 0.f;
    for (int64_t i = 0; i < D; ++i) sum += x[i];
    const float mean = sum / D;
    for (int64_t i = 0; i < D; ++i) sq += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / std::sqrt(sq / D + eps);
    for (int64_t i = 0; i < D; ++i) out[i] = (x[i] - mean) * rstd * w[i] + (b ? b[i] : 0.f);
}
#endif

// ---------------------------------------------------------------- rows on the pool

constexpr int64_t kChunkFloats = 1 << 15;  // ~128 KB of x per chunk: many chunks per thread, each worth a claim

struct Rows {
    const float *x, *w, *b;
    float eps;
    int64_t M, D, rows_per_chunk;
    float* out;
};

template <bool LN>
void rows_task(void* ctx, int64_t c) {
    const Rows& a = *static_cast<const Rows*>(ctx);
    const int64_t r1 = std::min(a.M, (c + 1) * a.rows_per_chunk);
    for (int64_t r = c * a.rows_per_chunk; r < r1; ++r) {
        if (LN) layer_norm_row(a.x + r * a.D, a.w, a.b, a.eps, a.D, a.out + r * a.D);
        else gelu_row(a.x + r * a.D, a.b, a.D, a.out + r * a.D);
    }
}

// work: the pool's threshold is in multiply-adds; a float here costs about `per_float` of them
template <bool LN>
void run_rows(Rows a, int64_t per_float) {
    if (a.M <= 0 || a.D <= 0) return;
    a.rows_per_chunk = std::max<int64_t>(1, kChunkFloats / a.D);
    const int64_t chunks = (a.M + a.rows_per_chunk - 1) / a.rows_per_chunk;
    parallel_for(&rows_task<LN>, &a, chunks, per_float * a.M * a.D);
}

}  // namespace

void layer_norm(const float* x, const float* weight, const float* bias, float eps, int64_t M, int64_t D, float* out) {
    run_rows<true>({x, weight, bias, eps, M, D, 0, out}, 4);
}

void gelu_tanh(const float* x, const float* bias, int64_t M, int64_t D, float* out) {
    run_rows<false>({x, nullptr, bias, 0.f, M, D, 0, out}, 16);
}

}  // namespace smolvlm_cpu
