// What the extension was built with and what it finds at run time (python -m smolvlm_fast.env prints these).
// Declarations only (host C++): bindings.cpp includes this file.
#pragma once

#include <string>

namespace smolvlm_cuda {

int cuda_runtime_version();  // of the CUDA runtime linked in (e.g. 13000), or -1
int cuda_driver_version();   // the driver's CUDA version, 0 when no driver is installed
int device_count();          // CUDA devices visible, 0 when none (or no driver)
// "major.minor" compute capability of a device, or "" when it cannot be read
std::string compute_capability(int device);

}  // namespace smolvlm_cuda
