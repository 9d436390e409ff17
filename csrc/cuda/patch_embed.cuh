// patch_embed (groups = 1) and dwsep_patch_embed: the vision stem, bias and position embedding in the epilogue.
//
//   pixels [B, C, H, W] (strides free)   N = (H/P)(W/P) patches per image, row-major; out [B, N, D] contiguous
//   patch_embed:        weight [D, C, P, P] contiguous (pixels' dtype: fp16 / bf16), bias [D] or 0
//   dwsep_patch_embed:  dw_weight [C, 1, P, P] and pw_weight [D, C] contiguous (pixels' dtype: fp32 / fp16 / bf16),
//                       dw_bias [C], pw_bias [D] or 0
//   pos_embed [num_positions, D] (d contiguous, any float dtype) or 0; position_ids [B, N] (int32 / int64, strides
//   free, 0 for arange(N)); out's dtype is pixels' promoted with pos_embed's (out_dtype).
// out[b, n, d] = conv(pixels)[b, d, n] + bias[d] + pos_embed[position_ids[b, n], d], summed in fp32, rounded once.
// position_ids must lie in [0, num_positions) (not checked on the device).
// Declarations only (host C++): bindings.cpp includes this file.
#pragma once

#include <cstdint>

namespace smolvlm_cuda {

void patch_embed(std::uintptr_t out, std::uintptr_t pixels, std::uintptr_t weight, std::uintptr_t bias,
                 std::uintptr_t pos_embed, std::uintptr_t position_ids, int64_t batch, int64_t channels,
                 int64_t patches_h, int64_t patches_w, int64_t patch, int64_t dim, int64_t stride_pb,
                 int64_t stride_pc, int64_t stride_ph, int64_t stride_pw, int64_t stride_pos, int64_t stride_ib,
                 int64_t stride_in, bool ids_int64, int dtype, int bias_dtype, int pos_dtype, int out_dtype,
                 int device, std::uintptr_t stream);

// Channels dwsep_patch_embed keeps per patch in shared memory at most.
constexpr int kDwsepMaxChannels = 512;

void dwsep_patch_embed(std::uintptr_t out, std::uintptr_t pixels, std::uintptr_t dw_weight, std::uintptr_t dw_bias,
                       std::uintptr_t pw_weight, std::uintptr_t pw_bias, std::uintptr_t pos_embed,
                       std::uintptr_t position_ids, int64_t batch, int64_t channels, int64_t patches_h,
                       int64_t patches_w, int64_t patch, int64_t dim, int64_t stride_pb, int64_t stride_pc,
                       int64_t stride_ph, int64_t stride_pw, int64_t stride_pos, int64_t stride_ib, int64_t stride_in,
                       bool ids_int64, int dtype, int bias_dtype, int pos_dtype, int out_dtype, int device,
                       std::uintptr_t stream);

}  // namespace smolvlm_cuda
