// Row-wise small ops on the CPU, float32: LayerNorm and the tanh-approximated GELU (contracts:
// smolvlm_fast/ops/README.md, small ops).
// The caller (bindings.cpp) checks every argument; these trust them. Rows are shared out on the thread pool
// (thread_pool.h's parallel_for) when there are enough of them; call from outside the pool's tasks.
#pragma once

#include <cstdint>

namespace smolvlm_cpu {

// out[r] = (x[r] - mean(x[r])) / sqrt(var(x[r]) + eps) * weight + bias for the M rows of x [M, D] (biased
// variance, two passes over each row). bias may be nullptr; out may be x.
void layer_norm(const float* x, const float* weight, const float* bias, float eps, int64_t M, int64_t D, float* out);

// out = gelu_tanh(x + bias) = 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) with z = x + bias, over x [M, D];
// bias [D] or nullptr; out may be x. Computed as z / (1 + exp(-2 u)) (the same function, no cancellation in 1 + tanh).
void gelu_tanh(const float* x, const float* bias, int64_t M, int64_t D, float* out);

}  // namespace smolvlm_cpu
