// The split-context decode attention shared by paged_attention.cu and cross_attention.cu (device code; included by
// .cu files only). One query token attends to keys 0 .. kv_end - 1 of its sequence; the two ops differ only in where
// key j lives (KvAccess: a paged cache through a block table, or a dense [B, T, Hkv, Dh] tensor) and in how a token
// finds its sequence and kv_end.
//
// Work split. grid = (tokens, kv heads x head slices, context splits), 128 threads. A thread block takes one token,
// up to kMaxGroup query heads of one KV head (GQA: all query heads of a KV head share each loaded key and value; a
// group larger than kMaxGroup is cut into slices along grid.y), and the keys [split * split_size, ... + split_size)
// of the token's kv_end (split_size <= kMaxSplit); the last split reads on to kv_end, a chunk of split_size keys at
// a time (steps 2-4 per chunk, the softmax's max and sum and the accumulators rescaled at each new max), so a grid
// sized from a bound below a real length (max_seq_len) drops no key. Per block:
//   1. q of its heads (RoPE'd when asked, rounded to the cache dtype as the reference's q is, times scale * log2 e)
//      into shared memory as fp32;
//   2. scores: kThreadsPerKey lanes per key, each a few 16-byte chunks of the key row, the dot products for all heads
//      summed over those lanes by shuffles; every score of the split lands in shared memory (at most kMaxSplit);
//   3. softmax per head, one warp per head: max, p = exp2(s - max) in place, sum;
//   4. P V: lane (chunk c, key row r) accumulates chunk c of V for keys r, r + rows, ... for every head, then the
//      rows are summed through shared memory (which reuses the scores' space).
// With one split the block writes the normalised output; with several it writes the split's (max, sum, unnormalised
// acc) in fp32 and combine_splits_kernel merges them, reading only the splits that hold keys of the token.
// Scores, softmax and accumulators are fp32; the softmax runs in base 2 with the scale folded into q.
#pragma once

#include <initializer_list>

#include "common.cuh"

namespace smolvlm_cuda {
namespace decode_attention {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;    // query heads per block (a larger GQA group takes several blocks)
constexpr int kMaxSplit = 512;  // keys per split: the scores of a split stay in shared memory (vLLM's partition size)
constexpr float kLog2e = 1.4426950408889634f;

struct Query {
  const void* q;  // [tokens, Hq, Dh]: element (t, h, d) at t * stride_t + h * stride_h + d
  int64_t stride_t, stride_h;
  // RoPE on q (rotate-half on the first rotary_dim features), or cos_sin == nullptr
  const void* cos_sin;  // [max_position, >= rotary_dim], first half cos, second half sin
  int cos_sin_dtype;
  int64_t stride_cs;
  const void* positions;  // [tokens], int32 or int64
  bool positions_int64;
  int rotary_dim;
  float qk_scale;  // scale * log2(e)
};

struct Output {
  void* out;  // [tokens, Hq, Dh] of the cache dtype
  int64_t stride_t, stride_h;
  // with several splits: fp32 partial results, [tokens, Hq, num_splits, Dh] and [tokens, Hq, num_splits]
  float* partial_acc;
  float* partial_max;
  float* partial_sum;
  int num_splits;
};

struct Shape {
  int num_q_heads, num_kv_heads, group, slices, split_size;
};

template <typename T, int HEAD_DIM>
struct Tile {
  static constexpr int kVec = 16 / sizeof(T);         // elements per 16-byte chunk
  static constexpr int kChunks = HEAD_DIM / kVec;     // chunks per key row
  static_assert(HEAD_DIM % kVec == 0, "head_dim must fill whole 16-byte chunks");
  // lanes per key in the score pass: up to 4 (64 contiguous bytes of a key row per quad), dividing kChunks
  static constexpr int kThreadsPerKey = kChunks % 4 == 0 ? 4 : kChunks % 2 == 0 ? 2 : 1;
  static constexpr int kChunksPerThread = kChunks / kThreadsPerKey;
  static constexpr int kKeysPerPass = kThreads / kThreadsPerKey;
  // P V: lane (chunk c, row r); kRows rows of keys in flight, lanes past kRows * kChunks idle
  static constexpr int kRows = kThreads / kChunks;
  static_assert(kRows >= 1, "head_dim too large for one block");
  static constexpr int kScoreFloats = kMaxGroup * kMaxSplit;
  static constexpr int kReduceFloats = kRows * kMaxGroup * HEAD_DIM;
  static constexpr int kSharedFloats = kScoreFloats > kReduceFloats ? kScoreFloats : kReduceFloats;
};

// the query's head h (of this block's slice) rotated, rounded to T and scaled, as fp32 in shared memory
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void load_query(const Query& qa, int64_t token, int head0, int heads,
                                           float (*q_s)[HEAD_DIM]) {
  const T* q = static_cast<const T*>(qa.q) + token * qa.stride_t;
  int64_t pos = 0;
  if (qa.cos_sin != nullptr) pos = load_index(qa.positions, token, qa.positions_int64);
  for (int i = threadIdx.x; i < heads * HEAD_DIM; i += kThreads) {
    const int h = i / HEAD_DIM, d = i % HEAD_DIM;
    const T* row = q + (int64_t)(head0 + h) * qa.stride_h;
    float x = to_float(row[d]);
    if (qa.cos_sin != nullptr && d < qa.rotary_dim) {
      const int half = qa.rotary_dim / 2;
      const int f = d < half ? d : d - half;
      const float c = load_float(qa.cos_sin, pos * qa.stride_cs + f, qa.cos_sin_dtype);
      const float s = load_float(qa.cos_sin, pos * qa.stride_cs + half + f, qa.cos_sin_dtype);
      x = d < half ? x * c - to_float(row[d + half]) * s : x * c + to_float(row[d - half]) * s;
    }
    q_s[h][d] = round_to<T>(x) * qa.qk_scale;
  }
}

// KvAccess: int begin(token) -> kv_end (keys 0 .. kv_end - 1 are visible; 0: none), then key(j) / value(j) -> row
// pointers (HEAD_DIM contiguous elements, 16-byte aligned) for j < kv_end, for the block's KV head.
template <typename T, int HEAD_DIM, typename KvAccess>
__global__ void __launch_bounds__(kThreads) attention_kernel(KvAccess kv, const Query qa, const Output oa,
                                                              const Shape shape) {
  using TileT = Tile<T, HEAD_DIM>;
  constexpr int kVec = TileT::kVec;
  constexpr int kTpk = TileT::kThreadsPerKey;
  SMOLVLM_SHARED_ALIGNED(16, float, q_s, [kMaxGroup][HEAD_DIM]);
  SMOLVLM_SHARED(float, work, [TileT::kSharedFloats]);  // scores [kMaxGroup][kMaxSplit], then the P V row sums
  SMOLVLM_SHARED(float, max_s, [kMaxGroup]);    // per head: the running max and sum of the split's softmax,
  SMOLVLM_SHARED(float, sum_s, [kMaxGroup]);
  SMOLVLM_SHARED(float, rescale_s, [kMaxGroup]);  // and what the accumulators so far are scaled by at a new max

  const int64_t token = blockIdx.x;
  const int kv_head = blockIdx.y / shape.slices;
  const int head0 = kv_head * shape.group + (blockIdx.y % shape.slices) * kMaxGroup;  // first query head
  const int heads = min(kMaxGroup, kv_head * shape.group + shape.group - head0);
  const int split = blockIdx.z;

  const int kv_end = kv.begin(token, kv_head);
  const int lo = split * shape.split_size;
  // the last split reads to the token's end, a chunk of split_size keys at a time, so a grid sized from a bound
  // below a real length (max_seq_len) costs time, never keys
  const int hi = split == oa.num_splits - 1 ? kv_end : min(lo + shape.split_size, kv_end);
  if (lo >= hi) {  // a split past the token's keys: the combine never reads it. No key at all: zeros.
    if (kv_end == 0 && split == 0) {
      for (int i = threadIdx.x; i < heads * HEAD_DIM; i += kThreads) {
        const int h = i / HEAD_DIM, d = i % HEAD_DIM;
        static_cast<T*>(oa.out)[token * oa.stride_t + (int64_t)(head0 + h) * oa.stride_h + d] = from_float<T>(0.0f);
      }
    }
    return;
  }

  load_query<T, HEAD_DIM>(qa, token, head0, heads, q_s);
  if (threadIdx.x < kMaxGroup) {
    max_s[threadIdx.x] = -INFINITY;
    sum_s[threadIdx.x] = 0.0f;
  }
  __syncthreads();

  constexpr int kRows = TileT::kRows;
  const int c = threadIdx.x % TileT::kChunks, r = threadIdx.x / TileT::kChunks;
  float acc[kMaxGroup][kVec];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[h][e] = 0.0f;
  float* scores = work;
  const int sub = threadIdx.x % kTpk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int chunk = lo; chunk < hi; chunk += shape.split_size) {  // one pass, but for a last split past its size
    const int n_keys = min(shape.split_size, hi - chunk);

    // 2. scores[h][j - chunk] for the chunk's keys; all lanes run the same number of passes (the shuffles need them)
    for (int base = 0; base < n_keys; base += TileT::kKeysPerPass) {
      const int jj = base + threadIdx.x / kTpk;
      float dot[kMaxGroup];
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) dot[h] = 0.0f;
      if (jj < n_keys) {
        const T* krow = kv.key(chunk + jj);
#pragma unroll
        for (int i = 0; i < TileT::kChunksPerThread; ++i) {
          const int d0 = (sub + i * kTpk) * kVec;  // the kTpk lanes of a key read adjacent chunks
          float k[kVec];
          Vec16<T>::load(krow + d0, k);
#pragma unroll
          for (int h = 0; h < kMaxGroup; ++h) {
            if (h < heads) {
#pragma unroll
              for (int e = 0; e < kVec; e += 4) {  // q four floats per shared-memory read
                const float4 qv = *reinterpret_cast<const float4*>(&q_s[h][d0 + e]);
                dot[h] += qv.x * k[e] + qv.y * k[e + 1] + qv.z * k[e + 2] + qv.w * k[e + 3];
              }
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
#pragma unroll
        for (int offset = kTpk / 2; offset > 0; offset >>= 1) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], offset);
      }
      if (jj < n_keys && sub == 0) {
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h)
          if (h < heads) scores[h * kMaxSplit + jj] = dot[h];
      }
    }
    __syncthreads();

    // 3. softmax over the chunk against the running max, one warp per head
    for (int h = warp; h < heads; h += kWarps) {
      float* s = scores + h * kMaxSplit;
      float m = max_s[h];
      for (int j = lane; j < n_keys; j += 32) m = fmaxf(m, s[j]);
      m = warp_max(m);
      float l = 0.0f;
      for (int j = lane; j < n_keys; j += 32) {
        const float p = exp2f(s[j] - m);
        s[j] = p;
        l += p;
      }
      l = warp_sum(l);
      if (lane == 0) {
        const float rescale = exp2f(max_s[h] - m);  // 0 at the first chunk (max -inf)
        rescale_s[h] = rescale;
        sum_s[h] = sum_s[h] * rescale + l;
        max_s[h] = m;
      }
    }
    __syncthreads();

    // 4. P V: lane (c, r) sums chunk c of V over the keys r, r + kRows, ...
    if (r < kRows) {
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h < heads) {
          const float rescale = rescale_s[h];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[h][e] *= rescale;
        }
      }
      for (int jj = r; jj < n_keys; jj += kRows) {
        float v[kVec];
        Vec16<T>::load(kv.value(chunk + jj) + c * kVec, v);
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h) {
          if (h < heads) {
            const float p = scores[h * kMaxSplit + jj];
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[h][e] += p * v[e];
          }
        }
      }
    }
    __syncthreads();  // every lane is done with the chunk's scores and rescales before the next chunk writes them
  }
  float* rows = work;  // [kRows][kMaxGroup][HEAD_DIM]: the scores' space, free after the loop's last barrier
  if (r < kRows) {
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h < heads) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) rows[(r * kMaxGroup + h) * HEAD_DIM + c * kVec + e] = acc[h][e];
      }
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < heads * HEAD_DIM; i += kThreads) {
    const int h = i / HEAD_DIM, d = i % HEAD_DIM;
    float s = 0.0f;
    for (int rr = 0; rr < kRows; ++rr) s += rows[(rr * kMaxGroup + h) * HEAD_DIM + d];
    const int64_t head = head0 + h;
    if (oa.num_splits == 1) {
      static_cast<T*>(oa.out)[token * oa.stride_t + head * oa.stride_h + d] = from_float<T>(s / sum_s[h]);
    } else {
      const int64_t stat = (token * shape.num_q_heads + head) * oa.num_splits + split;
      oa.partial_acc[stat * HEAD_DIM + d] = s;
      if (d == 0) {
        oa.partial_max[stat] = max_s[h];
        oa.partial_sum[stat] = sum_s[h];
      }
    }
  }
}

// out[token, head] = sum_s exp2(max_s - max) acc_s / sum_s exp2(max_s - max) sum_s over the splits that hold keys
// of the token (those below ceil(kv_end / split_size)). grid = (tokens, Hq); a token with no key gets zeros.
template <typename T, int HEAD_DIM, typename KvAccess>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(KvAccess kv, const Output oa, const Shape shape) {
  const int64_t token = blockIdx.x;
  const int head = blockIdx.y;
  const int kv_end = kv.begin(token, head / shape.group);
  const int used = min(oa.num_splits, (kv_end + shape.split_size - 1) / shape.split_size);
  const int64_t stats = (token * shape.num_q_heads + head) * oa.num_splits;
  float m = -INFINITY;
  for (int s = 0; s < used; ++s) m = fmaxf(m, oa.partial_max[stats + s]);
  float total = 0.0f;
  for (int s = 0; s < used; ++s) total += exp2f(oa.partial_max[stats + s] - m) * oa.partial_sum[stats + s];
  T* out = static_cast<T*>(oa.out) + token * oa.stride_t + (int64_t)head * oa.stride_h;
  for (int d = threadIdx.x; d < HEAD_DIM; d += kThreads) {
    float acc = 0.0f;
    for (int s = 0; s < used; ++s)
      acc += exp2f(oa.partial_max[stats + s] - m) * oa.partial_acc[(stats + s) * HEAD_DIM + d];
    out[d] = from_float<T>(used > 0 ? acc / total : 0.0f);
  }
}

// Launches the attention kernel (and the combine when split) for one head_dim; see the header comment for the grid.
template <typename T, int HEAD_DIM, typename KvAccess>
void launch(const KvAccess& kv, const Query& qa, const Output& oa, const Shape& shape, int64_t tokens,
            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(shape.num_kv_heads * shape.slices),
                  static_cast<unsigned>(oa.num_splits));
  SMOLVLM_LAUNCH(grid, kThreads, 0, stream, attention_kernel<T, HEAD_DIM, KvAccess>)(kv, qa, oa, shape);
  check_launch("decode attention kernel");
  if (oa.num_splits > 1) {
    const dim3 combine_grid(static_cast<unsigned>(tokens), static_cast<unsigned>(shape.num_q_heads));
    SMOLVLM_LAUNCH(combine_grid, kThreads, 0, stream, combine_splits_kernel<T, HEAD_DIM, KvAccess>)(kv, oa,
                                                                                                   shape);
    check_launch("decode attention combine kernel");
  }
}

// The head dims compiled (others go to the next implementation; ops/cuda.py asks head_dim_supported first).
inline bool head_dim_supported(int64_t head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128;
}

// The host checks and arguments paged_attention and cross_attention share (op: the entry point, for the messages;
// args: its PagedAttentionArgs / CrossAttentionArgs, which name these fields alike).
template <typename Args>
void check_heads(const std::string& op, const Args& args) {
  check_arg(args.num_kv_heads >= 1 && args.num_q_heads >= args.num_kv_heads &&
                args.num_q_heads % args.num_kv_heads == 0,
            op + ": the query heads must be a multiple of the KV heads");
  check_arg(head_dim_supported(args.head_dim),
            op + ": head_dim must be 64, 80, 96 or 128, got " + std::to_string(args.head_dim));
}

// K and V rows are read 16 bytes at a time: both pointers and every stride (in elements) must keep them aligned.
inline void check_kv_aligned(const std::string& op, const char* rows, int dtype, std::uintptr_t k, std::uintptr_t v,
                             std::initializer_list<int64_t> strides) {
  const int64_t vec = dtype == kFloat32 ? 4 : 8;  // elements per 16-byte load
  bool ok = aligned16(k) && aligned16(v);
  for (int64_t stride : strides) ok = ok && stride % vec == 0;
  check_arg(ok, op + ": " + rows + " must be 16-byte aligned (pointer and strides)");
}

template <typename Args>
Output make_output(const std::string& op, const Args& args) {
  check_arg(args.num_splits == 1 || (args.partial_acc && args.partial_max && args.partial_sum),
            op + ": several splits need the fp32 workspaces");
  return Output{reinterpret_cast<void*>(args.out), args.stride_ot, args.stride_oh,
                reinterpret_cast<float*>(args.partial_acc), reinterpret_cast<float*>(args.partial_max),
                reinterpret_cast<float*>(args.partial_sum), static_cast<int>(args.num_splits)};
}

template <typename Args>
Shape make_shape(const std::string& op, const Args& args) {
  const int64_t group = args.num_q_heads / args.num_kv_heads;
  const int64_t slices = cdiv(group, kMaxGroup);
  check_arg(args.num_kv_heads * slices <= 65535, op + ": too many heads for one grid");
  return Shape{static_cast<int>(args.num_q_heads), static_cast<int>(args.num_kv_heads), static_cast<int>(group),
               static_cast<int>(slices), static_cast<int>(args.split_size)};
}

template <typename T, typename KvAccess>
void dispatch_head_dim(int64_t head_dim, const KvAccess& kv, const Query& qa, const Output& oa, const Shape& shape,
                       int64_t tokens, cudaStream_t stream) {
  switch (head_dim) {
    case 64: launch<T, 64>(kv, qa, oa, shape, tokens, stream); break;
    case 80: launch<T, 80>(kv, qa, oa, shape, tokens, stream); break;
    case 96: launch<T, 96>(kv, qa, oa, shape, tokens, stream); break;
    case 128: launch<T, 128>(kv, qa, oa, shape, tokens, stream); break;
    default: throw std::invalid_argument("decode attention: head_dim must be 64, 80, 96 or 128");
  }
}

// Runs the attention of `tokens` query tokens on args' device and stream, for its dtype and head_dim: the keys are
// addressed by KvAccess<T>(args), the op's key access (PagedKv, DenseKv) built from its entry point's arguments.
template <template <typename> class KvAccess, typename Args>
void dispatch(const Args& args, const Query& qa, const Output& oa, const Shape& shape, int64_t tokens) {
  DeviceGuard guard(args.device);
  const cudaStream_t stream = as_stream(args.stream);
  switch (args.dtype) {
    case kFloat32: return dispatch_head_dim<float>(args.head_dim, KvAccess<float>(args), qa, oa, shape, tokens, stream);
    case kFloat16:
      return dispatch_head_dim<__half>(args.head_dim, KvAccess<__half>(args), qa, oa, shape, tokens, stream);
    case kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(args.head_dim, KvAccess<__nv_bfloat16>(args), qa, oa, shape, tokens,
                                              stream);
    default: throw std::invalid_argument("decode attention: unknown dtype code " + std::to_string(args.dtype));
  }
}

}  // namespace decode_attention
}  // namespace smolvlm_cuda
