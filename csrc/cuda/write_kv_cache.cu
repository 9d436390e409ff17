// write_kv_cache with RoPE fused (contract: write_kv_cache.cuh).
//
// One thread block per token (128 threads; a decode step writes a few hundred elements per token, a prefill
// thousands of tokens: either way the grid is the tokens and each block's threads walk the token's heads). Elements
// move VEC at a time: 16 bytes when every pointer, stride and the rotary half are multiples of 16 bytes, else one.
// A thread takes, for one head, VEC features d of the first rotary half together with their partners d + R/2 (the
// rotation needs both), or VEC features past R (copied), or VEC features of v.
#include "common.cuh"
#include "write_kv_cache.cuh"

namespace smolvlm_cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T e[VEC];
};

struct KvArgs {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const void* slot_mapping;
  const void* cos_sin;
  const void* positions;
  int num_heads, head_dim, block_size, rotary_dim, cos_sin_dtype;
  int64_t num_slots;  // num_blocks * block_size: a slot past it is skipped rather than written out of bounds
  int64_t stride_kt, stride_kh, stride_vt, stride_vh;
  int64_t stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_cs;
  bool slots_int64, positions_int64;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) write_kv_cache_kernel(const KvArgs a) {
  using P = Pack<T, VEC>;
  const int64_t token = blockIdx.x;
  const int64_t slot = load_index(a.slot_mapping, token, a.slots_int64);
  if (slot < 0 || slot >= a.num_slots) return;
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  const T* k = static_cast<const T*>(a.k) + token * a.stride_kt;
  const T* v = static_cast<const T*>(a.v) + token * a.stride_vt;
  T* kc = static_cast<T*>(a.k_cache) + block * a.stride_kcb + offset * a.stride_kcs;
  T* vc = static_cast<T*>(a.v_cache) + block * a.stride_vcb + offset * a.stride_vcs;

  // keys: the rotated pairs (d, d + R/2) for d < R/2, then the features past R
  const int half = a.rotary_dim / 2;
  const int pair_vecs = half / VEC, rest_vecs = (a.head_dim - a.rotary_dim) / VEC;
  const int per_head = pair_vecs + rest_vecs;
  if (per_head > 0) {
    const int64_t pos = a.cos_sin != nullptr ? load_index(a.positions, token, a.positions_int64) : 0;
    for (int i = threadIdx.x; i < a.num_heads * per_head; i += kThreads) {
      const int h = i / per_head, u = i % per_head;
      const T* src = k + h * a.stride_kh;
      T* dst = kc + h * a.stride_kch;
      if (u < pair_vecs) {
        const int d = u * VEC;
        const P x1 = *reinterpret_cast<const P*>(src + d), x2 = *reinterpret_cast<const P*>(src + d + half);
        P y1, y2;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float c = round_to<T>(load_float(a.cos_sin, pos * a.stride_cs + d + e, a.cos_sin_dtype));
          const float s = round_to<T>(load_float(a.cos_sin, pos * a.stride_cs + half + d + e, a.cos_sin_dtype));
          const float f1 = to_float(x1.e[e]), f2 = to_float(x2.e[e]);
          y1.e[e] = from_float<T>(f1 * c - f2 * s);
          y2.e[e] = from_float<T>(f2 * c + f1 * s);
        }
        *reinterpret_cast<P*>(dst + d) = y1;
        *reinterpret_cast<P*>(dst + d + half) = y2;
      } else {
        const int d = a.rotary_dim + (u - pair_vecs) * VEC;
        *reinterpret_cast<P*>(dst + d) = *reinterpret_cast<const P*>(src + d);
      }
    }
  }
  // values: copied
  const int v_vecs = a.head_dim / VEC;
  for (int i = threadIdx.x; i < a.num_heads * v_vecs; i += kThreads) {
    const int h = i / v_vecs, d = (i % v_vecs) * VEC;
    *reinterpret_cast<P*>(vc + h * a.stride_vch + d) = *reinterpret_cast<const P*>(v + h * a.stride_vh + d);
  }
}

template <typename T>
void launch(const KvArgs& a, bool vectorized, int64_t num_tokens, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_tokens));
  if (vectorized) SMOLVLM_LAUNCH(grid, kThreads, 0, stream, write_kv_cache_kernel<T, 16 / sizeof(T)>)(a);
  else SMOLVLM_LAUNCH(grid, kThreads, 0, stream, write_kv_cache_kernel<T, 1>)(a);
  check_launch("write_kv_cache_kernel");
}

}  // namespace

void write_kv_cache(const WriteKvCacheArgs& args) {
  const char* op = "write_kv_cache";
  check_dtype(args.dtype, op, "k");
  check_arg(args.k && args.v && args.k_cache && args.v_cache && args.slot_mapping,
            "write_kv_cache: a required pointer is 0");
  check_arg(args.num_tokens >= 1 && args.num_tokens < (int64_t{1} << 31), "write_kv_cache: T must be in [1, 2^31)");
  check_arg(args.num_heads >= 1 && args.head_dim >= 1 && args.num_heads * args.head_dim < (int64_t{1} << 31),
            "write_kv_cache: bad head count or head_dim");
  check_arg(args.block_size >= 1 && args.num_blocks >= 1, "write_kv_cache: bad cache shape");
  if (args.cos_sin != 0) {
    check_dtype(args.cos_sin_dtype, op, "cos_sin");
    check_arg(args.positions != 0, "write_kv_cache: cos_sin needs positions");
    check_arg(args.rotary_dim >= 2 && args.rotary_dim % 2 == 0 && args.rotary_dim <= args.head_dim,
              "write_kv_cache: rotary_dim must be even and in [2, head_dim]");
  }
  const int64_t rotary_dim = args.cos_sin != 0 ? args.rotary_dim : 0;
  const int64_t vec = args.dtype == kFloat32 ? 4 : 8;  // elements per 16 bytes
  const bool vectorized = aligned16(args.k) && aligned16(args.v) && aligned16(args.k_cache) &&
                          aligned16(args.v_cache) && args.head_dim % vec == 0 && (rotary_dim / 2) % vec == 0 &&
                          args.stride_kt % vec == 0 &&
                          args.stride_kh % vec == 0 && args.stride_vt % vec == 0 && args.stride_vh % vec == 0 &&
                          args.stride_kcb % vec == 0 && args.stride_kcs % vec == 0 && args.stride_kch % vec == 0 &&
                          args.stride_vcb % vec == 0 && args.stride_vcs % vec == 0 && args.stride_vch % vec == 0;

  KvArgs a;
  a.k = reinterpret_cast<const void*>(args.k);
  a.v = reinterpret_cast<const void*>(args.v);
  a.k_cache = reinterpret_cast<void*>(args.k_cache);
  a.v_cache = reinterpret_cast<void*>(args.v_cache);
  a.slot_mapping = reinterpret_cast<const void*>(args.slot_mapping);
  a.cos_sin = reinterpret_cast<const void*>(args.cos_sin);
  a.positions = reinterpret_cast<const void*>(args.positions);
  a.num_heads = static_cast<int>(args.num_heads);
  a.head_dim = static_cast<int>(args.head_dim);
  a.block_size = static_cast<int>(args.block_size);
  a.num_slots = args.num_blocks * args.block_size;
  a.rotary_dim = static_cast<int>(rotary_dim);
  a.cos_sin_dtype = args.cos_sin_dtype;
  a.stride_kt = args.stride_kt, a.stride_kh = args.stride_kh;
  a.stride_vt = args.stride_vt, a.stride_vh = args.stride_vh;
  a.stride_kcb = args.stride_kcb, a.stride_kcs = args.stride_kcs, a.stride_kch = args.stride_kch;
  a.stride_vcb = args.stride_vcb, a.stride_vcs = args.stride_vcs, a.stride_vch = args.stride_vch;
  a.stride_cs = args.stride_cs;
  a.slots_int64 = args.slots_int64;
  a.positions_int64 = args.positions_int64;

  DeviceGuard guard(args.device);
  const cudaStream_t stream = as_stream(args.stream);
  switch (args.dtype) {
    case kFloat32: launch<float>(a, vectorized, args.num_tokens, stream); break;
    case kFloat16: launch<__half>(a, vectorized, args.num_tokens, stream); break;
    default: launch<__nv_bfloat16>(a, vectorized, args.num_tokens, stream); break;
  }
}

}  // namespace smolvlm_cuda
