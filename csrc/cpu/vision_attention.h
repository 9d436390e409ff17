// The vision encoder's attention: non-causal, per (tile, head), over the packed q | k | v rows of the QKV product,
// with bf16 operands (q, k, v and the probabilities rounded to bf16, nearest even) and float32 scores, softmax and
// accumulation. The caller (bindings_vision.cpp, vision_encoder.cpp) checks the arguments; this trusts them.
#pragma once

#include <cstdint>
#include <vector>

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

// out [B * S, H * Dh] (row r: the heads side by side). bf16_dot: AVX512-BF16 dot products (vdpbf16ps), else
// float32 FMAs over the same bf16 values (the same result up to float32 summation order). On the thread pool.
void vision_attention(const VisionAttention& a, bool bf16_dot, VisionAttentionWork& work, float* out);

// Whether this CPU and build can run bf16_dot (AVX-512 build, AVX512-BF16 on the CPU).
bool vision_attention_has_bf16_dot();
// What the encoder uses: bf16_dot where the CPU has it, unless SMOLVLM_FAST_CPU_ISA=f32 (read once).
bool vision_attention_default_bf16_dot();

}  // namespace smolvlm_cpu
