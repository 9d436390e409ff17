// patch_embed and dwsep_patch_embed (contract: patch_embed.cuh).
//
// patch_embed is a GEMM, out[m, d] = sum_k A[m, k] W[d, k], with m = (b, n) a patch, k = (c, i, j) in the weight's
// own [C, P, P] order and A[m, k] = pixels[b, c, ph P + i, pw P + j] read from the image itself (no unfolded copy).
// Tiles: 64 patches x 64 output channels per thread block (4 warps in 2 x 2, each 32 x 32: 2 x 4 m16n8k16 MMAs per
// 16 of K), K in steps of 32. A and W tiles go to shared memory K-contiguous with rows padded to 40 elements, so that
// the MMA fragment reads (row g, 32-bit word t) of a warp fall in 32 different banks (row stride 20 words). Tiles are
// loaded 16 bytes at a time when a pixel row of a patch is contiguous and 16-byte aligned (P % 8 == 0, e.g. 16),
// else element by element; the next tile is read into registers while the current one is multiplied. The grid's x
// runs over output-channel tiles, so the blocks that share a row of patches run together (L2 reuse).
//
// dwsep_patch_embed: 16 patches per block. Each warp computes depthwise outputs, one (patch, channel) at a time
// (lanes over the P x P pixels, a shuffle sum), rounded to the pixels' dtype as the reference's depthwise conv output
// is, into shared memory; then each thread computes output elements (patch, d) as the C-long dot with pw_weight's
// row d plus the epilogue. The depthwise result never goes to global memory.
#include "common.cuh"
#include "patch_embed.cuh"

namespace smolvlm_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kRowElems = kBK + 8;  // padded shared-memory row (80 bytes)

struct PatchArgs {
  const void* pixels;
  const void* weight;  // [D, K] (patch_embed) / dw_weight [C, P*P] (dwsep)
  const void* pw_weight;  // dwsep: [D, C]
  const void* dw_bias;    // dwsep
  const void* bias;
  const void* pos;
  const void* ids;
  void* out;
  int M, D, K, C, n_patches, patches_w, P;
  int64_t stride_pb, stride_pc, stride_ph, stride_pw, stride_pos, stride_ib, stride_in;
  int bias_dtype, pos_dtype, out_dtype;
  bool ids_int64;
};

// out[m, d] = acc + bias[d] + pos_embed[position_ids[m], d]
__device__ __forceinline__ void epilogue(const PatchArgs& a, int m, int d, float acc) {
  if (a.bias != nullptr) acc += load_float(a.bias, d, a.bias_dtype);
  if (a.pos != nullptr) {
    const int b = m / a.n_patches, n = m % a.n_patches;
    const int64_t row = a.ids != nullptr ? load_index(a.ids, b * a.stride_ib + n * a.stride_in, a.ids_int64) : n;
    acc += load_float(a.pos, row * a.stride_pos + d, a.pos_dtype);
  }
  store_float(a.out, (int64_t)m * a.D + d, acc, a.out_dtype);
}

// Offset of pixel (patch m, reduction index k) in the image.
__device__ __forceinline__ int64_t pixel_offset(const PatchArgs& a, int m, int k) {
  const int b = m / a.n_patches, n = m % a.n_patches;
  const int ph = n / a.patches_w, pw = n % a.patches_w;
  const int pp = a.P * a.P;
  const int c = k / pp, i = (k % pp) / a.P, j = k % a.P;
  return b * a.stride_pb + c * a.stride_pc + (int64_t)(ph * a.P + i) * a.stride_ph +
         (int64_t)(pw * a.P + j) * a.stride_pw;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T e[VEC];
};

// The tiles' share of one thread: kPieces pieces of VEC consecutive k of A and of W.
template <typename T, int VEC>
struct Staged {
  static constexpr int kPerRow = kBK / VEC;
  static constexpr int kPieces = kBM * kBK / (kThreads * VEC);
  Pack<T, VEC> a[kPieces], w[kPieces];

  __device__ void load(const PatchArgs& pa, int m0, int n0, int k0) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int q = threadIdx.x + i * kThreads, row = q / kPerRow, k = k0 + (q % kPerRow) * VEC;
      const int m = m0 + row, d = n0 + row;
      // VEC > 1 only when a piece never crosses a patch row or K (P % VEC == 0, K % VEC == 0)
      if constexpr (VEC > 1) {
        a[i] = m < pa.M && k < pa.K ? *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(pa.pixels) +
                                                                             pixel_offset(pa, m, k))
                                    : Pack<T, VEC>{};
        w[i] = d < pa.D && k < pa.K
                   ? *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(pa.weight) + (int64_t)d * pa.K + k)
                   : Pack<T, VEC>{};
      } else {
        const T zero = from_float<T>(0.0f);
        a[i].e[0] = m < pa.M && k < pa.K ? static_cast<const T*>(pa.pixels)[pixel_offset(pa, m, k)] : zero;
        w[i].e[0] = d < pa.D && k < pa.K ? static_cast<const T*>(pa.weight)[(int64_t)d * pa.K + k] : zero;
      }
    }
  }
  __device__ void store(T (*as)[kRowElems], T (*ws)[kRowElems]) const {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int q = threadIdx.x + i * kThreads, row = q / kPerRow, kk = (q % kPerRow) * VEC;
      *reinterpret_cast<Pack<T, VEC>*>(&as[row][kk]) = a[i];
      *reinterpret_cast<Pack<T, VEC>*>(&ws[row][kk]) = w[i];
    }
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) patch_embed_kernel(const PatchArgs a) {
  SMOLVLM_SHARED_ALIGNED(16, T, as, [kBM][kRowElems]);
  SMOLVLM_SHARED_ALIGNED(16, T, ws, [kBN][kRowElems]);
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int wm = warp / 2, wn = warp % 2;  // the warp's 32 x 32 quarter of the tile

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;

  Staged<T, VEC> staged;
  staged.load(a, m0, n0, 0);
  for (int k0 = 0; k0 < a.K; k0 += kBK) {
    __syncthreads();  // the previous tile's readers are done
    staged.store(as, ws);
    __syncthreads();
    if (k0 + kBK < a.K) staged.load(a, m0, n0, k0 + kBK);  // in flight during the MMAs below
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = wm * 32 + mi * 16 + g;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(&as[r][ks + 2 * t]);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(&as[r + 8][ks + 2 * t]);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(&as[r][ks + 2 * t + 8]);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(&as[r + 8][ks + 2 * t + 8]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int n = wn * 32 + ni * 8 + g;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(&ws[n][ks + 2 * t]);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(&ws[n][ks + 2 * t + 8]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16x8x16<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = m0 + wm * 32 + mi * 16 + g + (r >= 2 ? 8 : 0);
        const int d = n0 + wn * 32 + ni * 8 + 2 * t + (r & 1);
        if (m < a.M && d < a.D) epilogue(a, m, d, acc[mi][ni][r]);
      }
}

constexpr int kDwsepPatches = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads) dwsep_patch_embed_kernel(const PatchArgs a) {
  SMOLVLM_DYNAMIC_SHARED(float, dw_s);  // [kDwsepPatches][C]
  const int m0 = blockIdx.x * kDwsepPatches;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pp = a.P * a.P;
  const T* pixels = static_cast<const T*>(a.pixels);
  const T* dw_w = static_cast<const T*>(a.weight);

  for (int item = warp; item < kDwsepPatches * a.C; item += kThreads / 32) {  // one (patch, channel) per warp
    const int p = item / a.C, c = item % a.C, m = m0 + p;
    float s = 0.0f;
    if (m < a.M) {
      for (int idx = lane; idx < pp; idx += 32) {
        const int k = c * pp + idx;
        s += to_float(pixels[pixel_offset(a, m, k)]) * to_float(dw_w[k]);
      }
    }
    s = warp_sum(s);
    if (lane == 0) {
      if (a.dw_bias != nullptr) s += load_float(a.dw_bias, c, a.bias_dtype);
      dw_s[p * a.C + c] = m < a.M ? round_to<T>(s) : 0.0f;
    }
  }
  __syncthreads();

  const T* pw_w = static_cast<const T*>(a.pw_weight);
  for (int idx = threadIdx.x; idx < kDwsepPatches * a.D; idx += kThreads) {
    const int p = idx / a.D, d = idx % a.D, m = m0 + p;
    if (m >= a.M) continue;
    float acc = 0.0f;
    for (int c = 0; c < a.C; ++c) acc += dw_s[p * a.C + c] * to_float(pw_w[(int64_t)d * a.C + c]);
    epilogue(a, m, d, acc);
  }
}

// The checks both entry points make, then the kernel arguments they share (the caller sets the weights).
PatchArgs checked_args(const char* op, const PatchImageArgs& args, std::uintptr_t bias) {
  const std::string name(op);
  check_arg(args.out && args.pixels, name + ": out and pixels are required");
  check_dtype(args.dtype, op, "pixels");
  check_dtype(args.bias_dtype, op, "bias");
  check_dtype(args.pos_dtype, op, "pos_embed");
  check_dtype(args.out_dtype, op, "out");
  check_arg(args.batch >= 1 && args.channels >= 1 && args.patches_h >= 1 && args.patches_w >= 1 && args.patch >= 1 &&
                args.dim >= 1,
            name + ": sizes must be positive");
  check_arg(args.batch * args.patches_h * args.patches_w < (int64_t{1} << 31) && args.dim < (int64_t{1} << 31) &&
                args.channels * args.patch * args.patch < (int64_t{1} << 31),
            name + ": sizes too large for 32-bit indices");

  PatchArgs a{};
  a.pixels = reinterpret_cast<const void*>(args.pixels);
  a.bias = reinterpret_cast<const void*>(bias);
  a.pos = reinterpret_cast<const void*>(args.pos_embed);
  a.ids = reinterpret_cast<const void*>(args.position_ids);
  a.out = reinterpret_cast<void*>(args.out);
  a.M = static_cast<int>(args.batch * args.patches_h * args.patches_w);
  a.D = static_cast<int>(args.dim);
  a.K = static_cast<int>(args.channels * args.patch * args.patch);
  a.C = static_cast<int>(args.channels);
  a.n_patches = static_cast<int>(args.patches_h * args.patches_w);
  a.patches_w = static_cast<int>(args.patches_w);
  a.P = static_cast<int>(args.patch);
  a.stride_pb = args.stride_pb, a.stride_pc = args.stride_pc;
  a.stride_ph = args.stride_ph, a.stride_pw = args.stride_pw;
  a.stride_pos = args.stride_pos, a.stride_ib = args.stride_ib, a.stride_in = args.stride_in;
  a.bias_dtype = args.bias_dtype, a.pos_dtype = args.pos_dtype, a.out_dtype = args.out_dtype;
  a.ids_int64 = args.ids_int64;
  return a;
}

}  // namespace

void patch_embed(const PatchEmbedArgs& args) {
  PatchArgs a = checked_args("patch_embed", args, args.bias);
  check_arg(args.dtype == kFloat16 || args.dtype == kBFloat16,
            "patch_embed: the CUDA kernel takes fp16 or bf16 pixels");
  check_arg(args.weight != 0, "patch_embed: weight is required");
  const int64_t M = a.M;
  check_arg(cdiv(M, kBM) <= 65535, "patch_embed: too many patches for one grid");
  const bool vectorized = args.patch % 8 == 0 && args.stride_pw == 1 && args.stride_pb % 8 == 0 &&
                          args.stride_pc % 8 == 0 && args.stride_ph % 8 == 0 && aligned16(args.pixels) &&
                          aligned16(args.weight);
  a.weight = reinterpret_cast<const void*>(args.weight);

  DeviceGuard guard(args.device);
  const dim3 grid(static_cast<unsigned>(cdiv(args.dim, kBN)), static_cast<unsigned>(cdiv(M, kBM)));
  cudaStream_t s = as_stream(args.stream);
  if (args.dtype == kFloat16) {
    if (vectorized) SMOLVLM_LAUNCH(grid, kThreads, 0, s, patch_embed_kernel<__half, 8>)(a);
    else SMOLVLM_LAUNCH(grid, kThreads, 0, s, patch_embed_kernel<__half, 1>)(a);
  } else {
    if (vectorized) SMOLVLM_LAUNCH(grid, kThreads, 0, s, patch_embed_kernel<__nv_bfloat16, 8>)(a);
    else SMOLVLM_LAUNCH(grid, kThreads, 0, s, patch_embed_kernel<__nv_bfloat16, 1>)(a);
  }
  check_launch("patch_embed_kernel");
}

void dwsep_patch_embed(const DwsepPatchEmbedArgs& args) {
  PatchArgs a = checked_args("dwsep_patch_embed", args, args.pw_bias);
  check_arg(args.dw_weight != 0 && args.pw_weight != 0, "dwsep_patch_embed: dw_weight and pw_weight are required");
  check_arg(args.channels <= kDwsepMaxChannels, "dwsep_patch_embed: the CUDA kernel takes at most 512 channels");
  const int64_t M = a.M;
  a.weight = reinterpret_cast<const void*>(args.dw_weight);
  a.pw_weight = reinterpret_cast<const void*>(args.pw_weight);
  a.dw_bias = reinterpret_cast<const void*>(args.dw_bias);

  DeviceGuard guard(args.device);
  const dim3 grid(static_cast<unsigned>(cdiv(M, kDwsepPatches)));
  const size_t shared = sizeof(float) * kDwsepPatches * args.channels;  // <= 32 KB: under the default 48 KB limit
  cudaStream_t s = as_stream(args.stream);
  switch (args.dtype) {
    case kFloat32: SMOLVLM_LAUNCH(grid, kThreads, shared, s, dwsep_patch_embed_kernel<float>)(a); break;
    case kFloat16: SMOLVLM_LAUNCH(grid, kThreads, shared, s, dwsep_patch_embed_kernel<__half>)(a); break;
    default: SMOLVLM_LAUNCH(grid, kThreads, shared, s, dwsep_patch_embed_kernel<__nv_bfloat16>)(a); break;
  }
  check_launch("dwsep_patch_embed_kernel");
}

}  // namespace smolvlm_cuda
