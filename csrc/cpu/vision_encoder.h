// The SigLIP vision encoder's layers in one call, over every tile of every image as one set of rows, with bf16
// products (bf16_gemm.h) and bf16 attention (vision_attention.h); norms, softmax and accumulation in float32.
// The caller (bindings_vision.cpp) checks every argument; this trusts them.
#pragma once

#include <cstdint>
#include <vector>

#include "bf16_gemm.h"

namespace smolvlm_cpu {

struct VisionLayer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  // [D] each
    Bf16Matrix qkv, out, fc1, fc2;               // [3D, D] (q | k | v rows), [D, D], [I, D], [D, I]
    const float *qkv_b, *out_b, *fc1_b, *fc2_b;  // [3D], [D], [I], [D]
};

struct VisionShape {
    int64_t D, I, H;  // hidden size, MLP size, heads (head_dim = D / H)
    float eps;        // the LayerNorms'
};

// Seconds spent in each kind of work, summed over the layers (a run with times asked for).
struct VisionTimes {
    double norms = 0, qkv = 0, attention = 0, out_proj = 0, fc1 = 0, fc2 = 0;
};

// x [B * S, D] (B tiles of S patches) through every layer, then the post LayerNorm (post_w, post_b [D]), in place.
// Each layer: x += out(attention(qkv(LN1 x))), x += fc2(gelu(fc1(LN2 x))). key_mask [B, S] (nonzero: the patch is
// real, its key is attended; every tile needs one) or null. times: null, or where the time goes.
void vision_encoder(const std::vector<VisionLayer>& layers, const float* post_w, const float* post_b,
                    const VisionShape& shape, float* x, int64_t B, int64_t S, const uint8_t* key_mask,
                    VisionTimes* times);

}  // namespace smolvlm_cpu
