"""The CUDA kernels whose benchmarks time only Triton, against Triton on the same inputs: one line each, median ms
(triton.testing.do_bench: CUDA events, L2 flushed), the ratio, and the CUDA kernel's GB/s or TFLOP/s.

    python bench/cuda_vs_triton.py          # a CUDA GPU and smolvlm_fast._C built; prints only, saves no rows
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

INT4_SHAPES = [(1, 960, 576), (1, 576, 1536), (16, 960, 576), (1, 49152, 576)]  # (M, N, K): decode layers, lm_head
CROSS_SHAPES = [(1, 64), (8, 1088), (32, 1088)]  # (batch, image tokens), decode


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def line(name: str, cuda_ms: float, triton_ms: float, rate: str) -> None:
    print(f"{name:<44} cuda {cuda_ms:.4f}  triton {triton_ms:.4f}  ratio {triton_ms / cuda_ms:.2f}x  cuda {rate}")


def int4_gemm() -> None:
    from smolvlm_fast.formats import int4 as quant
    from smolvlm_fast.kernels.int4_gemm import int4_gemm as triton_int4_gemm
    from smolvlm_fast.models.int4_linear import Int4Tensors
    from smolvlm_fast.ops import cuda

    for M, N, K in INT4_SHAPES:
        w = Int4Tensors.from_numpy(quant.quantize_int4(np.random.randn(N, K).astype(np.float32), group_size=64),
                                   "cuda")
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        c, t = median_ms(lambda: cuda.int4_gemm(x, w)), median_ms(lambda: triton_int4_gemm(x, w))
        gbps = (w.qweight.numel() + 4 * w.scales.numel()) / (c * 1e-3) / 1e9  # nibbles + fp16 scales and mins
        line(f"int4_gemm M={M} N={N} K={K}", c, t, f"{gbps:.0f} GB/s")


def patch_embed() -> None:
    from smolvlm_fast.kernels.patch_embed import patch_embed as triton_patch_embed
    from smolvlm_fast.ops import cuda

    pixels = torch.randn(13, 3, 512, 512, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(768, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)
    c = median_ms(lambda: cuda.patch_embed(pixels, weight, None, pos, None))
    t = median_ms(lambda: triton_patch_embed(pixels, weight, None, pos, None))
    line("patch_embed 13x3x512x512 P16 D768", c, t, f"{2 * 13 * 1024 * 768 * 768 / (c * 1e-3) / 1e12:.0f} TFLOP/s")


def cross_attention() -> None:
    from smolvlm_fast.kernels.cross_attention import cross_attention as triton_cross_attention
    from smolvlm_fast.ops import cuda

    for B, T in CROSS_SHAPES:
        q = torch.randn(B, 1, 9, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, T, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c, t = median_ms(lambda: cuda.cross_attention(q, k, v)), median_ms(lambda: triton_cross_attention(q, k, v))
        line(f"cross_attention B={B} T={T} 9/3 heads d64", c, t, f"{2 * k.numel() * 2 / (c * 1e-3) / 1e9:.0f} GB/s")


def main() -> int:
    from smolvlm_fast.ops import cuda

    if not torch.cuda.is_available() or not cuda.available():
        print("cuda_vs_triton: needs a CUDA GPU and smolvlm_fast._C; skipped")
        return 0
    print(f"# {torch.cuda.get_device_name()}, bf16, median ms")
    int4_gemm()
    patch_embed()
    cross_attention()
    return 0


if __name__ == "__main__":
    sys.exit(main())
