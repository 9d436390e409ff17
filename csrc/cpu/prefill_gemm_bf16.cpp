// prefill_gemm_bf16: bf16_gemm.cpp's product over panels that are made on the fly. A panel (32 rows of W) is
// dequantized one row at a time into a float32 row (quant_gemm.cpp's dequantizers, on a one-row view of W) and
// rounded into the panel's packed places; each chunk then runs the kernel over a whole slab of rows of x with it,
// so a panel is made once per slab (M = 1088: twice), not once per row tile.
#include "prefill_gemm_bf16.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "bf16_gemm.h"
#include "bf16_kernels.h"

namespace smolvlm_cpu {
namespace {

struct Source {
    const AnyMatrix* w;
    int64_t N, K, Kp;

    // W's row n as float32 into row [K] (or a pointer to it, for float32 W).
    const float* dequantized_row(int64_t n, float* row) const {
        if (w->f32) return w->f32->w + n * K;
        if (w->int4) {
            const Int4Matrix& m = *w->int4;
            const int64_t G = K / m.group_size;
            const Int4Matrix one{m.qweight + n * (K / 2), m.scales + n * G, m.mins ? m.mins + n * G : nullptr, 1, K,
                                 m.group_size};
            int4_dequantize(one, row);
        } else {
            const Q8Matrix& m = *w->q8;
            const Q8Matrix one{m.q + n * K, m.scales + n * (K / 32), 1, K};
            q8_dequantize(one, row);
        }
        return row;
    }

    static const uint16_t* make(const void* ctx, int64_t panel, uint16_t* buf) {
        const auto* s = static_cast<const Source*>(ctx);
        thread_local std::vector<float> row;
        row.resize(static_cast<size_t>(s->K));
        const int64_t n0 = panel * bf16::kPanelN, n1 = std::min(s->N, n0 + bf16::kPanelN);
        std::memset(buf, 0, sizeof(uint16_t) * bf16::kPanelN * s->Kp);  // rows past N, k past K
        for (int64_t n = n0; n < n1; ++n) {
            const int64_t j = n - n0;  // row within the panel: block j / 16, place j % 16
            uint16_t* block = buf + (j / kBf16BlockN) * kBf16BlockN * s->Kp;
            bf16::pack_slice(s->dequantized_row(n, row.data()), s->K, 1, 0, s->K, block + (j % kBf16BlockN) * 2);
        }
        return buf;
    }
};

}  // namespace

bool prefill_gemm_bf16(const float* x, int64_t M, const AnyMatrix& w, float* out) {
    const Bf16Isa isa = bf16_isa();
    if (isa == Bf16Isa::f32) return false;
    const int64_t N = w.f32 ? w.f32->N : w.int4 ? w.int4->N : w.q8->N;
    const int64_t K = w.f32 ? w.f32->K : w.int4 ? w.int4->K : w.q8->K;
    const Source s{&w, N, K, bf16_padded_k(K)};
    const bf16::PanelSource src{nullptr, &Source::make, &s};
    constexpr int64_t kWholeSlab = int64_t(1) << 40;  // one row block per slab: a panel is made once per slab
    bf16::product(x, M, K, N, K, src, nullptr, Epilogue::none, false, out, N, isa, kWholeSlab);
    return true;
}

}  // namespace smolvlm_cpu
