// The float32 kernel over packed bf16 weights, for CPUs without AVX512-BF16: a packed 32-bit word holds one
// column's k pair, so a 16-bit shift (even k) and a mask (odd k) widen it to float32 exactly, and FMAs do the rest.
// The register tile is kTileRows rows of x by one panel (24 accumulators); few rows (decode) spread each row's
// sum over KU accumulator sets by k pair, so that more FMAs are in flight than the FMA latency would allow.
#include "bf16_kernels.h"

namespace smolvlm_cpu {
namespace bf16 {
namespace {

#if SMOLVLM_AVX512

// Rows r0 .. r0 + MR of x against the panel's NB blocks, over all of Kp, then the epilogue.
template <int MR, int NB>
struct F32Tile {
    static void run(const Panel& p, int64_t r0);
};

template <int MR, int NB>
void F32Tile<MR, NB>::run(const Panel& p, int64_t r0) {
    constexpr int KU = ku_for(MR);
    const float* x = static_cast<const float*>(p.x) + r0 * p.ldx;
    __m512 acc[KU][MR][NB];
    zero_tile(acc);
    const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
    for (int64_t kp = 0; kp < p.Kp / 2; kp += KU) {
#pragma GCC unroll 4
        for (int u = 0; u < KU; ++u) {
            __m512 even[NB], odd[NB];
#pragma GCC unroll 2
            for (int b = 0; b < NB; ++b) {
                const __m512i v = _mm512_loadu_si512(p.w + b * kBf16BlockN * p.Kp + (kp + u) * 32);
                even[b] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                odd[b] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            }
#pragma GCC unroll 12
            for (int r = 0; r < MR; ++r) {
                const __m512 xe = _mm512_set1_ps(x[r * p.ldx + 2 * (kp + u)]);
                const __m512 xo = _mm512_set1_ps(x[r * p.ldx + 2 * (kp + u) + 1]);
#pragma GCC unroll 2
                for (int b = 0; b < NB; ++b) {
                    acc[u][r][b] = _mm512_fmadd_ps(xe, even[b], acc[u][r][b]);
                    acc[u][r][b] = _mm512_fmadd_ps(xo, odd[b], acc[u][r][b]);
                }
            }
        }
    }
    finish_tile(acc, p, r0);
}

#endif

}  // namespace

#if SMOLVLM_AVX512

void panel_f32(const Panel& p) { panel_by_tiles<F32Tile>(p); }

#else

// Plain loops (builds without AVX-512): one row of x against the panel's columns at a time.
void panel_f32(const Panel& p) {
    const float* x = static_cast<const float*>(p.x);
    float c[kPanelN];
    for (int64_t r = 0; r < p.rows; ++r) {
        for (int64_t j = 0; j < p.n; ++j) {
            const uint16_t* w = p.w + (j / 16) * kBf16BlockN * p.Kp + (j % 16) * 2;
            float s = 0.f;
            for (int64_t kp = 0; kp < p.Kp / 2; ++kp) {
                s += x[r * p.ldx + 2 * kp] * from_bf16(w[kp * 32]);
                s += x[r * p.ldx + 2 * kp + 1] * from_bf16(w[kp * 32 + 1]);
            }
            c[j] = s;
        }
        finish_row(c, p.n, p.bias, p.epilogue, p.accumulate, p.out + r * p.ldo);
    }
}

#endif

}  // namespace bf16
}  // namespace smolvlm_cpu
