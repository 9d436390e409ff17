// The AMX tile instructions the bf16 kernel (bf16_amx.cpp) uses, behind one small interface with two
// implementations, so that the kernel's loop is written once:
//   AmxHardware  the instructions themselves (_tile_loadconfig, _tile_loadd, _tile_dpbf16ps, _tile_stored, ...)
//   AmxEmulated  the same semantics in plain C++ on per-thread tile registers: the kernel's layout and loop logic
//                run, and are tested, on CPUs without AMX.
// Interface (static members; T, C, A, B are tile numbers 0..7, strides in bytes):
//   config(cfg)  load a palette-1 configuration;  release()
//   zero<T>()  load<T>(base, stride)  store<T>(base, stride)
//   dp<C, A, B>()  C[m][n] += sum_p A[m][2p] B[p][2n] + A[m][2p + 1] B[p][2n + 1], bf16 in, float32 out
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace smolvlm_cpu {
namespace bf16 {

// Palette 1's 64-byte configuration: per tile, its rows and its bytes per row (at most 16 x 64).
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "the palette-1 layout");

// Every tile 16 rows x 64 bytes: C 16 x 16 float32, A 16 rows x 32 bf16, B 16 k pairs x 16 columns x 2 bf16.
inline TileConfig full_tiles() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    return c;
}

class AmxEmulated {
public:
    static void config(const TileConfig& c) {
        State& s = state();
        for (int t = 0; t < 8; ++t) {
            s.rows[t] = c.rows[t];
            s.colsb[t] = c.colsb[t];
        }
    }
    static void release() { state() = State{}; }
    template <int T>
    static void zero() {
        std::memset(state().tile[T], 0, sizeof state().tile[T]);
    }
    template <int T>
    static void load(const void* base, int64_t stride) {
        State& s = state();
        for (int r = 0; r < s.rows[T]; ++r)
            std::memcpy(s.tile[T] + r * 64, static_cast<const uint8_t*>(base) + r * stride, s.colsb[T]);
    }
    template <int T>
    static void store(void* base, int64_t stride) {
        const State& s = state();
        for (int r = 0; r < s.rows[T]; ++r)
            std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.tile[T] + r * 64, s.colsb[T]);
    }
    // TDPBF16PS in float32: the products of two bf16 are exact in float32, added one at a time in pair order
    // (the hardware's denormal flushing is not modelled: the tests' values are normal).
    template <int C, int A, int B>
    static void dp() {
        State& s = state();
        const int M = s.rows[C], N = s.colsb[C] / 4, P = s.colsb[A] / 4;
        float a[16][32], be[16][16], bo[16][16], c[16][16];  // A widened; B's even and odd k apart
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < 2 * P; ++i) a[m][i] = widen(s.tile[A] + m * 64 + 2 * i);
        for (int p = 0; p < P; ++p)
            for (int n = 0; n < N; ++n) {
                be[p][n] = widen(s.tile[B] + p * 64 + 4 * n);
                bo[p][n] = widen(s.tile[B] + p * 64 + 4 * n + 2);
            }
        std::memcpy(c, s.tile[C], sizeof c);
        for (int m = 0; m < M; ++m)
            for (int p = 0; p < P; ++p)
                for (int n = 0; n < N; ++n) {
                    c[m][n] += a[m][2 * p] * be[p][n];
                    c[m][n] += a[m][2 * p + 1] * bo[p][n];
                }
        std::memcpy(s.tile[C], c, sizeof c);
    }

private:
    struct State {
        alignas(64) uint8_t tile[8][1024] = {};
        int rows[8] = {}, colsb[8] = {};
    };
    static State& state() {
        static thread_local State s;  // each thread has its own tile registers, as on the hardware
        return s;
    }
    static float widen(const uint8_t* bf16) {
        uint16_t h;
        std::memcpy(&h, bf16, 2);
        const uint32_t bits = uint32_t(h) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
};

// The instructions need the tile number in the instruction itself (GCC's intrinsics are asm macros that paste
// it in), so each template maps its T onto literal numbers.
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 11)
#define SMOLVLM_AMX_COMPILED 1
#define SMOLVLM_TILE_CASES(T, OP)           \
    if constexpr (T == 0) OP(0);            \
    else if constexpr (T == 1) OP(1);       \
    else if constexpr (T == 2) OP(2);       \
    else if constexpr (T == 3) OP(3);       \
    else if constexpr (T == 4) OP(4);       \
    else if constexpr (T == 5) OP(5);       \
    else if constexpr (T == 6) OP(6);       \
    else OP(7)

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")
struct AmxHardware {
    static void config(const TileConfig& c) { _tile_loadconfig(&c); }
    static void release() { _tile_release(); }
    template <int T>
    static void zero() {
#define SMOLVLM_TILE_OP(t) _tile_zero(t)
        SMOLVLM_TILE_CASES(T, SMOLVLM_TILE_OP);
#undef SMOLVLM_TILE_OP
    }
    template <int T>
    static void load(const void* base, int64_t stride) {
        __asm__ volatile("" ::: "memory");  // GCC's tileloadd asm does not say it reads memory: stores land first
#define SMOLVLM_TILE_OP(t) _tile_loadd(t, base, stride)
        SMOLVLM_TILE_CASES(T, SMOLVLM_TILE_OP);
#undef SMOLVLM_TILE_OP
    }
    template <int T>
    static void store(void* base, int64_t stride) {
#define SMOLVLM_TILE_OP(t) _tile_stored(t, base, stride)
        SMOLVLM_TILE_CASES(T, SMOLVLM_TILE_OP);
#undef SMOLVLM_TILE_OP
    }
    // The four products of a 2 x 2 block of C tiles (0..3) from A tiles 4, 5 and B tiles 6, 7.
    template <int C, int A, int B>
    static void dp() {
        static_assert(A == 4 + C / 2 && B == 6 + C % 2, "C tile 2i + j takes A tile 4 + i and B tile 6 + j");
        if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
        else if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
        else if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
        else _tile_dpbf16ps(3, 5, 7);
    }
};
#pragma GCC pop_options
#undef SMOLVLM_TILE_CASES
#endif

}  // namespace bf16
}  // namespace smolvlm_cpu
