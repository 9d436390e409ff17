// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 for the CUDA emulator: D = A B + C with A 16x16
// (row), B 16x8 (col), fp32 C and D, each lane holding the fragments the PTX ISA assigns it (lane = 4 g + t):
//   A regs a[0]: A[g][2t, 2t+1]  a[1]: A[g+8][2t, 2t+1]  a[2]: A[g][2t+8, 2t+9]  a[3]: A[g+8][2t+8, 2t+9]
//   B regs b[0]: B[2t, 2t+1][g]  b[1]: B[2t+8, 2t+9][g]
//   C / D  d[0]: D[g][2t]  d[1]: D[g][2t+1]  d[2]: D[g+8][2t]  d[3]: D[g+8][2t+1]
// with the lower-indexed element of each 32-bit register in its low 16 bits. The lanes hand each other their
// registers through the warp's exchange buffer; each lane then computes its own four elements of D: the 16 products
// (exact: 16-bit significands) summed in double, added to C and rounded to fp32 once.
//
// SMOLVLM_EMU_PLANT=swapped_fragment (tests only, runtime.h) reads a[1] and a[2] the other way round, the classic
// mistake of taking a[1] for the upper 8 columns: tests/test_cuda_emu.py shows the checks catch it.
#pragma once

#include <cstdint>

#include "half_types.h"
#include "runtime.h"

namespace smolvlm_emu {

inline float lane_element(uint32_t reg, int high, __half) { return __half2float(__half{uint16_t(reg >> (16 * high))}); }
inline float lane_element(uint32_t reg, int high, __nv_bfloat16) {
  return __bfloat162float(__nv_bfloat16{uint16_t(reg >> (16 * high))});
}

// A[row][k] from the lanes' registers
template <typename T>
float a_element(const LaneSlot (&slots)[32], int row, int k) {
  const int lane = 4 * (row % 8) + (k % 8) / 2;
  static const bool swapped = planted("swapped_fragment");
  const int reg = swapped ? (row < 8 ? 0 : 2) + (k < 8 ? 0 : 1) : (row < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
  return lane_element(slots[lane].a[reg], k % 2, T{});
}

// B[k][col]
template <typename T>
float b_element(const LaneSlot (&slots)[32], int k, int col) {
  const int lane = 4 * col + (k % 8) / 2;
  return lane_element(slots[lane].b[k < 8 ? 0 : 1], k % 2, T{});
}

template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int g = self.lane / 4, t = self.lane % 4;
  warp_exchange(
      0xffffffffu, "mma.sync never completed",
      [&](LaneSlot& s) {
        for (int i = 0; i < 4; ++i) s.a[i] = a[i];
        s.b[0] = b[0];
        s.b[1] = b[1];
      },
      [&](const LaneSlot(&slots)[32]) {
        for (int i = 0; i < 4; ++i) {
          const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + i % 2;
          double sum = 0.0;
          for (int k = 0; k < 16; ++k)
            sum += static_cast<double>(a_element<T>(slots, row, k)) * b_element<T>(slots, k, col);
          d[i] = static_cast<float>(d[i] + sum);
        }
        return 0;
      });
}

}  // namespace smolvlm_emu
