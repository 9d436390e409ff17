"""The fused Triton patch embedding against PyTorch's two ways of computing it, in TFLOP/s.

Baselines, on the same inputs in the same run:
- "conv2d": F.conv2d(stride = P) + flatten + transpose + pos_embed[position_ids] (smolvlm_fast.ops.reference,
  transformers' SigLIP embeddings);
- "unfold+linear": the image cut into patches (unfold + permute + reshape, one copy), F.linear, + pos_embed[ids]
  (what vLLM switched to because cuDNN's conv path is slow for stride = kernel).
Cases: SmolVLM-256M's SigLIP (patch 16, D 768, 512 x 512 tiles) and SmolVLM-2.2B's (patch 14, D 1152, 384 x 384:
27 x 27 patches, 6 pixels left over), one image and a split image's 13 (12 tiles + the global one); the factorized
variant's 224 x 224 stems, grouped (groups 3) and depthwise-separable (dwsep, whose baselines run the depthwise
conv and then the pointwise projection). Position ids are the bucketed ones of a full image.
TFLOP/s = 2 · B · N · D · K / median time with K = C/groups · P² (dwsep: 2 · B · N · C · (P² + D)); times from
triton.testing.do_bench (CUDA events, L2 flushed before each run). Rows go to
bench/results/bench_patch_embed.jsonl (fields in bench/README.md, "Result rows"); skips without a CUDA GPU.

    python bench/bench_patch_embed.py                      # every case, bf16
    python bench/bench_patch_embed.py --ops siglip --dtype float16 --no-save
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
import torch.nn.functional as F

from bench.common import run_kernel_bench, take_quick

BENCH = "bench_patch_embed"


@dataclass
class Case:
    op: str
    shape: str
    flops: int
    ours: Callable[[], torch.Tensor]
    baselines: dict[str, Callable[[], torch.Tensor]]


def full_image_ids(B: int, rows: int, cols: int, device) -> torch.Tensor:
    from smolvlm_fast.models.smolvlm_torch import bucketed_position_ids

    return bucketed_position_ids(torch.ones(B, rows, cols, dtype=torch.bool, device=device), max(rows, cols))


def unfold_patches(pixels: torch.Tensor, P: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C·P·P] (a copy), patches row-major, features in the conv weight's (c, i, j) order."""
    B, C, H, W = pixels.shape
    x = pixels[:, :, : H // P * P, : W // P * P].unfold(2, P, P).unfold(3, P, P)  # [B, C, H/P, W/P, P, P]
    return x.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // P) * (W // P), C * P * P)


def conv_case(name, B, C, H, W, P, D, groups, dtype, device) -> Case:
    from smolvlm_fast.kernels.patch_embed import patch_embed
    from smolvlm_fast.ops import reference

    rows, cols = H // P, W // P
    pixels = torch.randn(B, C, H, W, dtype=dtype, device=device)
    weight = torch.randn(D, C // groups, P, P, dtype=dtype, device=device) * (C // groups * P * P) ** -0.5
    bias = torch.randn(D, dtype=dtype, device=device)
    pos_embed = torch.randn(max(rows, cols) ** 2, D, dtype=dtype, device=device)
    ids = full_image_ids(B, rows, cols, device)
    args = (pixels, weight, bias, pos_embed, ids)
    baselines = {"conv2d": lambda: reference.patch_embed(*args, groups=groups)}
    if groups == 1:
        w2 = weight.reshape(D, -1)
        baselines["unfold+linear"] = lambda: F.linear(unfold_patches(pixels, P), w2, bias) + pos_embed[ids]
    flops = 2 * B * rows * cols * D * (C // groups) * P * P
    shape = f"B={B},C={C},H={H},W={W},P={P},D={D}" + (f",groups={groups}" if groups > 1 else "")
    return Case(name, shape, flops, lambda: patch_embed(*args, groups=groups), baselines)


def dwsep_case(name, B, C, H, W, P, D, dtype, device) -> Case:
    from smolvlm_fast.kernels.patch_embed import dwsep_patch_embed
    from smolvlm_fast.ops import reference

    rows, cols = H // P, W // P
    pixels = torch.randn(B, C, H, W, dtype=dtype, device=device)
    dw_weight = torch.randn(C, 1, P, P, dtype=dtype, device=device) / P
    dw_bias = torch.randn(C, dtype=dtype, device=device)
    pw_weight = torch.randn(D, C, dtype=dtype, device=device) * C**-0.5
    pw_bias = torch.randn(D, dtype=dtype, device=device)
    pos_embed = torch.randn(max(rows, cols) ** 2, D, dtype=dtype, device=device)
    ids = full_image_ids(B, rows, cols, device)
    args = (pixels, dw_weight, dw_bias, pw_weight, pw_bias, pos_embed, ids)
    w_dw = dw_weight.reshape(C, 1, P * P)

    def unfold_linear():
        patches = unfold_patches(pixels, P).view(B, rows * cols, C, P * P)  # [B, N, C, P·P]
        depthwise = (patches * w_dw[:, 0]).sum(-1) + dw_bias  # [B, N, C]
        return F.linear(depthwise, pw_weight, pw_bias) + pos_embed[ids]

    flops = 2 * B * rows * cols * C * (P * P + D)
    return Case(name, f"B={B},C={C},H={H},W={W},P={P},D={D}", flops, lambda: dwsep_patch_embed(*args),
                {"conv2d": lambda: reference.dwsep_patch_embed(*args), "unfold+linear": unfold_linear})


def siglip_cases(dtype, device):
    for B in (1, 13):
        yield conv_case("patch_embed smolvlm-256m", B, 3, 512, 512, 16, 768, 1, dtype, device)
        yield conv_case("patch_embed smolvlm-2.2b", B, 3, 384, 384, 14, 1152, 1, dtype, device)


def factorized_cases(dtype, device):
    for B in (1, 16):
        yield conv_case("patch_embed grouped", B, 3, 224, 224, 16, 384, 3, dtype, device)
        yield dwsep_case("dwsep_patch_embed", B, 3, 224, 224, 16, 384, dtype, device)


CASES = {"siglip": siglip_cases, "factorized": factorized_cases}


def tflops(flops: int, fn: Callable[[], object]) -> list[float]:
    """TFLOP/s of each timed run of fn (do_bench: CUDA events, L2 flushed before each run)."""
    import triton.testing

    return [flops / (ms * 1e-3) / 1e12 for ms in triton.testing.do_bench(fn, return_mode="all")]


def check(case: Case) -> None:
    """Ours against the conv2d baseline, loosely: a wrong kernel must not get a TFLOP/s row."""
    ours, theirs = case.ours(), case.baselines["conv2d"]()
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=5e-2)





def main(argv=None) -> int:
    def measure(case):
        return "TFLOP/s", tflops(case.flops, case.ours), {name: tflops(case.flops, fn)
                                                          for name, fn in case.baselines.items()}
    argv, cases = take_quick(argv, CASES)
    return run_kernel_bench(BENCH, __doc__, cases, measure, check, dtypes=["bfloat16", "float16", "float32"],
                            argv=argv)


if __name__ == "__main__":
    sys.exit(main())
