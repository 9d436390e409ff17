// out[M, N] = x[M, K] @ W[N, K]^T for many rows of x, float32, on the thread pool.
//
// The decode kernels (quant_gemm.cpp) unpack every weight block for at most 8 rows of x; with hundreds of rows
// that unpacking, and the horizontal sums, dominate. Here a panel of kNw weight rows is dequantized once into a
// float32 buffer that stays in L2, and a register tile of 32 rows of x (two 16-lane vectors, taken from x
// transposed so the 32 values of one k are contiguous) times those kNw rows is accumulated with one broadcast
// and two FMAs per weight element per k: 24 accumulators, the shape that keeps both FMA ports busy on AVX-512.
// x^T is made once per product; rows of x go in blocks of kMc so a block of x^T stays in L2 while the panels of
// W pass over it. Threads take (row block, panel group) chunks; each dequantizes the panels it uses.
#include "prefill_gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace smolvlm_cpu {

#if SMOLVLM_AVX512
namespace {

constexpr int kNw = 12;         // weight rows per register tile
constexpr int kMr = 32;         // rows of x per register tile (two vectors of 16)
constexpr int64_t kMc = 256;    // rows of x per block
constexpr int64_t kKc = 256;    // k per block: a block of x^T (kKc x kMc, 256 KB) stays in L2, a panel in L1
constexpr int kPanelsPerChunk = 4;

// ct[r * ldc + i] (+)= sum_k x^T[k, i] * w[r, k], i < 32, r < NW, k < kc: a tile of out^T, kept as such until
// the whole k range is summed (adding into it is then two vector loads and stores per row of W).
template <int NW>
void tile(const float* xt, int64_t ldx, int64_t kc, const float* w, int64_t ldw, float* ct, int64_t ldc,
          bool accumulate) {
    __m512 acc[NW][2];
    for (int r = 0; r < NW; ++r) {
        acc[r][0] = accumulate ? _mm512_loadu_ps(ct + r * ldc) : _mm512_setzero_ps();
        acc[r][1] = accumulate ? _mm512_loadu_ps(ct + r * ldc + 16) : _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
        const __m512 x0 = _mm512_loadu_ps(xt + k * ldx), x1 = _mm512_loadu_ps(xt + k * ldx + 16);
        for (int r = 0; r < NW; ++r) {
            const __m512 wv = _mm512_set1_ps(w[r * ldw + k]);
            acc[r][0] = _mm512_fmadd_ps(wv, x0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(wv, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < NW; ++r) {
        _mm512_storeu_ps(ct + r * ldc, acc[r][0]);
        _mm512_storeu_ps(ct + r * ldc + 16, acc[r][1]);
    }
}

using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, bool);

template <int... I>
constexpr std::array<TileFn, kNw> tiles(std::integer_sequence<int, I...>) {
    return {&tile<I + 1>...};
}
constexpr std::array<TileFn, kNw> kTiles = tiles(std::make_integer_sequence<int, kNw>{});

// W[n0 .. n1, k0 .. k0 + kc] as float32 rows *ldw apart: W itself when it is float32, else dequantized into buf
// (each row on its own as a one-row matrix: k0 and kc are multiples of the group size).
const float* panel(const AnyMatrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t kc, float* buf, int64_t* ldw) {
    if (w.f32) {
        *ldw = w.f32->K;
        return w.f32->w + n0 * w.f32->K + k0;
    }
    *ldw = kc;
    for (int64_t n = n0; n < n1; ++n) {
        if (w.int4) {
            const Int4Matrix& m = *w.int4;
            const int64_t G = m.K / m.group_size, g0 = n * G + k0 / m.group_size;
            const Int4Matrix row{m.qweight + n * (m.K / 2) + k0 / 2, m.scales + g0, m.mins ? m.mins + g0 : nullptr,
                                 1, kc, m.group_size};
            int4_dequantize(row, buf + (n - n0) * kc);
        } else {
            const Q8Matrix& m = *w.q8;
            const Q8Matrix row{m.q + n * m.K + k0, m.scales + (n * m.K + k0) / 32, 1, kc};
            q8_dequantize(row, buf + (n - n0) * kc);
        }
    }
    return buf;
}

// x [M, K] -> tiles of 32 rows transposed, one after another: xt[(m / 32) * K * 32 + k * 32 + m % 32], rows past
// M zero. Within a tile the 32 values of one k are adjacent and successive k follow, so a tile streams through
// consecutive cache lines (a plain [K, M] transpose puts successive k M floats apart, a power-of-two stride that
// maps them onto a few L1 sets).
void pack_tiles(const float* x, int64_t M, int64_t K, float* xt) {
    for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        const int64_t mr = std::min<int64_t>(kMr, M - m0);
        float* dst = xt + m0 * K;
        for (int64_t k = 0; k < K; ++k)
            for (int64_t i = 0; i < mr; ++i) dst[k * kMr + i] = x[(m0 + i) * K + k];
    }
}

struct Job {
    const float* xt;  // [Mp / 32, K, 32]: x in transposed tiles (pack_tiles), rows padded to Mp
    int64_t M, Mp, N, K;
    const AnyMatrix* w;
    float* out;
    int64_t row_blocks, panel_groups;

    static void task(void* ctx, int64_t c) { static_cast<const Job*>(ctx)->run(c); }

    // One block of rows of x against a group of panels of W, k block by k block, into out^T (ct), then out.
    void run(int64_t chunk) const {
        const int64_t mb = chunk / panel_groups, pg = chunk % panel_groups;
        const int64_t m_begin = mb * kMc, m_end = std::min(M, m_begin + kMc);
        const int64_t n_begin = pg * kPanelsPerChunk * kNw, n_end = std::min(N, n_begin + kPanelsPerChunk * kNw);
        const int64_t mp = (m_end - m_begin + kMr - 1) / kMr * kMr;  // rows of ct, padded to whole tiles
        thread_local std::vector<float> buf, ct;
        buf.resize(static_cast<size_t>(kNw * kKc));
        ct.resize(static_cast<size_t>(kPanelsPerChunk * kNw * kMc));  // [n - n_begin, m - m_begin]
        for (int64_t k0 = 0; k0 < K; k0 += kKc) {
            const int64_t kc = std::min(kKc, K - k0);
            for (int64_t n0 = n_begin; n0 < n_end; n0 += kNw) {
                const int64_t n1 = std::min(n_end, n0 + kNw);
                int64_t ldw;
                const float* wp = panel(*w, n0, n1, k0, kc, buf.data(), &ldw);
                for (int64_t m0 = 0; m0 < mp; m0 += kMr)
                    kTiles[n1 - n0 - 1](xt + (m_begin + m0) * K + k0 * kMr, kMr, kc, wp, ldw,
                                        ct.data() + (n0 - n_begin) * mp + m0, mp, k0 > 0);
            }
        }
        for (int64_t m = m_begin; m < m_end; ++m)
            for (int64_t n = n_begin; n < n_end; ++n) out[m * N + n] = ct[(n - n_begin) * mp + (m - m_begin)];
    }
};

}  // namespace

bool prefill_gemm(const float* x, int64_t M, const AnyMatrix& w, float* out) {
    const int64_t N = w.f32 ? w.f32->N : w.int4 ? w.int4->N : w.q8->N;
    const int64_t K = w.f32 ? w.f32->K : w.int4 ? w.int4->K : w.q8->K;
    if (M == 0 || N == 0) return true;
    const int64_t Mp = (M + kMr - 1) / kMr * kMr;
    std::vector<float> xt(static_cast<size_t>(K * Mp), 0.f);  // padding rows stay 0
    pack_tiles(x, M, K, xt.data());
    Job job{xt.data(), M, Mp, N, K, &w, out, (M + kMc - 1) / kMc, 0};
    job.panel_groups = ((N + kNw - 1) / kNw + kPanelsPerChunk - 1) / kPanelsPerChunk;
    parallel_for(&Job::task, &job, job.row_blocks * job.panel_groups, M * N * K);
    return true;
}

#else

bool prefill_gemm(const float*, int64_t, const AnyMatrix&, float*) { return false; }

#endif

}  // namespace smolvlm_cpu
