"""Triton rope_attention and cross_attention against torch's scaled_dot_product_attention, in TFLOP/s (GB/s for decode).

Cases (head_dim 64 unless said; SmolVLM shapes from the released config.json):
  rope_attention  text prefill with RoPE, causal and not: 9 over 3 heads (256M), 15 over 5 (500M) and 32 over 32
                  (2.2B), 2048 and 8192 tokens, 16384 tokens per batch; the baseline applies RoPE to q and k
                  eagerly (reference.apply_rope), then runs SDPA (enable_gqa). "causal" (no RoPE, against SDPA
                  alone) shows what rotating K inside the kernel costs.
                  vision encoder, no RoPE, not causal: 13 tiles of 32x32 patches x 12 heads (256M/500M) and of
                  27x27 patches x 16 heads of 72 (2.2B); "+mask" pads every other tile to a 5/8 x 3/4 region, the
                  baseline then gets the key mask as SDPA's attn_mask.
  cross_attention decode (S = 1) and prefill (S = 512) text queries over 13 tiles of image tokens (1053 = 13 x 81)
                  and over one 256-token image (the factorized variant, docs/xattn.md), 9 over 3 and 15 over 5 heads;
                  baseline SDPA (enable_gqa), no mask.
TFLOP/s = 4·B·Hq·S·keys·Dh / median time, keys = S/2 when causal (FlashAttention's count; RoPE not counted).
Decode GB/s = bytes of q, K, V and the output / median time. Times from triton.testing.do_bench (CUDA events, L2
flushed before each run), ours and the baseline on the same inputs in the same run, after a correctness check.
Rows go to bench/results/bench_attention.jsonl (fields in bench/README.md, "Result rows").

    python bench/bench_attention.py                       # every case, bf16
    python bench/bench_attention.py --ops cross_attention --dtype float16 --no-save
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
import torch.nn.functional as F

from bench.common import run_kernel_bench, take_quick

BENCH = "bench_attention"
BASELINE = "torch SDPA"
TOKENS_PER_BATCH = 16384
TEXT_SEQ_LENS = (2048, 8192)
TEXT_HEADS = ((9, 3), (15, 5), (32, 32))
VISION = ((13, 32, 12, 64), (13, 27, 16, 72))  # (tiles, patches per side, heads, head_dim)
IMAGE_TOKENS = (13 * 81, 256)  # a SmolVLM-256M image of 13 tiles; one 256-token image (the factorized variant's)
CROSS_HEADS = ((9, 3), (15, 5))
CROSS_BATCHES = ((1, 1), (32, 1), (4, 512))  # (B, S)


@dataclass
class Case:
    op: str
    shape: str
    metric: str
    amount: float  # FLOPs for TFLOP/s, bytes for GB/s
    ours: Callable[[], torch.Tensor]
    theirs: Callable[[], torch.Tensor]  # [B, S, Hq, Dh] like ours


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device)


def _sdpa(q, k, v, *, causal=False, attn_mask=None):
    """SDPA on token-major tensors: [B, S, H, D] views transposed to [B, H, S, D] and back (no copies)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def _flops(B, Hq, S, keys, Dh, causal=False):
    return 4 * B * Hq * S * (keys / 2 if causal else keys) * Dh


def rope_attention_cases(dtype, device):
    from smolvlm_fast.kernels.rope_attention import rope_attention
    from smolvlm_fast.ops.reference import apply_rope, rope_table

    Dh = 64
    table = rope_table(Dh, 8192, 100000.0, device=device)
    for Hq, Hkv in TEXT_HEADS:
        for S in TEXT_SEQ_LENS:
            B = TOKENS_PER_BATCH // S
            q, k, v = (_randn(B, S, H, Dh, dtype=dtype, device=device) for H in (Hq, Hkv, Hkv))
            positions = torch.arange(S, dtype=torch.int32, device=device).expand(B, S)
            rope = {"cos_sin": table, "positions": positions}

            def theirs(q=q, k=k, v=v, positions=positions, causal=True):
                flat = positions.reshape(-1)
                q = apply_rope(q.flatten(0, 1), table, flat).view(q.shape)
                k = apply_rope(k.flatten(0, 1), table, flat).view(k.shape)
                return _sdpa(q, k, v, causal=causal)

            shape = f"B={B},S={S},heads={Hq}/{Hkv},head_dim={Dh}"
            yield Case("rope_attention/causal", shape, "TFLOP/s", _flops(B, Hq, S, S, Dh, True),
                       lambda q=q, k=k, v=v: rope_attention(q, k, v, causal=True),
                       lambda q=q, k=k, v=v: _sdpa(q, k, v, causal=True))
            for causal in (True, False):
                yield Case(f"rope_attention/{'causal' if causal else 'full'}+rope", shape, "TFLOP/s",
                           _flops(B, Hq, S, S, Dh, causal),
                           lambda q=q, k=k, v=v, r=rope, causal=causal: rope_attention(q, k, v, causal=causal, **r),
                           lambda theirs=theirs, causal=causal: theirs(causal=causal))

    for B, side, H, Dh in VISION:
        S = side * side
        q, k, v = (_randn(B, S, H, Dh, dtype=dtype, device=device) for _ in range(3))
        shape = f"B={B},S={S},heads={H},head_dim={Dh}"
        yield Case("rope_attention/vision", shape, "TFLOP/s", _flops(B, H, S, S, Dh),
                   lambda q=q, k=k, v=v: rope_attention(q, k, v, causal=False),
                   lambda q=q, k=k, v=v: _sdpa(q, k, v))
        grid = torch.ones(B, side, side, dtype=torch.bool, device=device)
        grid[::2, side * 5 // 8:] = False
        grid[::2, :, side * 3 // 4:] = False
        key_mask = grid.flatten(1)
        attn_mask = key_mask[:, None, None, :]
        yield Case("rope_attention/vision+mask", shape, "TFLOP/s", _flops(B, H, S, S, Dh),
                   lambda q=q, k=k, v=v, m=key_mask: rope_attention(q, k, v, causal=False, key_mask=m),
                   lambda q=q, k=k, v=v, m=attn_mask: _sdpa(q, k, v, attn_mask=m))


def cross_attention_cases(dtype, device):
    from smolvlm_fast.kernels.cross_attention import cross_attention

    Dh = 64
    for (Hq, Hkv), (B, S), T in itertools.product(CROSS_HEADS, CROSS_BATCHES, IMAGE_TOKENS):
        q = _randn(B, S, Hq, Dh, dtype=dtype, device=device)
        k, v = (_randn(B, T, Hkv, Dh, dtype=dtype, device=device) for _ in range(2))
        shape = f"B={B},S={S},T={T},heads={Hq}/{Hkv},head_dim={Dh}"
        if S == 1:
            op, metric, amount = "cross_attention/decode", "GB/s", 2 * q.nbytes + k.nbytes + v.nbytes
        else:
            op, metric, amount = "cross_attention/prefill", "TFLOP/s", _flops(B, Hq, S, T, Dh)
        yield Case(op, shape, metric, amount, lambda q=q, k=k, v=v: cross_attention(q, k, v),
                   lambda q=q, k=k, v=v: _sdpa(q, k, v))


CASES = {"rope_attention": rope_attention_cases, "cross_attention": cross_attention_cases}


def rates(case: Case, fn: Callable[[], object]) -> list[float]:
    """TFLOP/s or GB/s of each timed run of fn (do_bench: CUDA events, L2 flushed before each run)."""
    import triton.testing

    scale = 1e12 if case.metric == "TFLOP/s" else 1e9
    return [case.amount / (ms * 1e-3) / scale for ms in triton.testing.do_bench(fn, return_mode="all")]


def check(case: Case) -> None:
    """Ours against the baseline on the case's inputs, loosely: a wrong kernel must not get a row."""
    torch.testing.assert_close(case.ours().float(), case.theirs().float(), rtol=2e-2, atol=2e-2)





def main(argv=None) -> int:
    def measure(case):
        return case.metric, rates(case, case.ours), {BASELINE: rates(case, case.theirs)}
    argv, cases = take_quick(argv, CASES)
    return run_kernel_bench(BENCH, __doc__, cases, measure, check, dtypes=["bfloat16", "float16"], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
