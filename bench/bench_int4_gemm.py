"""int4_gemm (Triton, smolvlm_fast/kernels/int4_gemm.py) against torch.matmul on fp16/bf16 weights; and the memory
a SmolVLM-256M-shaped model takes with an int4 decoder.

GEMM cases: the linear layers of SmolVLM-256M and -500M (decoder qkv / o / gate_up / down, the LM head, the vision
encoder's qkv / fc1 / fc2 and the connector), as [N, K] weights, for M = 1 and 16 (decode) and M = 2048 (prefill);
int4 weights at group 64 asymmetric, and group 32 (GGUF Q4_1's) for the decoder at M = 1. Per case, two rows:
  decode   GB/s    bytes each side must move (its weight as stored + x + y) / median time: how near the memory
                   bandwidth each runs (the int4 weight is ~3.6x fewer bytes than the fp16 one)
           ms      median time, ratio = torch.matmul's time / ours (> 1: int4 is faster)
  prefill  TFLOP/s 2 M N K / median time, ratio = speedup
Times from triton.testing.do_bench (CUDA events, L2 flushed before every run), both sides on the same x in one run.

Memory: a random-weight SmolVLM-256M-shaped model on the GPU in the --dtype (vision encoder, connector and LM head
stay in it), the decoder's linear layers in int4 (group 64) or not, a paged KV cache of --kv-tokens tokens, then a
prefill of --kv-tokens - 16 prompt tokens and 16 decode steps into it: torch.cuda.max_memory_allocated over that run
(the peak is reset after loading), metric "MB", baseline the same model without int4, ratio = baseline / ours.

Rows go to bench/results/bench_int4_gemm.jsonl (fields in bench/README.md, "Result rows"). GPU only: without
CUDA it prints that it skipped and exits 0.

    python bench/bench_int4_gemm.py                         # every GEMM case in bf16, then the memory rows
    python bench/bench_int4_gemm.py --dtype float16 --no-memory --no-save
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
import torch

from bench.common import append_row, bench_parser, format_row, gpu_skipped, make_row

BENCH = "bench_int4_gemm"
BASELINE = "torch.matmul"
PREFILL_M = 2048

# (layer, N, K) of SmolVLM-256M-Instruct and -500M-Instruct (their config.json on the Hugging Face Hub)
LAYERS_256M = [("256m.qkv", 960, 576), ("256m.o", 576, 576), ("256m.gate_up", 3072, 576), ("256m.down", 576, 1536),
               ("256m.lm_head", 49280, 576)]
LAYERS_500M = [("500m.qkv", 1600, 960), ("500m.o", 960, 960), ("500m.gate_up", 5120, 960), ("500m.down", 960, 2560)]
LAYERS_VISION = [("vision.qkv", 2304, 768), ("vision.fc1", 3072, 768), ("vision.fc2", 768, 3072),
                 ("connector.256m", 576, 12288)]

QUICK_LAYERS = ["256m.qkv", "256m.down"]  # --quick: decode-sized N and K both ways, M = 1, 16 and PREFILL_M


@dataclass
class Case:
    name: str
    M: int
    N: int
    K: int
    group_size: int


def cases() -> list[Case]:
    out = []
    for name, N, K in LAYERS_256M + LAYERS_500M + LAYERS_VISION:
        for M in (1, 16, PREFILL_M):
            out.append(Case(name, M, N, K, 64))
    for name, N, K in LAYERS_256M[:4] + LAYERS_500M:
        out.append(Case(name, 1, N, K, 32))
    return out


def random_int4(N: int, K: int, group_size: int, device):
    from smolvlm_fast.formats import int4 as int4_format
    from smolvlm_fast.models.int4_linear import Int4Tensors

    w = np.random.default_rng(N * K).standard_normal((N, K), dtype=np.float32) * 0.02
    return Int4Tensors.from_numpy(int4_format.quantize_int4(w, group_size=group_size), device)


def int4_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.mins) if t is not None)


def times_ms(fn) -> list[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, return_mode="all"))


def gemm_rows(case: Case, dtype, device) -> list[dict]:
    from smolvlm_fast.kernels.int4_gemm import int4_gemm
    from smolvlm_fast.ops.reference import dequantize_int4

    w = random_int4(case.N, case.K, case.group_size, device)
    dense = dequantize_int4(w).to(dtype)  # [N, K]: the same weight in fp16/bf16
    x = torch.randn(case.M, case.K, device=device, dtype=dtype)
    ours, theirs = int4_gemm(x, w), x @ dense.T
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=3e-2, atol=3e-2 * theirs.float().abs().max().item())

    t_ours, t_theirs = times_ms(lambda: int4_gemm(x, w)), times_ms(lambda: x @ dense.T)
    shape = f"M={case.M},N={case.N},K={case.K},group={case.group_size}"
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(bench=BENCH, case=f"int4_gemm {case.name}", shape=shape, dtype=dtype_name, device=device,
                  baseline=BASELINE, impl="triton")
    if case.M > 16:
        flop = 2 * case.M * case.N * case.K
        return [make_row(metric="TFLOP/s", ours=[flop / (t * 1e-3) / 1e12 for t in t_ours],
                         theirs=[flop / (t * 1e-3) / 1e12 for t in t_theirs], **common)]
    io = (x.numel() + case.M * case.N) * x.element_size()
    ours_bytes, theirs_bytes = int4_bytes(w) + io, dense.numel() * dense.element_size() + io
    return [make_row(metric="GB/s", ours=[ours_bytes / (t * 1e-3) / 1e9 for t in t_ours],
                     theirs=[theirs_bytes / (t * 1e-3) / 1e9 for t in t_theirs], **common),
            make_row(metric="ms", ours=t_ours, theirs=t_theirs, **common)]


# ---------------------------------------------------------------- memory

def smolvlm_256m_model(dtype, device, int4: bool):
    from bench.bench_e2e import SMOLVLM_256M
    from smolvlm_fast.config import ModelConfig
    from smolvlm_fast.models.int4_linear import quantize_model
    from smolvlm_fast.models.smolvlm_torch import SmolVLM

    raw = {"model_type": "idefics3", "text_config": {"model_type": "llama", **SMOLVLM_256M["text"]},
           "vision_config": SMOLVLM_256M["vision"], "scale_factor": SMOLVLM_256M["scale_factor"],
           "image_token_id": SMOLVLM_256M["image_token_id"], "tie_word_embeddings": False}
    with torch.device("meta"):
        model = SmolVLM(ModelConfig.from_dict(raw, source="SmolVLM-256M shapes"))
    model = model.to_empty(device=device).to(dtype).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.normal_(0.0, 0.02, generator=generator)
    return quantize_model(model) if int4 else model


@torch.inference_mode()
def peak_memory_mb(dtype, device, int4: bool, kv_tokens: int, block_size: int = 16) -> tuple[float, float]:
    """(weights MB, peak MB) over a prefill + 16 decode steps filling a kv_tokens cache."""
    from smolvlm_fast.engine.cache import PagedCache, schedule_step

    model = smolvlm_256m_model(dtype, device, int4)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    cache = PagedCache(kv_tokens // block_size, block_size)
    kv = model.allocate_kv_cache(cache.allocator.num_blocks, block_size)
    prompt = kv_tokens - 16
    ids = torch.randint(3, 49000, (prompt,), device=device)
    hidden = model(ids, schedule_step(cache, {0: prompt}), kv)
    token = model.compute_logits(hidden[-1:]).argmax(-1)
    for _ in range(16):
        token = model.compute_logits(model(token, schedule_step(cache, {0: 1}), kv)).argmax(-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del model, kv, hidden
    gc.collect()
    torch.cuda.empty_cache()
    return weights / 2**20, peak / 2**20


def memory_row(dtype, device, kv_tokens: int) -> dict:
    w_int4, ours = peak_memory_mb(dtype, device, True, kv_tokens)
    w_dense, theirs = peak_memory_mb(dtype, device, False, kv_tokens)
    print(f"weights: {w_int4:,.0f} MB with an int4 decoder, {w_dense:,.0f} MB without")
    row = make_row(bench=BENCH, case="memory smolvlm-256m int4 decoder", shape=f"kv_tokens={kv_tokens},batch=1",
                   dtype=str(dtype).removeprefix("torch."), device=device, metric="MB", ours=[ours],
                   baseline=f"the same model, decoder in {str(dtype).removeprefix('torch.')}", theirs=[theirs])
    row["ratio"] = theirs / ours  # less memory is better: baseline / ours
    row["weights_mb"], row["baseline_weights_mb"] = w_int4, w_dense
    return row


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--layers", nargs="+", default=None, help="only these layer names (e.g. 256m.qkv vision.fc1)")
    p.add_argument("--kv-tokens", type=int, default=4096)
    p.add_argument("--no-gemm", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help=f"a bring-up run's smoke numbers: layers {' '.join(QUICK_LAYERS)} only, no memory row")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.no_memory = args.layers or QUICK_LAYERS, True
    if gpu_skipped(BENCH):
        return 0
    dtype, device = getattr(torch, args.dtype), "cuda"
    torch.manual_seed(0)
    rows = []
    if not args.no_gemm:
        for case in cases():
            if args.layers and case.name not in args.layers:
                continue
            for row in gemm_rows(case, dtype, device):
                print(format_row({**row, "case": f"{row['case']} {row['shape']}"}))
                rows.append(row)
    if not args.no_memory:
        row = memory_row(dtype, device, args.kv_tokens)
        print(format_row(row))
        rows.append(row)
    if not args.no_save:
        for row in rows:
            append_row(BENCH, row, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
