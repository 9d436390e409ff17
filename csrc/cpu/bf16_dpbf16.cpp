// The AVX512-BF16 kernel: vdpbf16ps adds, per lane (one column of W), the products of one k pair of x and W.
// A packed 16-block row is exactly such an operand, and x's pair for a row is one 32-bit word broadcast to all
// lanes (an embedded broadcast from memory). Register tile: kTileRows rows x one panel of 32 columns = 24
// accumulators; per k pair it loads the panel's two W vectors once and uses each for every row, so W is read from
// cache once per 12 rows. Few rows (decode, memory-bound on W) spread each row's sum over KU accumulator sets by k
// pair, so that enough dot products are in flight to hide their latency. Sums stay in registers over all of Kp
// and go through the epilogue from there. Functions here carry target("avx512bf16") and run only after the
// run-time check in bf16_gemm.cpp.
#include <atomic>
#include <chrono>

#include "bf16_kernels.h"
#include "thread_pool.h"

namespace smolvlm_cpu {
namespace bf16 {

#if SMOLVLM_AVX512
namespace {

// acc += dpbf16(w, x's pair broadcast): the broadcast embedded in the instruction ({1to16}), which GCC's
// intrinsic does not fold; a separate vpbroadcastd per row would take a vector pipe from the dot products.
__attribute__((target("avx512bf16"), always_inline)) inline void dp_bcast(__m512& acc, __m512bh w,
                                                                           const uint32_t* pair) {
    __asm__("vdpbf16ps %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*pair));
}

template <int MR, int NB>
struct DpTile {
    __attribute__((target("avx512bf16"))) static void run(const Panel& p, int64_t r0);
};

template <int MR, int NB>
__attribute__((target("avx512bf16"))) void DpTile<MR, NB>::run(const Panel& p, int64_t r0) {
    constexpr int KU = ku_for(MR);
    const uint32_t* x = static_cast<const uint32_t*>(p.x) + r0 * p.ldx;  // k pairs
    // Every loop over u, r and b fully unrolled: the accumulators then live in registers (a loop left rolled
    // keeps the array in memory, a load and a store around every dot product: a third of the speed).
    __m512 acc[KU][MR][NB];
    zero_tile(acc);
    for (int64_t kp = 0; kp < p.Kp / 2; kp += KU) {
#pragma GCC unroll 4
        for (int u = 0; u < KU; ++u) {
            __m512bh wv[NB];
#pragma GCC unroll 2
            for (int b = 0; b < NB; ++b)
                wv[b] = (__m512bh)_mm512_loadu_si512(p.w + b * kBf16BlockN * p.Kp + (kp + u) * 32);
#pragma GCC unroll 12
            for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
                for (int b = 0; b < NB; ++b) dp_bcast(acc[u][r][b], wv[b], x + r * p.ldx + kp + u);
        }
    }
    finish_tile(acc, p, r0);
}

// 24 independent accumulators (more than latency x throughput on any AVX512-BF16 core), register operands only.
__attribute__((target("avx512bf16"), noinline)) float peak_loop(int64_t iterations) {
    constexpr int kAcc = 24;
    __m512 acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(float(i));
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x00010001);
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 24
        for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);  // all 24 in registers
    }
    __m512 s = acc[0];
    for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}

struct PeakJob {
    int64_t iterations;
    std::atomic<int>* sink;
    static void task(void* ctx, int64_t) {
        const auto* j = static_cast<const PeakJob*>(ctx);
        if (peak_loop(j->iterations) == -1.f) j->sink->fetch_add(1);  // a use of the result
    }
};

}  // namespace

void panel_dpbf16(const Panel& p) { panel_by_tiles<DpTile>(p); }

double dpbf16_peak_gflops(int64_t iterations) {
    if (!avx512bf16_available()) return 0.;
    const int threads = pool_threads();
    std::atomic<int> sink{0};
    PeakJob job{iterations, &sink};
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(&PeakJob::task, &job, threads, int64_t(1) << 40);  // one chunk per thread
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return double(threads) * iterations * 24 * 16 * 4 / s * 1e-9;  // 16 lanes x 2 products x (mul + add)
}

#else

void panel_dpbf16(const Panel&) {}  // never called: bf16_gemm.cpp offers avx512bf16 only in AVX-512 builds
double dpbf16_peak_gflops(int64_t) { return 0.; }

#endif

}  // namespace bf16
}  // namespace smolvlm_cpu
