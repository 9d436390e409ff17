"""Small Triton ops against eager PyTorch (the reference in smolvlm_fast/ops/reference.py), in GB/s.

Cases use the SmolVLM shapes (the released config.json files): hidden 576 / 960 / 2048 for the RMSNorm,
intermediate 1536 / 2560 / 8192 for SwiGLU, the SigLIP encoder's 1024 patches x 768 / 1152 for LayerNorm and GELU,
and 3 or 5 KV heads of 64 for the cache write; one token (decode) and many (prefill) each.
GB/s = bytes the op must read and write (each tensor once) / median time; times from triton.testing.do_bench
(CUDA events, L2 flushed before every run), ours and the baseline on the same inputs in the same run.
Rows go to bench/results/bench_small_ops.jsonl (fields in bench/README.md, "Result rows").
Where smolvlm_fast._C is built, the ops with a CUDA kernel (write_kv_cache) are measured through it too, on the same
cases: a second column, rows with impl "cuda".

    python bench/bench_small_ops.py                    # every case, bf16
    python bench/bench_small_ops.py --ops rms_norm write_kv_cache --dtype float16 --no-save
"""
from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

from bench.common import QUICK_CASES, append_row, format_row, make_row, run_kernel_bench, take_quick

BENCH = "bench_small_ops"
BASELINE = "torch eager"


@dataclass
class Case:
    op: str
    shape: str
    nbytes: int
    ours: Callable[[], object]
    theirs: Callable[[], object]


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rms_norm_cases(dtype, device):
    from smolvlm_fast.kernels.rms_norm import rms_norm
    from smolvlm_fast.ops.reference import rms_norm as eager

    for hidden in (576, 960, 2048):
        for tokens in (1, 4096):
            x, r = (torch.randn(tokens, hidden, dtype=dtype, device=device) for _ in range(2))
            w = torch.randn(hidden, dtype=dtype, device=device)
            shape = f"tokens={tokens},hidden={hidden}"
            yield Case("rms_norm", shape, _bytes(x, w, x), lambda x=x, w=w: rms_norm(x, w, 1e-5),
                       lambda x=x, w=w: eager(x, w, 1e-5))
            yield Case("rms_norm+residual", shape, _bytes(x, r, w, x, x),
                       lambda x=x, r=r, w=w: rms_norm(x, w, 1e-5, r), lambda x=x, r=r, w=w: eager(x, w, 1e-5, r))


def layer_norm_cases(dtype, device):
    from smolvlm_fast.kernels.layer_norm import layer_norm
    from smolvlm_fast.ops.reference import layer_norm as eager

    for hidden in (768, 1152):
        for tokens in (1024, 13 * 1024):  # one 512x512 tile; 13 tiles (a split image)
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            w, b = torch.randn(hidden, dtype=dtype, device=device), torch.randn(hidden, dtype=dtype, device=device)
            yield Case("layer_norm", f"tokens={tokens},hidden={hidden}", _bytes(x, w, b, x),
                       lambda x=x, w=w, b=b: layer_norm(x, w, b, 1e-6), lambda x=x, w=w, b=b: eager(x, w, b, 1e-6))


def activation_cases(dtype, device):
    from smolvlm_fast.kernels.activations import gelu_tanh, silu_and_mul
    from smolvlm_fast.ops import reference

    for inter in (1536, 2560, 8192):
        for tokens in (1, 4096):
            x = torch.randn(tokens, 2 * inter, dtype=dtype, device=device)
            yield Case("silu_and_mul", f"tokens={tokens},intermediate={inter}", _bytes(x) * 3 // 2,
                       lambda x=x: silu_and_mul(x), lambda x=x: reference.silu_and_mul(x))
    for inter in (3072, 4304):
        x = torch.randn(13 * 1024, inter, dtype=dtype, device=device)
        yield Case("gelu_tanh", f"tokens={13 * 1024},intermediate={inter}", 2 * _bytes(x),
                   lambda x=x: gelu_tanh(x), lambda x=x: reference.gelu_tanh(x))


def write_kv_cache_cases(dtype, device, impl="triton"):
    from smolvlm_fast.ops import reference
    if impl == "cuda":
        from smolvlm_fast.ops.cuda import write_kv_cache
    else:
        from smolvlm_fast.kernels.write_kv_cache import write_kv_cache

    block_size, head_dim, max_position = 16, 64, 8192
    table = reference.rope_table(head_dim, max_position, 100000.0, device=device)
    for heads in (3, 5):
        for tokens in (1, 64, 4096):
            num_blocks = max(64, 2 * tokens // block_size)
            k, v = (torch.randn(tokens, heads, head_dim, dtype=dtype, device=device) for _ in range(2))
            caches = [torch.zeros(num_blocks, block_size, heads, head_dim, dtype=dtype, device=device)
                      for _ in range(2)]
            slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int32)
            positions = torch.randint(0, max_position, (tokens,), dtype=torch.int32, device=device)
            rope = {"cos_sin": table, "positions": positions}
            nbytes = 2 * _bytes(k, v) + _bytes(slots, positions) + tokens * head_dim * table.element_size()
            yield Case("write_kv_cache+rope", f"tokens={tokens},kv_heads={heads},head_dim={head_dim}", nbytes,
                       lambda k=k, v=v, c=caches, s=slots, r=rope: write_kv_cache(k, v, *c, s, **r),
                       lambda k=k, v=v, c=caches, s=slots, r=rope: reference.write_kv_cache(k, v, *c, s, **r))


CASES = {"rms_norm": rms_norm_cases, "layer_norm": layer_norm_cases, "activations": activation_cases,
         "write_kv_cache": write_kv_cache_cases}
# the groups with a CUDA kernel too (smolvlm_fast._C): the same cases through smolvlm_fast.ops.cuda
CUDA_CASES = {"write_kv_cache": functools.partial(write_kv_cache_cases, impl="cuda")}


def gbps(nbytes: int, fn: Callable[[], object]) -> list[float]:
    """GB/s of each timed run of fn (do_bench: CUDA events, L2 flushed before each run)."""
    import triton.testing

    return [nbytes / (ms * 1e-3) / 1e9 for ms in triton.testing.do_bench(fn, return_mode="all")]


def check(case: Case) -> None:
    """Ours against eager on the case's inputs, loosely: a wrong kernel must not get a GB/s row."""
    ours, theirs = case.ours(), case.theirs()
    if ours is None:  # write_kv_cache writes in place; its tests cover it
        return
    pairs = zip(ours, theirs) if isinstance(ours, tuple) else [(ours, theirs)]
    for a, b in pairs:
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def cuda_column(argv=None, quick=False) -> None:
    """The CUDA column: CUDA_CASES of the selected groups, timed like the Triton rows, saved with impl "cuda"
    (quick: the first QUICK_CASES of each, as the Triton rows under --quick)."""
    import argparse

    from smolvlm_fast.ops import cuda

    if not torch.cuda.is_available() or not cuda.available():
        return
    p = argparse.ArgumentParser(add_help=False)  # run_kernel_bench's options, which it has already checked
    p.add_argument("--ops", nargs="+", default=list(CASES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    args, _ = p.parse_known_args(argv)
    for group in args.ops:
        group_cases = CUDA_CASES.get(group, lambda dtype, device: [])(getattr(torch, args.dtype), "cuda")
        for case in itertools.islice(group_cases, QUICK_CASES if quick else None):
            check(case)
            row = make_row(bench=BENCH, case=case.op, shape=case.shape, dtype=args.dtype, device="cuda", metric="GB/s",
                           ours=gbps(case.nbytes, case.ours), baseline=BASELINE, theirs=gbps(case.nbytes, case.theirs),
                           impl="cuda")
            print(format_row({**row, "case": f"{case.op} {case.shape} [cuda]"}))
            if not args.no_save:
                append_row(BENCH, row, args.results_dir)





def main(argv=None) -> int:
    def measure(case):
        return "GB/s", gbps(case.nbytes, case.ours), {BASELINE: gbps(case.nbytes, case.theirs)}
    argv, cases = take_quick(argv, CASES)
    code = run_kernel_bench(BENCH, __doc__, cases, measure, check, dtypes=["bfloat16", "float16", "float32"],
                            argv=argv)
    cuda_column(argv, quick=cases is not CASES)
    return code


if __name__ == "__main__":
    sys.exit(main())
