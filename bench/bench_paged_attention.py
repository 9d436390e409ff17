"""Paged-attention decode: the Triton kernel against gather-then-SDPA and against the GPU's copy bandwidth.

Per (batch, context), one query per sequence, every sequence at the full context, pages in shuffled order:
  ours      smolvlm_fast.kernels.paged_attention (split-context decode, one launch or two): rows with impl "triton";
            and, where smolvlm_fast._C is built, the CUDA kernel (smolvlm_fast.ops.cuda.paged_attention): impl "cuda"
  baseline  gather the pages into a dense [B, Hkv, ctx, Dh] (k_cache[block_tables]) then
            F.scaled_dot_product_attention(enable_gqa=True): what PyTorch alone does with a paged cache
  metric    GB/s of K/V read = B * ctx * Hkv * Dh * 2 (K and V) * 2 bytes / time; q and out are ignored
  copy      torch's copy_ of a 1 GiB tensor, GB/s = 2 * bytes (read + write) / time, measured in the same run;
            each case gets a second row, "<case>/vs-copy", whose ratio is our fraction of that bandwidth
Times are CUDA-event medians (triton.testing.do_bench, L2 flushed before every call, so the K/V come from HBM),
launcher overhead included; max_seq_len is passed, so the launch does not sync with the host.

    python bench/bench_paged_attention.py                          # 9/3 heads, Dh 64 (SmolVLM-256M), bf16
    python bench/bench_paged_attention.py --heads 15 5 --batches 1 8 --contexts 4096 --no-save
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
import torch.nn.functional as F

from bench.common import append_row, format_row, make_row

BENCH = "bench_paged_attention"
GB = 1e9


def make_decode(batch, ctx, heads, head_dim, page, dtype, gen):
    """Caches of batch x ctx tokens in shuffled pages, one query per sequence."""
    Hq, Hkv = heads
    pages = -(-ctx // page)
    num_blocks = batch * pages
    k_cache = torch.randn(num_blocks, page, Hkv, head_dim, dtype=dtype, device="cuda", generator=gen)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(batch, pages)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, Hq, head_dim, dtype=dtype, device="cuda", generator=gen)
    return q, k_cache, v_cache, tables, seq_lens


def gather_sdpa(q, k_cache, v_cache, tables, ctx):
    """[B, Hq, Dh] over the gathered cache; all sequences have ctx tokens, so no mask."""
    B, _, Dh = q.shape
    k = k_cache[tables].view(B, -1, *k_cache.shape[2:])[:, :ctx].transpose(1, 2)  # [B, Hkv, ctx, Dh]
    v = v_cache[tables].view(B, -1, *v_cache.shape[2:])[:, :ctx].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]  # [B, Hq, Dh]


def bench_ms(fn, rep_ms):
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="all")


def copy_gbps(rep_ms) -> list[float]:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    samples = [2 * x.numel() / (ms * 1e-3) / GB for ms in bench_ms(lambda: y.copy_(x), rep_ms)]
    del x, y
    torch.cuda.empty_cache()
    return samples


def run_case(args, batch, ctx, copy, gen):
    from smolvlm_fast.kernels.paged_attention import paged_attention

    dtype = getattr(torch, args.dtype)
    Hq, Hkv = args.heads
    q, k_cache, v_cache, tables, seq_lens = make_decode(batch, ctx, args.heads, args.head_dim, args.page, dtype, gen)
    out = torch.empty_like(q)
    ours = lambda: paged_attention(q, k_cache, v_cache, tables, seq_lens, out=out, max_seq_len=ctx,  # noqa: E731
                                   split_size=args.split_size)
    theirs = lambda: gather_sdpa(q, k_cache, v_cache, tables, ctx)  # noqa: E731
    expect = theirs().float()
    err = (ours().float() - expect).abs().max().item() / expect.abs().max().item()
    if not err < 0.03:  # bf16 rounding of the outputs is 0.4%; a wrong block or split is far off
        raise AssertionError(f"b={batch} ctx={ctx}: kernel and gather+SDPA differ by {err:.3g} (relative)")

    kv_bytes = batch * ctx * Hkv * args.head_dim * 2 * k_cache.element_size()
    rate = lambda times: [kv_bytes / (ms * 1e-3) / GB for ms in times]  # noqa: E731
    impls = {"triton": ours}
    from smolvlm_fast.ops import cuda

    if cuda.available():  # the CUDA kernel as a second column, on the same inputs
        impls["cuda"] = lambda: cuda.paged_attention(q, k_cache, v_cache, tables, seq_lens, out=out,  # noqa: E731
                                                     max_seq_len=ctx, split_size=args.split_size)
        err = (impls["cuda"]().float() - expect).abs().max().item() / expect.abs().max().item()
        if not err < 0.03:
            raise AssertionError(f"b={batch} ctx={ctx}: CUDA kernel and gather+SDPA differ by {err:.3g} (relative)")
    base = rate(bench_ms(theirs, args.rep_ms)) if not args.no_baseline else None
    case = f"decode/b{batch}/ctx{ctx}"
    shape = f"B={batch} ctx={ctx} Hq={Hq} Hkv={Hkv} Dh={args.head_dim} page={args.page}"
    rows = []
    for impl, fn in impls.items():
        kw = dict(bench=BENCH, shape=shape, dtype=args.dtype, device="cuda", metric="GB/s",
                  ours=rate(bench_ms(fn, args.rep_ms)), impl=impl)
        rows += [make_row(case=case, baseline="gather+SDPA" if base else None, theirs=base, **kw),
                 make_row(case=f"{case}/vs-copy", baseline="torch copy", theirs=copy, **kw)]
    del q, k_cache, v_cache, tables
    torch.cuda.empty_cache()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("HQ", "HKV"), help="default 9 3 (SmolVLM-256M)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page", type=int, default=16, help="tokens per cache block (default 16, as vLLM)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--split-size", type=int, default=None, help="keys per split (default: the kernel's choice)")
    p.add_argument("--rep-ms", type=int, default=200, help="timed milliseconds per measurement (default 200)")
    p.add_argument("--max-gb", type=float, default=20.0, help="skip cases whose K/V cache is larger (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="measure the kernel only, no gather+SDPA")
    p.add_argument("--no-save", action="store_true", help="print only; append no rows to the results file")
    p.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    p.add_argument("--quick", action="store_true",
                   help="a bring-up run's smoke numbers: batches 1 and 16, contexts 1024 and 4096, 50 ms each")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.rep_ms = [1, 16], [1024, 4096], 50
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{BENCH}: needs a CUDA GPU (the Triton kernel is only timed on one); skipped", file=sys.stderr)
        return
    from bench.common import device_name

    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    copy = copy_gbps(args.rep_ms)
    print(f"# {device_name('cuda')}, {args.dtype}, heads {args.heads[0]}/{args.heads[1]}, head_dim {args.head_dim}, "
          f"page {args.page}; torch copy {sorted(copy)[len(copy) // 2]:,.0f} GB/s", file=sys.stderr)
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    for batch in args.batches:
        for ctx in args.contexts:
            cache_gb = batch * ctx * args.heads[1] * args.head_dim * 2 * elem / GB
            if cache_gb > args.max_gb:
                print(f"decode/b{batch}/ctx{ctx}: {cache_gb:.1f} GB of K/V > --max-gb, skipped", file=sys.stderr)
                continue
            for row in run_case(args, batch, ctx, copy, gen):
                print(f"{row['impl']:<7}" + format_row(row))
                if not args.no_save:
                    append_row(BENCH, row, args.results_dir)


if __name__ == "__main__":
    main()
