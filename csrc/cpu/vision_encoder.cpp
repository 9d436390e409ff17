// The vision encoder's layers (vision_encoder.h). The attention half runs kAttnTiles tiles at a time (attention
// never crosses a tile): LN1 into h, the QKV product into qkv [rows, 3D], attention back into h (LN1's output is
// spent by then), and the out projection added into x by the product's accumulate epilogue. A group of 4 tiles
// (4,096 rows for SigLIP at 512 px) keeps the products at full rate while qkv stays 38 MB, where all 17 tiles of a
// split image at once would take 160 MB. The MLP half goes kMlpRows rows at a time, so that its
// [rows, I] intermediate stays in cache: LN2 into h's rows, fc1 with bias and GELU in its epilogue, fc2 added into x.
#include "vision_encoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "small_ops.h"
#include "vision_attention.h"

namespace smolvlm_cpu {
namespace {

// Rows per MLP block: the [rows, I] GELU output (3 MB at I = 3072) stays in L3 between fc1 and fc2, and the weights
// (9 MB of bf16 for SigLIP's fc1 + fc2) are read once per block.
constexpr int64_t kMlpRows = 256;
constexpr int64_t kAttnTiles = 4;

// Runs f, adding the seconds it takes to times->*slot when timing (times non-null).
template <class F>
void timed(VisionTimes* times, double VisionTimes::*slot, F&& f) {
    if (!times) return f();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    times->*slot += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void vision_encoder(const std::vector<VisionLayer>& layers, const float* post_w, const float* post_b,
                    const VisionShape& c, float* x, int64_t B, int64_t S, const uint8_t* key_mask,
                    VisionTimes* times) {
    const int64_t M = B * S, D = c.D, I = c.I;
    if (M <= 0) return;
    VisionTimes* t = times;
    const int64_t group_rows = std::min(B, kAttnTiles) * S;
    const int64_t block = std::min(M, kMlpRows);
    const int64_t h_rows = std::max(group_rows, block);
    std::unique_ptr<float[]> h(new float[static_cast<size_t>(h_rows * D)]);            // LN output, attention output
    std::unique_ptr<float[]> qkv(new float[static_cast<size_t>(group_rows * 3 * D)]);  // [group rows, 3D]
    std::unique_ptr<float[]> mid(new float[static_cast<size_t>(block * I)]);            // [block, I]
    VisionAttentionWork work;
    const int64_t Dh = D / c.H;
    const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
    const Bf16Isa attn_isa = vision_attention_default_isa();  // the products' kernel (AMX where runnable)
    using T = VisionTimes;

    for (const VisionLayer& w : layers) {
        for (int64_t b0 = 0; b0 < B; b0 += kAttnTiles) {
            const int64_t tiles = std::min(kAttnTiles, B - b0), rows = tiles * S;
            float* xg = x + b0 * S * D;
            const VisionAttention attn{qkv.get(), key_mask ? key_mask + b0 * S : nullptr, tiles, S, c.H, Dh, scale};
            timed(t, &T::norms, [&] { layer_norm(xg, w.ln1_w, w.ln1_b, c.eps, rows, D, h.get()); });
            timed(t, &T::qkv,
                  [&] { bf16_gemm(h.get(), rows, D, w.qkv, w.qkv_b, Epilogue::none, false, qkv.get(), 3 * D); });
            timed(t, &T::attention, [&] { vision_attention(attn, attn_isa, work, h.get()); });
            timed(t, &T::out_proj, [&] { bf16_gemm(h.get(), rows, D, w.out, w.out_b, Epilogue::none, true, xg, D); });
        }
        for (int64_t r0 = 0; r0 < M; r0 += block) {
            const int64_t rows = std::min(block, M - r0);
            float* xr = x + r0 * D;
            timed(t, &T::norms, [&] { layer_norm(xr, w.ln2_w, w.ln2_b, c.eps, rows, D, h.get()); });
            timed(t, &T::fc1,
                  [&] { bf16_gemm(h.get(), rows, D, w.fc1, w.fc1_b, Epilogue::gelu_tanh, false, mid.get(), I); });
            timed(t, &T::fc2, [&] { bf16_gemm(mid.get(), rows, I, w.fc2, w.fc2_b, Epilogue::none, true, xr, D); });
        }
    }
    timed(t, &T::norms, [&] { layer_norm(x, post_w, post_b, c.eps, M, D, x); });
}

}  // namespace smolvlm_cpu
