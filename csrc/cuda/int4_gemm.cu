// int4_gemm for decode (M = 1..16) on the tensor cores. Layout of the weight: int4_gemm.cuh.
//
// The product is computed transposed, y.T [N, M] = W [N, K] @ x.T [K, M], so that the weight's rows fill the 16 rows
// of an m16n8k16 MMA and the few rows of x its 8 columns (two column tiles when M > 8).
//
// Work split. A thread block is 4 warps; warp w owns the 16 weight rows n0 .. n0 + 15 (lane 4g + t: rows n0 + g and
// n0 + g + 8). blockIdx.y selects a slice of K (split-K, for when N alone gives too few blocks to fill the GPU). The
// block stages its slice of x in shared memory, 32 blocks of 32 columns at a time, and the warps walk it 4 blocks per
// step: each lane loads one whole 16-byte block of each of its two rows (the vectorized load), lane t taking block
// b + t.
//
// Scales out of the inner product. A block lies in one scale group, so per block and row
//     sum_k x[k] * w[k] = d * sum_k x[k] * q[k] + m * sum_k x[k]           (asymmetric; symmetric: q - 8, no m term)
// The MMA computes sum x * q with q exact in fp16 / bf16 (integers 0..15), products exact in fp32, and the kernel
// then adds d * that + m * (sum of x over the block, precomputed per chunk) in fp32. So only x's own rounding enters:
// nothing is rounded to 16 bits after dequantization.
//
// Fragments. For that, one MMA k-step (16 columns) must lie inside one block, while the 16-byte loads give each lane a
// whole block. A 4x4 transpose inside each quad of lanes (quad_transpose: 4 shuffles) turns "lane t holds block b + t"
// into "lane t holds word t (bytes 4t .. 4t + 3) of blocks b .. b + 3". Word t of a block holds elements 4t .. 4t + 3
// (low nibbles) and 16 + 4t .. 16 + 4t + 3 (high nibbles), and one (and, or) per register makes two fp16 / bf16
// values of it: with magic = 1024 (fp16) or 128 (bf16), (word >> s) & 0x000F000F | bits(magic) is (magic + q, magic
// + q'), and subtracting magic (magic + 8 when symmetric) leaves q exactly. The low k-step of a block uses the low
// nibbles, the high k-step the high ones; lane t's four k slots stand for the elements
//     A regs a[0] (slots 2t, 2t+1) = elements (4t, 4t+2)      a[2] (slots 2t+8, 2t+9) = elements (4t+1, 4t+3)
// (+16 in the high k-step), and x is staged in shared memory already in that order, so that one 16-byte read gives
// a lane its B registers for both k-steps of a block.
#include "common.cuh"
#include "int4_gemm.cuh"

namespace smolvlm_cuda {
namespace {

constexpr int kWarps = 4;                  // 4 warps x 16 rows = 64 weight rows per block
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerBlock = 16 * kWarps;
constexpr int kChunkBlocks = 32;           // 32-element blocks of x staged at a time (1024 columns)
// uint4 per staged row of x: 4 per block, + 4 of padding so that consecutive rows start 4 banks-of-16-bytes apart
// (the 8 lanes of a quarter warp, rows g and g + 1 x lanes t = 0..3, then read 8 distinct 16-byte bank groups)
constexpr int kRowUnits = kChunkBlocks * 4 + 4;

struct Int4Args {
  void* y;
  const void* x;
  const uint8_t* qweight;
  const __half* scales;
  const __half* mins;  // nullptr when symmetric
  const void* bias;    // nullptr when none
  float* partial;      // [splits, M, N] when split, else nullptr
  int M, N, K, group_size;
  int64_t stride_y, stride_x, stride_q, stride_s;
  int bias_dtype;
  int blocks_per_split;
};

// 16-bit integers from nibbles: with magic = 1024 (fp16) or 128 (bf16), whose unit in the last place is 1, the bits
// of magic OR q (q < 16) are the number magic + q exactly, and subtracting magic (magic + 8 when symmetric) leaves q
// (q - 8) exactly.
template <typename T> struct Nibbles;
template <> struct Nibbles<__half> {
  static constexpr uint32_t kMagicBits = 0x64006400u;  // (1024, 1024)
  __device__ static uint32_t sub(uint32_t biased, bool symmetric) {
    __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&biased), __float2half2_rn(symmetric ? 1032.0f : 1024.0f));
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Nibbles<__nv_bfloat16> {
  static constexpr uint32_t kMagicBits = 0x43004300u;  // (128, 128)
  __device__ static uint32_t sub(uint32_t biased, bool symmetric) {
    __nv_bfloat162 h = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                               __float2bfloat162_rn(symmetric ? 136.0f : 128.0f));
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// The nibbles at bits shift..shift+3 and shift+16..shift+19 of `word` as two exact 16-bit values q (q - 8 when
// symmetric), packed like an MMA register (the first in the low half).
template <typename T, bool SYMMETRIC>
__device__ __forceinline__ uint32_t nibbles_to_pair(uint32_t word, int shift) {
  return Nibbles<T>::sub(((word >> shift) & 0x000F000Fu) | Nibbles<T>::kMagicBits, SYMMETRIC);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void set_word(uint4& v, int i, uint32_t value) {
  if (i == 0) v.x = value;
  else if (i == 1) v.y = value;
  else if (i == 2) v.z = value;
  else v.w = value;
}

// In each quad of lanes (t = lane % 4), lane t holds 16-byte block t of four consecutive blocks. Returns, in lane t,
// word t of each of the four blocks (.x of block 0, .y of block 1, ...). In step r lane t sends its word t ^ r to
// lane t ^ r, which is the word that lane needs from block t.
__device__ __forceinline__ uint4 quad_transpose(const uint4& v, int t) {
  uint4 out = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int partner = t ^ r;
    const uint32_t got = __shfl_xor_sync(0xffffffffu, word_of(v, partner), r);  // word t of block `partner`
    set_word(out, partner, got);
  }
  return out;
}

// Stage x[:, 32 * c0 : 32 * c1] in shared memory in MMA-register order: unit (token, block, t) holds, as four 32-bit
// words, (x[4t], x[4t+2]), (x[4t+1], x[4t+3]), (x[16+4t], x[16+4t+2]), (x[16+4t+1], x[16+4t+3]) of that block.
template <typename T>
__device__ __forceinline__ void stage_x(const Int4Args& a, uint4 (*xs)[kRowUnits], int c0, int c1) {
  const int items = a.M * (c1 - c0) * 8;  // one item: 4 consecutive elements (8 bytes), half h of quarter t
  for (int i = threadIdx.x; i < items; i += kThreads) {
    const int token = i / ((c1 - c0) * 8);
    const int rest = i % ((c1 - c0) * 8);
    const int block = rest / 8, t = (rest % 8) / 2, h = rest % 2;
    const T* src = static_cast<const T*>(a.x) + token * a.stride_x + (int64_t)(c0 + block) * 32 + h * 16 + 4 * t;
    const uint2 e = *reinterpret_cast<const uint2*>(src);  // (x0, x1), (x2, x3)
    const uint32_t even = __byte_perm(e.x, e.y, 0x5410);   // (x0, x2)
    const uint32_t odd = __byte_perm(e.x, e.y, 0x7632);    // (x1, x3)
    reinterpret_cast<uint2*>(&xs[token][block * 4 + t])[h] = make_uint2(even, odd);
  }
}

template <typename T, bool SYMMETRIC, int TOKEN_TILES>
__global__ void __launch_bounds__(kThreads) int4_gemm_kernel(const Int4Args a) {
  constexpr int kTokens = 8 * TOKEN_TILES;
  SMOLVLM_SHARED(uint4, xs, [kTokens][kRowUnits]);
  // sum of x over each staged block (asymmetric only); +1: rows 2t of the 4 lanes t fall in different banks
  SMOLVLM_SHARED(float, xsum, [kTokens][kChunkBlocks + 1]);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row_g = (int64_t)blockIdx.x * kRowsPerBlock + warp * 16 + g;  // A rows g and g + 8
  const int64_t row_g8 = row_g + 8;
  const bool ok_g = row_g < a.N, ok_g8 = row_g8 < a.N;
  const uint8_t* q_g = a.qweight + (ok_g ? row_g : 0) * a.stride_q;
  const uint8_t* q_g8 = a.qweight + (ok_g8 ? row_g8 : 0) * a.stride_q;

  const int nblocks = a.K / 32;
  const int kb_begin = blockIdx.y * a.blocks_per_split;
  const int kb_end = min(nblocks, kb_begin + a.blocks_per_split);

  float acc[TOKEN_TILES][4];
#pragma unroll
  for (int tt = 0; tt < TOKEN_TILES; ++tt) acc[tt][0] = acc[tt][1] = acc[tt][2] = acc[tt][3] = 0.0f;

  for (int c0 = kb_begin; c0 < kb_end; c0 += kChunkBlocks) {
    const int c1 = min(kb_end, c0 + kChunkBlocks);
    __syncthreads();  // every warp is done with the previous chunk
    stage_x<T>(a, xs, c0, c1);
    __syncthreads();
    if (!SYMMETRIC) {
      for (int i = threadIdx.x; i < kTokens * (c1 - c0); i += kThreads) {
        const int token = i / (c1 - c0), block = i % (c1 - c0);
        float s = 0.0f;
        if (token < a.M) {
          for (int u = 0; u < 4; ++u) {
            const uint4 v = xs[token][block * 4 + u];
            const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (int k = 0; k < 8; ++k) s += to_float(e[k]);
          }
        }
        xsum[token][block] = s;
      }
      __syncthreads();
    }

    // 4 blocks per step; the next step's weights are loaded before this step's MMAs
    auto load = [&](const uint8_t* row, bool ok, int block) {
      return ok && block < c1 ? __ldg(reinterpret_cast<const uint4*>(row + (int64_t)block * 16))
                              : make_uint4(0, 0, 0, 0);
    };
    uint4 next_g = load(q_g, ok_g, c0 + t), next_g8 = load(q_g8, ok_g8, c0 + t);
    for (int b0 = c0; b0 < c1; b0 += 4) {
      const uint4 v_g = quad_transpose(next_g, t), v_g8 = quad_transpose(next_g8, t);
      next_g = load(q_g, ok_g, b0 + 4 + t);
      next_g8 = load(q_g8, ok_g8, b0 + 4 + t);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int block = b0 + j;
        if (block >= c1) break;  // the same for the whole warp
        const uint32_t w_g = word_of(v_g, j), w_g8 = word_of(v_g8, j);
        const uint32_t a_lo[4] = {nibbles_to_pair<T, SYMMETRIC>(w_g, 0), nibbles_to_pair<T, SYMMETRIC>(w_g8, 0),
                                  nibbles_to_pair<T, SYMMETRIC>(w_g, 8), nibbles_to_pair<T, SYMMETRIC>(w_g8, 8)};
        const uint32_t a_hi[4] = {nibbles_to_pair<T, SYMMETRIC>(w_g, 4), nibbles_to_pair<T, SYMMETRIC>(w_g8, 4),
                                  nibbles_to_pair<T, SYMMETRIC>(w_g, 12), nibbles_to_pair<T, SYMMETRIC>(w_g8, 12)};
        const int64_t group = (int64_t)block * 32 / a.group_size;
        const float d_g = ok_g ? __half2float(a.scales[row_g * a.stride_s + group]) : 0.0f;
        const float d_g8 = ok_g8 ? __half2float(a.scales[row_g8 * a.stride_s + group]) : 0.0f;
        float m_g = 0.0f, m_g8 = 0.0f;
        if (!SYMMETRIC) {
          m_g = ok_g ? __half2float(a.mins[row_g * a.stride_s + group]) : 0.0f;
          m_g8 = ok_g8 ? __half2float(a.mins[row_g8 * a.stride_s + group]) : 0.0f;
        }
#pragma unroll
        for (int tt = 0; tt < TOKEN_TILES; ++tt) {
          const int token = tt * 8 + g;  // the B column this lane supplies
          const uint4 b = token < a.M ? xs[token][(block - c0) * 4 + t] : make_uint4(0, 0, 0, 0);
          float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          const uint32_t b_lo[2] = {b.x, b.y}, b_hi[2] = {b.z, b.w};
          mma_16x8x16<T>(c, a_lo, b_lo);
          mma_16x8x16<T>(c, a_hi, b_hi);  // c = sum over the block of q * x: rows (g, g+8) x tokens (2t, 2t+1)
          acc[tt][0] += d_g * c[0];
          acc[tt][1] += d_g * c[1];
          acc[tt][2] += d_g8 * c[2];
          acc[tt][3] += d_g8 * c[3];
          if (!SYMMETRIC) {
            const float s0 = xsum[tt * 8 + 2 * t][block - c0], s1 = xsum[tt * 8 + 2 * t + 1][block - c0];
            acc[tt][0] += m_g * s0;
            acc[tt][1] += m_g * s1;
            acc[tt][2] += m_g8 * s0;
            acc[tt][3] += m_g8 * s1;
          }
        }
      }
    }
  }

  // c[i] of tile tt: row (i < 2 ? g : g + 8), token tt * 8 + 2t + i % 2
#pragma unroll
  for (int tt = 0; tt < TOKEN_TILES; ++tt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = i < 2 ? row_g : row_g8;
      const int token = tt * 8 + 2 * t + i % 2;
      if (row >= a.N || token >= a.M) continue;
      if (a.partial != nullptr) {
        a.partial[((int64_t)blockIdx.y * a.M + token) * a.N + row] = acc[tt][i];
      } else {
        const float bias = a.bias != nullptr ? load_float(a.bias, row, a.bias_dtype) : 0.0f;
        static_cast<T*>(a.y)[token * a.stride_y + row] = from_float<T>(acc[tt][i] + bias);
      }
    }
  }
}

// y[m, n] = sum over splits s (in order) of partial[s, m, n] + bias[n]
template <typename T>
__global__ void sum_splits_kernel(T* y, const float* partial, const void* bias, int bias_dtype, int M, int N,
                                  int splits, int64_t stride_y) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)M * N) return;
  const int64_t m = i / N, n = i % N;
  float s = 0.0f;
  for (int k = 0; k < splits; ++k) s += partial[k * (int64_t)M * N + i];
  if (bias != nullptr) s += load_float(bias, n, bias_dtype);
  y[m * stride_y + n] = from_float<T>(s);
}

template <typename T>
void launch(const Int4Args& a, int splits, cudaStream_t stream) {
  // grid: 64 weight rows per block along x, the K splits along y
  const dim3 grid(static_cast<unsigned>(cdiv(a.N, kRowsPerBlock)), static_cast<unsigned>(splits));
  const bool symmetric = a.mins == nullptr;
  const bool two_tiles = a.M > 8;
  if (symmetric && two_tiles) SMOLVLM_LAUNCH(grid, kThreads, 0, stream, int4_gemm_kernel<T, true, 2>)(a);
  else if (symmetric) SMOLVLM_LAUNCH(grid, kThreads, 0, stream, int4_gemm_kernel<T, true, 1>)(a);
  else if (two_tiles) SMOLVLM_LAUNCH(grid, kThreads, 0, stream, int4_gemm_kernel<T, false, 2>)(a);
  else SMOLVLM_LAUNCH(grid, kThreads, 0, stream, int4_gemm_kernel<T, false, 1>)(a);
  check_launch("int4_gemm_kernel");
  if (splits > 1) {
    const int threads = 256;
    const int64_t blocks = cdiv((int64_t)a.M * a.N, threads);
    SMOLVLM_LAUNCH(static_cast<unsigned>(blocks), threads, 0, stream, sum_splits_kernel<T>)(
        static_cast<T*>(a.y), a.partial, a.bias, a.bias_dtype, a.M, a.N, splits, a.stride_y);
    check_launch("sum_splits_kernel");
  }
}

}  // namespace

void int4_gemm(std::uintptr_t y, std::uintptr_t x, std::uintptr_t qweight, std::uintptr_t scales, std::uintptr_t mins,
               std::uintptr_t bias, std::uintptr_t workspace, int64_t M, int64_t N, int64_t K, int64_t group_size,
               int64_t stride_y, int64_t stride_x, int64_t stride_q, int64_t stride_s, int dtype, int bias_dtype,
               int64_t splits, int device, std::uintptr_t stream) {
  const char* op = "int4_gemm";
  check_arg(dtype == kFloat16 || dtype == kBFloat16, "int4_gemm: the CUDA kernel takes fp16 or bf16 x");
  check_arg(M >= 1 && M <= kInt4GemmMaxM, "int4_gemm: the CUDA kernel takes 1 to 16 rows of x, got " +
                                              std::to_string(M));
  check_arg(N >= 1 && N < (int64_t{1} << 31), "int4_gemm: N must be in [1, 2^31), got " + std::to_string(N));
  check_arg(K >= 32 && K % 32 == 0 && K < (int64_t{1} << 31), "int4_gemm: K must be a positive multiple of 32, got " +
                                                                   std::to_string(K));
  check_arg((group_size == 32 || group_size == 64 || group_size == 128) && K % group_size == 0,
            "int4_gemm: group_size must be 32, 64 or 128 and divide K");
  check_arg(y && x && qweight && scales, "int4_gemm: y, x, qweight and scales are required");
  check_arg(aligned16(qweight) && stride_q % 16 == 0 && stride_q >= K / 2,
            "int4_gemm: qweight rows must be 16-byte aligned (16-byte loads) and hold K/2 bytes");
  check_arg(aligned16(x) && stride_x % 8 == 0 && stride_x >= K,
            "int4_gemm: x must have 16-byte aligned rows (pointer and row stride a multiple of 8 elements)");
  check_arg(stride_y >= N && stride_s >= K / group_size, "int4_gemm: y or scales row stride too small");
  check_dtype(bias_dtype, op, "bias");
  const int64_t nblocks = K / 32;
  check_arg(splits >= 1 && splits <= nblocks && splits <= 65535, "int4_gemm: splits must be in [1, K/32]");
  check_arg(splits == 1 || workspace != 0, "int4_gemm: splits > 1 needs an fp32 [splits, M, N] workspace");

  Int4Args a;
  a.y = reinterpret_cast<void*>(y);
  a.x = reinterpret_cast<const void*>(x);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight);
  a.scales = reinterpret_cast<const __half*>(scales);
  a.mins = reinterpret_cast<const __half*>(mins);
  a.bias = reinterpret_cast<const void*>(bias);
  a.partial = splits > 1 ? reinterpret_cast<float*>(workspace) : nullptr;
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.group_size = static_cast<int>(group_size);
  a.stride_y = stride_y;
  a.stride_x = stride_x;
  a.stride_q = stride_q;
  a.stride_s = stride_s;
  a.bias_dtype = bias_dtype;
  a.blocks_per_split = static_cast<int>(cdiv(nblocks, splits));

  DeviceGuard guard(device);
  if (dtype == kFloat16) launch<__half>(a, static_cast<int>(splits), as_stream(stream));
  else launch<__nv_bfloat16>(a, static_cast<int>(splits), as_stream(stream));
}

}  // namespace smolvlm_cuda
