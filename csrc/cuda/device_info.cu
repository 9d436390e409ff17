#include "common.cuh"
#include "device_info.cuh"

namespace smolvlm_cuda {

int cuda_runtime_version() {
  int v = -1;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : -1;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error: no device is not a failure here
    return 0;
  }
  return n;
}

std::string compute_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace smolvlm_cuda
