// Matrix products with bfloat16 operands and float32 accumulation: out[M, N] = x[M, K] @ W[N, K]^T (+ bias, an
// epilogue, + what out held). x is float32, rounded to bf16 (nearest even) as it is read; W is repacked once, at
// load, into the layout below. Three implementations, picked at run time (bf16_isa): AMX tiles (_tile_dpbf16ps),
// AVX512-BF16 (vdpbf16ps), and float32 FMAs over the same packed bf16 weights. All give the same products up to
// float32 summation order. The caller (bindings.cpp) checks every argument; these functions trust them.
#pragma once

#include <cstdint>

namespace smolvlm_cpu {

// Packed layout: W's rows in blocks of 16 (n), K padded with zeros to Kp, a multiple of 32; within a block, for
// each pair of k (kp = k / 2) the 16 rows' two values, so a block is [Kp / 2][16][2] bf16:
//   packed[((nb * (Kp / 2) + kp) * 16 + j) * 2 + t] = bf16(W[nb * 16 + j, 2 * kp + t])   (0 past N or K)
// One 16-pair row is one AVX512-BF16 operand (16 lanes of n, each a k pair) and 16 such rows are one AMX B tile.
constexpr int64_t kBf16BlockN = 16;
constexpr int64_t kBf16BlockK = 32;
int64_t bf16_padded_k(int64_t K);                 // Kp
int64_t bf16_packed_elems(int64_t N, int64_t K);  // ceil(N / 16) * 16 * Kp
// w [N, K] float32 -> packed (bf16_packed_elems uint16 values), rounding to nearest even.
void bf16_pack(const float* w, int64_t N, int64_t K, uint16_t* packed);

struct Bf16Matrix {
    const uint16_t* w;  // packed as above
    int64_t N, K;
};

enum class Epilogue { none, gelu_tanh };

// out[m * ldo + n] = (accumulate ? out[m * ldo + n] : 0) + epilogue(sum_k bf16(x[m * ldx + k]) W[n, k] + bias[n])
// bias may be null. accumulate adds into out (a residual stream updated in place). On the thread pool.
void bf16_gemm(const float* x, int64_t M, int64_t ldx, const Bf16Matrix& w, const float* bias, Epilogue epilogue,
               bool accumulate, float* out, int64_t ldo);

enum class Bf16Isa { amx, avx512bf16, f32, amx_emulated };
// What bf16_gemm runs: the best this CPU (and the OS: AMX needs arch_prctl permission) offers, capped by the
// environment variable SMOLVLM_FAST_CPU_ISA ("amx", "avx512bf16", "f32") read once, or set by bf16_set_isa.
Bf16Isa bf16_isa();
// Forces one (tests, benchmarks); false where this CPU cannot run it. amx_emulated runs the AMX kernel's code
// with each tile instruction done in software: the AMX path's layout and loop logic, testable on any CPU.
bool bf16_set_isa(Bf16Isa isa);
const char* bf16_isa_name(Bf16Isa isa);  // "amx", "avx512bf16", "f32", "amx-emulated"

}  // namespace smolvlm_cpu
