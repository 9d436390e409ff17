// What the bf16 product's driver (bf16_gemm.cpp) hands its kernels (bf16_dpbf16.cpp, bf16_f32.cpp, bf16_amx.cpp):
// one panel of 32 columns of W (two packed 16-blocks, or one at the end) against a block of rows of the converted
// x, and the epilogue every kernel applies to its finished sums. Internal to the bf16 files.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "bf16_gemm.h"
#include "simd_math.h"

namespace smolvlm_cpu {
namespace bf16 {

constexpr int64_t kPanelN = 2 * kBf16BlockN;  // columns per panel: one register tile's width
constexpr int64_t kTileRows = 12;              // rows per register tile of the AVX-512 kernels (24 accumulators)
constexpr int64_t kAmxRows = 32;               // rows per AMX step (two A tiles of 16)

// x rounded to bf16 (nearest even) and zero-padded to Kp columns, in the form the kernel reads: bf16 values, so
// that a k pair is one 32-bit word (dpbf16, amx), or those same values widened to float32 (f32).
// One panel's task. Rows of x are x + r * ldx (elements of the kernel's form), r < rows; for amx the buffer holds
// zeros up to a multiple of kAmxRows rows. w: the panel's first block; the second (blocks == 2) follows it.
struct Panel {
    const void* x;
    int64_t ldx, rows;
    const uint16_t* w;
    int64_t blocks, Kp;
    int64_t n;                // valid columns (<= 32): the rest of the panel is padding
    const float* bias;        // at the panel's first column, or null
    Epilogue epilogue;
    bool accumulate;
    float* out;               // row 0, the panel's first column
    int64_t ldo;
};

void panel_f32(const Panel& p);          // x float32 [rows, Kp]
void panel_dpbf16(const Panel& p);       // x bf16 [rows, Kp]; needs AVX512-BF16 (only with SMOLVLM_AVX512)
void panel_amx(const Panel& p);          // x bf16 [rows padded to 32, Kp]; needs AMX and the OS's permission
void panel_amx_emulated(const Panel& p); // the same loop, each tile instruction done in software

// vdpbf16ps's peak on this CPU: GFLOP/s of a tight loop of independent dpbf16 instructions (register operands
// only), on every thread of the pool at once; 0 where there is no AVX512-BF16.
double dpbf16_peak_gflops(int64_t iterations);

bool avx512bf16_available();           // this build has the kernel and this CPU AVX512-BF16 (CPUID)
bool amx_compiled();                     // whether this build has the AMX kernel (a compiler that knows AMX)
bool amx_request_permission();           // Linux: ARCH_REQ_XCOMP_PERM for the tile data, once per process

// Where a product's panels come from: the packed matrix, or make(ctx, panel, buf), which writes panel's packed
// blocks (kPanelN * Kp values) into buf and returns it (a weight dequantized a panel at a time).
struct PanelSource {
    const uint16_t* packed;
    const uint16_t* (*make)(const void* ctx, int64_t panel, uint16_t* buf);
    const void* ctx;
};

// out[M, N] (+)= epilogue(x[M, K] @ W^T + bias) with the given kernel: bf16_gemm's body (bf16_gemm.cpp).
// block_rows: rows of x per chunk (a multiple of 96, whole register tiles and AMX steps, or more than a slab),
// 0 for the default; a source that makes its panels wants many, so that each panel is made for many rows.
void product(const float* x, int64_t M, int64_t ldx, int64_t N, int64_t K, const PanelSource& src, const float* bias,
             Epilogue epilogue, bool accumulate, float* out, int64_t ldo, Bf16Isa isa, int64_t block_rows = 0);

// Rows j < rows (<= 16) of w (row stride ldw), holding k0 .. k0 + kc, into a packed block's places for them.
void pack_slice(const float* w, int64_t ldw, int64_t rows, int64_t k0, int64_t kc, uint16_t* block);

// bf16 bits of x, rounded to nearest even (torch's conversion); NaN stays NaN (quieted, sign kept).
inline uint16_t to_bf16(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
    return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline float from_bf16(uint16_t h) {
    const uint32_t b = uint32_t(h) << 16;
    float x;
    std::memcpy(&x, &b, 4);
    return x;
}

// out[j] = (accumulate ? out[j] : 0) + epilogue(c[j] + bias[j]), j < n: one row of finished sums.
void finish_row(const float* c, int64_t n, const float* bias, Epilogue e, bool accumulate, float* out);

#if SMOLVLM_AVX512
// The lanes below n (<= 16) of a finished 16-column group, straight from the register tile.
inline void finish16(__m512 z, int64_t n, const float* bias, Epilogue e, bool accumulate, float* out) {
    const __mmask16 k = first_lanes(n);
    if (bias) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(k, bias));
    if (e == Epilogue::gelu_tanh) z = gelu16(z);
    if (accumulate) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(k, out));
    _mm512_mask_storeu_ps(out, k, z);
}
// The AVX-512 kernels' shared frame. A kernel is a class template Tile<MR, NB> whose static run(p, r0) multiplies
// rows r0 .. r0 + MR of x by the panel's NB blocks; panel_by_tiles walks a panel's rows in tiles of kTileRows
// through a table of those instances, and finish_tile sums a tile's KU accumulator sets (one per k phase) and
// applies the epilogue, straight from the registers. The loops carry unroll pragmas: a loop left rolled keeps the
// accumulators in memory (a load and a store around every product, a third of the speed).
template <int KU, int MR, int NB>
__attribute__((always_inline)) inline void zero_tile(__m512 (&acc)[KU][MR][NB]) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u)
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int b = 0; b < NB; ++b) acc[u][r][b] = _mm512_setzero_ps();
}

template <int KU, int MR, int NB>
__attribute__((always_inline)) inline void finish_tile(__m512 (&acc)[KU][MR][NB], const Panel& p, int64_t r0) {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b) {
            __m512 z = acc[0][r][b];
#pragma GCC unroll 4
            for (int u = 1; u < KU; ++u) z = _mm512_add_ps(z, acc[u][r][b]);
            finish16(z, p.n - b * 16, p.bias ? p.bias + b * 16 : nullptr, p.epilogue, p.accumulate,
                     p.out + (r0 + r) * p.ldo + b * 16);
        }
}

using TileFn = void (*)(const Panel&, int64_t);

template <template <int, int> class Tile, int... I>
constexpr std::array<std::array<TileFn, 2>, kTileRows> tile_table(std::integer_sequence<int, I...>) {
    return {std::array<TileFn, 2>{&Tile<I + 1, 1>::run, &Tile<I + 1, 2>::run}...};
}

template <template <int, int> class Tile>
void panel_by_tiles(const Panel& p) {
    static constexpr auto kTable = tile_table<Tile>(std::make_integer_sequence<int, kTileRows>{});
    for (int64_t r0 = 0; r0 < p.rows; r0 += kTileRows)
        kTable[std::min(kTileRows, p.rows - r0) - 1][p.blocks - 1](p, r0);
}

// Accumulator sets per row: few rows (decode, memory-bound on W) spread each row's sum over KU sets by k pair, so
// that enough products are in flight to cover the instruction's latency.
constexpr int ku_for(int mr) { return mr <= 3 ? 4 : mr <= 6 ? 2 : 1; }
#endif

}  // namespace bf16
}  // namespace smolvlm_cpu
