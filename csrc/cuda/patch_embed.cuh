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

// The arguments both entry points take; strides in elements, dtypes as codes.
struct PatchImageArgs {
  std::uintptr_t out, pixels;              // [B, N, D], [B, C, H, W]
  std::uintptr_t pos_embed, position_ids;  // or 0
  int64_t batch, channels, patches_h, patches_w, patch, dim;  // B, C, H / P, W / P, P, D
  int64_t stride_pb, stride_pc, stride_ph, stride_pw;         // pixels
  int64_t stride_pos, stride_ib, stride_in;                   // pos_embed rows, position_ids [B, N]
  bool ids_int64;
  int dtype, bias_dtype, pos_dtype, out_dtype;  // pixels' (the weights' too), the biases', pos_embed's, out's
  int device;
  std::uintptr_t stream;  // cudaStream_t
};

// Python: _C.PatchEmbedArgs(field=..., ...), the PatchImageArgs fields too.
struct PatchEmbedArgs : PatchImageArgs {
  std::uintptr_t weight, bias;  // [D, C, P, P], [D] or 0
};

void patch_embed(const PatchEmbedArgs& args);

// Channels dwsep_patch_embed keeps per patch in shared memory at most.
constexpr int kDwsepMaxChannels = 512;

// Python: _C.DwsepPatchEmbedArgs(field=..., ...), the PatchImageArgs fields too.
struct DwsepPatchEmbedArgs : PatchImageArgs {
  std::uintptr_t dw_weight, dw_bias;  // [C, 1, P, P], [C] or 0
  std::uintptr_t pw_weight, pw_bias;  // [D, C], [D] or 0
};

void dwsep_patch_embed(const DwsepPatchEmbedArgs& args);

}  // namespace smolvlm_cuda
