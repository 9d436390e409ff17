// Host C++ emulation of the CUDA the kernels of csrc/cuda/ use, so that the same .cu files compile with g++ and run on
// the CPU (tests/test_cuda_emu.py). common.cuh includes this file instead of the CUDA headers when SMOLVLM_CUDA_EMU is
// defined; nvcc builds never see it. What runs where: runtime.h (threads, barriers, shared memory), mma.h (the
// tensor-core MMA), half_types.h (fp16 / bf16). This file: the CUDA keywords, vector types, intrinsics, the
// SMOLVLM_LAUNCH / SMOLVLM_DYNAMIC_SHARED macros common.cuh defines for nvcc, and runtime API stubs (no device:
// every call succeeds, except the device queries of device_info.cu, which report none).
//
// The emulator covers what the kernels use and sm_80 offers them; anything else fails to compile here, on purpose.
#pragma once

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "half_types.h"
#include "mma.h"
#include "runtime.h"

struct CUstream_st;
using cudaStream_t = CUstream_st*;

// ---------------------------------------------------------------- keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __shared__ is not defined: shared memory goes through the macros (runtime.h allocates and poisons it per block)
#define SMOLVLM_SHARED(type, name, dims) type(&name) dims = ::smolvlm_emu::shared_array<type dims>()
#define SMOLVLM_SHARED_ALIGNED(bytes, type, name, dims) \
  type(&name) dims = ::smolvlm_emu::shared_array<type dims>(bytes)

// kernel<<<grid, block, shared_bytes, stream>>>(args) (the stream is ignored: launches run to completion in order)
#define SMOLVLM_LAUNCH(grid, block, shared, stream, ...) \
  ::smolvlm_emu::Launch(grid, block, shared, stream, __VA_ARGS__)
#define SMOLVLM_DYNAMIC_SHARED(type, name) type* const name = ::smolvlm_emu::dynamic_shared<type>()

inline void __syncthreads() { smolvlm_emu::syncthreads(); }

namespace smolvlm_emu {

template <typename Kernel>
struct Launch {
  dim3 grid, block;
  size_t shared;
  Kernel kernel;
  Launch(dim3 g, dim3 b, size_t s, cudaStream_t, Kernel k) : grid(g), block(b), shared(s), kernel(k) {}
  template <typename... Args>
  void operator()(Args&&... args) const {
    launch(grid, block, shared, kernel, std::forward<Args>(args)...);
  }
};

}  // namespace smolvlm_emu

// ---------------------------------------------------------------- vector types and intrinsics

struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// byte i of the result is byte (selector nibble i) & 7 of the 8 bytes y:x
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return out;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  if (width != 32) smolvlm_emu::fail("__shfl_xor_sync: only width 32 is emulated");
  return smolvlm_emu::shuffle(mask, var, smolvlm_emu::self.lane ^ lane_mask);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  if (width != 32) smolvlm_emu::fail("__shfl_sync: only width 32 is emulated");
  return smolvlm_emu::shuffle(mask, var, src_lane);
}

// ---------------------------------------------------------------- runtime API (no device)

enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidDevice = 101 };
enum cudaDeviceAttr : int { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };

inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : "invalid device ordinal (CUDA emulator)";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = -1;
  return cudaErrorInvalidDevice;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaErrorInvalidDevice;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int) { return cudaErrorInvalidDevice; }
