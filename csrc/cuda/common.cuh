// Shared by the .cu files of smolvlm_fast._C (never by bindings.cpp, which sees only the per-op .cuh headers):
// dtype codes and conversions, 16-byte vector loads, argument checks and CUDA error handling on the host.
//
// The extension is compiled without PyTorch's headers: tensors arrive as raw device addresses (Python ints),
// their sizes and strides in elements, a dtype code (DType below, the same numbers as smolvlm_fast/ops/cuda.py)
// and the caller's CUDA stream as an integer. Every entry point checks what it is given and throws
// std::invalid_argument (Python: ValueError) for a bad argument, std::runtime_error (RuntimeError) when CUDA fails.
//
// The device-only constructs the .cu files need beyond CUDA C++ functions go through the macros below, so that the
// same files also compile as host C++ under the CPU emulator (emu/cuda_emu.h, with SMOLVLM_CUDA_EMU defined), which
// defines them its own way: SMOLVLM_LAUNCH(grid, block, shared, stream, kernel)(args) for
// kernel<<<grid, block, shared, stream>>>(args), SMOLVLM_SHARED(type, name, [dims]) and
// SMOLVLM_SHARED_ALIGNED(bytes, type, name, [dims]) for __shared__ [__align__(bytes)] type name[dims],
// SMOLVLM_DYNAMIC_SHARED(type, name) for extern __shared__ type name[], and the inline PTX of mma_16x8x16.
#pragma once

#if defined(SMOLVLM_CUDA_EMU)
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define SMOLVLM_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#define SMOLVLM_SHARED(type, name, dims) __shared__ type name dims
#define SMOLVLM_SHARED_ALIGNED(bytes, type, name, dims) __shared__ __align__(bytes) type name dims
#define SMOLVLM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace smolvlm_cuda {

// dtype codes of float tensors (ops/cuda.py: DTYPES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------- device: conversions

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: what storing x in a tensor of T keeps of it
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// Element i of a float tensor whose dtype is only known at run time (epilogue operands: bias, pos_embed, cos_sin).
__device__ __forceinline__ float load_float(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_float(void* p, int64_t i, float v, int dtype) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Element i of an int32 or int64 index tensor (positions, slot_mapping, position_ids).
__device__ __forceinline__ int64_t load_index(const void* p, int64_t i, bool is_int64) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// ---------------------------------------------------------------- device: 16-byte vectors

// One 16-byte load of VEC = 16 / sizeof(T) elements, as floats. p must be 16-byte aligned.
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float (&out)[N]) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(e[i]);
  }
  __device__ __forceinline__ static void store(T* p, const float (&in)[N]) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ---------------------------------------------------------------- device: tensor cores (sm_80+)

// D = A (16x16, row) * B (16x8, col) + D, fp32 accumulators. Fragments (lane = 4 * g + t):
//   a[0]: A[g][2t, 2t+1]   a[1]: A[g+8][2t, 2t+1]   a[2]: A[g][2t+8, 2t+9]   a[3]: A[g+8][2t+8, 2t+9]
//   b[0]: B[2t, 2t+1][g]   b[1]: B[2t+8, 2t+9][g]
//   d[0]: D[g][2t]  d[1]: D[g][2t+1]  d[2]: D[g+8][2t]  d[3]: D[g+8][2t+1]
// (lower element of each register in its low 16 bits). Which column k of A a lane's register stands for does not
// matter to the product as long as B's register in the same lane stands for the same k: the int4 kernel uses that.
template <typename T> __device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                                                   const uint32_t (&b)[2]);

template <> __device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                                 const uint32_t (&b)[2]) {
#if defined(SMOLVLM_CUDA_EMU)
  smolvlm_emu::mma_m16n8k16<__half>(d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <> __device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                        const uint32_t (&b)[2]) {
#if defined(SMOLVLM_CUDA_EMU)
  smolvlm_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------- host: checks and launches

inline void check_arg(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// After a launch: a bad configuration or no usable device shows here (a fault inside the kernel shows later, at
// the caller's next synchronisation, as with any asynchronous CUDA call).
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

inline void check_dtype(int dtype, const char* op, const char* name) {
  check_arg(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
            std::string(op) + ": " + name + " has an unknown dtype code " + std::to_string(dtype));
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Makes `device` current for the scope (the tensors' device, which need not be the runtime's current one).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace smolvlm_cuda
