// The AMX kernel: per step of 32 rows of x, a 2 x 2 block of C tiles (16 x 16 float32 each, tiles 0..3) summed
// over all of Kp, 32 k at a time, from two A tiles (16 rows x 32 bf16 of the converted x, tiles 4 and 5) and two
// B tiles taken straight from the packed W (16 k pairs x 16 columns x 2 = one 1 KB block slice, tiles 6 and 7).
// The sums go through a small buffer to the epilogue, or, for a whole 32 x 32 block with no epilogue, straight
// from the tiles to out (the bias loaded into the tiles first). The loop is written once over the tile interface of
// amx_tiles.h: on the hardware (panel_amx) and in the software emulator (panel_amx_emulated, tests).
// Each call loads its own tile configuration and releases it, so every thread of the pool that runs a panel has
// its tiles configured; the OS's permission for the tile data is asked once per process.
#include <algorithm>

#include "amx_tiles.h"
#include "bf16_kernels.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace smolvlm_cpu {
namespace bf16 {
namespace {

#if SMOLVLM_AMX_COMPILED
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")  // so that AmxHardware's members inline into the loop
#endif

// x: bf16 [rows rounded up to 32 with zero rows, Kp], row stride ldx k pairs.
template <class Ops>
void panel_tiles(const Panel& p) {
    Ops::config(full_tiles());
    const auto* x = static_cast<const uint8_t*>(p.x);
    const int64_t ldx_bytes = p.ldx * 4, b_stride = 64;  // B: 16 columns x 2 bf16 per k pair
    const uint16_t* w0 = p.w;
    const uint16_t* w1 = p.w + kBf16BlockN * p.Kp;
    const bool two_b = p.blocks == 2;
    alignas(64) float c[4][16 * 16];
    for (int64_t m0 = 0; m0 < p.rows; m0 += kAmxRows) {
        const bool two_a = p.rows - m0 > 16;  // the second A tile holds valid rows
        // A whole 32 x 32 block with nothing to do after its sums goes from the tiles straight to out. Its tiles
        // start from the bias (a stride-0 load repeats its 16 values down the rows) or from zero. (Not when
        // accumulating: starting from out would add each product to the residual's magnitude, a bound K times
        // looser than the one addition at the end.)
        float* block_out = p.out + m0 * p.ldo;
        const int64_t ldo_bytes = p.ldo * 4;
        const bool direct = two_a && two_b && p.n == 32 && p.rows - m0 >= kAmxRows && !p.accumulate &&
                            p.epilogue == Epilogue::none;
        if (direct && p.bias) {
            Ops::template load<0>(p.bias, 0);
            Ops::template load<1>(p.bias + 16, 0);
            Ops::template load<2>(p.bias, 0);
            Ops::template load<3>(p.bias + 16, 0);
        } else {
            Ops::template zero<0>();
            Ops::template zero<1>();
            Ops::template zero<2>();
            Ops::template zero<3>();
        }
        for (int64_t k0 = 0; k0 < p.Kp; k0 += kBf16BlockK) {
            const uint8_t* a = x + m0 * ldx_bytes + k0 * 2;
            Ops::template load<4>(a, ldx_bytes);
            Ops::template load<6>(w0 + k0 * 16, b_stride);  // k0 / 2 pairs x 32 bf16
            if (two_b) Ops::template load<7>(w1 + k0 * 16, b_stride);
            Ops::template dp<0, 4, 6>();
            if (two_b) Ops::template dp<1, 4, 7>();
            if (two_a) {
                Ops::template load<5>(a + 16 * ldx_bytes, ldx_bytes);
                Ops::template dp<2, 5, 6>();
                if (two_b) Ops::template dp<3, 5, 7>();
            }
        }
        if (direct) {
            Ops::template store<0>(block_out, ldo_bytes);
            Ops::template store<1>(block_out + 16, ldo_bytes);
            Ops::template store<2>(block_out + 16 * p.ldo, ldo_bytes);
            Ops::template store<3>(block_out + 16 * p.ldo + 16, ldo_bytes);
            continue;
        }
        Ops::template store<0>(c[0], 64);
        if (two_b) Ops::template store<1>(c[1], 64);
        if (two_a) Ops::template store<2>(c[2], 64);
        if (two_a && two_b) Ops::template store<3>(c[3], 64);
        for (int64_t i = 0; i < std::min(kAmxRows, p.rows - m0); ++i) {
            const float* row = c[(i / 16) * 2] + (i % 16) * 16;
            float* o = p.out + (m0 + i) * p.ldo;
            finish_row(row, std::min<int64_t>(16, p.n), p.bias, p.epilogue, p.accumulate, o);
            if (p.n > 16)
                finish_row(c[(i / 16) * 2 + 1] + (i % 16) * 16, p.n - 16, p.bias ? p.bias + 16 : nullptr,
                           p.epilogue, p.accumulate, o + 16);
        }
    }
    Ops::release();
}

#if SMOLVLM_AMX_COMPILED
#pragma GCC pop_options
#endif

}  // namespace

void panel_amx_emulated(const Panel& p) { panel_tiles<AmxEmulated>(p); }

#if SMOLVLM_AMX_COMPILED

bool amx_compiled() { return true; }
void panel_amx(const Panel& p) { panel_tiles<AmxHardware>(p); }

#else

bool amx_compiled() { return false; }
void panel_amx(const Panel&) {}  // never called: bf16_gemm.cpp offers amx only where amx_compiled()

#endif

bool amx_request_permission() {
#if defined(__linux__) && SMOLVLM_AMX_COMPILED
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    return granted;
#else
    return false;
#endif
}

}  // namespace bf16
}  // namespace smolvlm_cpu
