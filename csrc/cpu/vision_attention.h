// The vision encoder's attention: non-causal, per (tile, head), over the packed q | k | v rows of the QKV product,
// with bf16 operands (q, k, v and the probabilities rounded to bf16, nearest even) and float32 scores, softmax and
// accumulation. The caller (bindings_vision.cpp, vision_encoder.cpp) checks the arguments; this trusts them.
#pragma once

#include <cstdint>
#include <vector>

#include "bf16_gemm.h"  // Bf16Isa

namespace smolvlm_cpu {

struct VisionAttention {
    const float* qkv;         // [B * S, 3 * H * Dh]: row r = q | k | v, each with the H heads side by side
    const uint8_t* key_mask;  // [B, S]: nonzero = the key is attended; null: every key. Each tile needs one.
    int64_t B, S, H, Dh;
    float scale;              // scores = scale * q . k
};

// The bf16 copies of q, k, v and the key biases, kept between calls (the encoder's layers) so that they are
// allocated once.
struct VisionAttentionWork {
    std::vector<uint16_t> bf16;
    std::vector<float> bias;
};

// out [B * S, H * Dh] (row r: the heads side by side), on the thread pool. isa picks the kernel; all of them do the
// arithmetic above with the same 64-key softmax blocks and differ only in float32 summation order:
//   amx           QK^T and PV on the AMX tile unit (_tile_dpbf16ps)
//   amx_emulated  that kernel's loop with each tile instruction done in software (amx_tiles.h): tests, any CPU
//   avx512bf16    vdpbf16ps register tiles
//   f32           float32 FMAs over the same bf16 values
// One that vision_attention_runnable says this CPU cannot run falls back to f32.
void vision_attention(const VisionAttention& a, Bf16Isa isa, VisionAttentionWork& work, float* out);

// Whether this CPU, OS and build can run isa's kernel (amx: AMX-TILE, AMX-BF16 and Linux's permission).
bool vision_attention_runnable(Bf16Isa isa);
// What the encoder uses: the products' kernel, bf16_isa() (the best runnable one, capped by SMOLVLM_FAST_CPU_ISA
// or set by bf16_set_isa), so that one switch moves both.
Bf16Isa vision_attention_default_isa();

}  // namespace smolvlm_cpu
