"""The C++ CPU kernels (smolvlm_fast._cpu) at decode (one row of x) on SmolLM2-135M's shapes, against NumPy's
float32 matmul (OpenBLAS) on the same shapes, in GB/s of weight read and in time per product.

Shapes (SmolLM2-135M-Instruct, Q4_1 GGUF as shipped: int4 asymmetric, group 32; the tied LM head Q8_0):
qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536 (int4), lm_head 49152x576 (q8).
A decode step reads each layer's weights once, so each case cycles through 30 distinct copies (one per layer;
the LM head is one 30 MB matrix) and the weights come from L3 / memory as they would, not from L2.
`decoder_token` runs one token's products in order (30 layers x qkv, o, gate_up, down, then the LM head) through
cpu_linear.linear, the call the NumPy model makes: its time bounds the decode rate from the matrix products alone.
GB/s = bytes of weights (packed data + scales + mins) / median time. Baseline: x @ W.T with W float32 (4 bytes
per weight), its own GB/s. Ours run first, then the baseline, so neither's idle threads spin during the other.
Rows go to bench/results/bench_cpu_gemv.jsonl (fields in bench/README.md, "Result rows").

    python bench/bench_cpu_gemv.py                  # every case; about a minute on 2 cores
    python bench/bench_cpu_gemv.py --cases qkv lm_head --repeats 50 --no-save
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np

from bench.common import append_row, format_row, make_row, quiet_samples
from smolvlm_fast.cpu import linear as cpu_linear
from smolvlm_fast.formats import int4 as int4_format

BENCH = "bench_cpu_gemv"
BASELINE = "numpy float32 matmul"
LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
INT4_DTYPE, Q8_DTYPE = "int4 asym g32 (Q4_1)", "int8 g32 (Q8_0)"
RNG = np.random.default_rng(0)


def int4_weight(N: int, K: int) -> int4_format.Int4Weight:
    """Random data in the Q4_1 layout (quantizing real floats would take long and change nothing here)."""
    return int4_format.Int4Weight(N, K, 32, False, RNG.integers(0, 256, (N, K // 2), dtype=np.uint8),
                            (RNG.random((N, K // 32), dtype=np.float32) * 0.01).astype(np.float16),
                            (RNG.random((N, K // 32), dtype=np.float32) * -0.1).astype(np.float16))


def q8_weight(N: int, K: int) -> int4_format.Q8Weight:
    return int4_format.Q8Weight(N, K, RNG.integers(-127, 128, (N, K), dtype=np.int8),
                          (RNG.random((N, K // 32), dtype=np.float32) * 0.01).astype(np.float16))


def kernel_call(w, x: np.ndarray) -> Callable[[], object]:
    """The product exactly as linear() makes it for one row, minus linear()'s few Python steps."""
    out = np.empty((1, w.N), np.float32)
    if isinstance(w, int4_format.Int4Weight):
        return lambda: cpu_linear._cpu.int4_gemm(x, w.qweight, w.scales, w.mins, w.group_size, out)
    return lambda: cpu_linear._cpu.q8_gemm(x, w.q, w.scales, out)


def measure(fn, calls, args) -> list[float] | None:
    return quiet_samples(fn, calls=calls, repeats=args.repeats, warmup=args.warmup,
                         max_contention=args.max_contention)


def run_case(name: str, args) -> list[dict]:
    N, K = SHAPES[name]
    copies = 1 if name == "lm_head" else LAYERS
    make = q8_weight if name == "lm_head" else int4_weight
    ws = [make(N, K) for _ in range(copies)]
    floats = [int4_format.dequantize(w) for w in ws]
    x = RNG.standard_normal((1, K), dtype=np.float32)
    calls = [kernel_call(w, x) for w in ws]

    def ours():
        for call in calls:
            call()

    def theirs():
        for f in floats:
            x @ f.T

    mine = measure(ours, max(1, 30 // copies), args)
    time.sleep(0.2)  # let our idle workers go to sleep before the baseline runs
    base = measure(theirs, max(1, 30 // copies), args)
    if mine is None or base is None:
        print(f"{name}: the machine was too busy; no rows", file=sys.stderr)
        return []
    mine = [t / copies for t in mine]
    base = [t / copies for t in base]
    shape = f"M=1 N={N} K={K}"
    dtype = Q8_DTYPE if name == "lm_head" else INT4_DTYPE
    return [row(f"gemv/{name}", shape, dtype, "GB/s", [ws[0].nbytes / t / 1e9 for t in mine],
                [floats[0].nbytes / t / 1e9 for t in base]),
            row(f"gemv/{name}", shape, dtype, "ms", [t * 1e3 for t in mine], [t * 1e3 for t in base])]


def run_token(args) -> list[dict]:
    """One decode token's products, in order, through cpu_linear.linear."""
    layers = [{n: int4_weight(*SHAPES[n]) for n in ("qkv", "o", "gate_up", "down")} for _ in range(LAYERS)]
    head = q8_weight(*SHAPES["lm_head"])
    x576 = RNG.standard_normal((1, 576), dtype=np.float32)
    x1536 = RNG.standard_normal((1, 1536), dtype=np.float32)

    def token(weights, lm_head, linear):
        for layer in weights:
            linear(x576, layer["qkv"]), linear(x576, layer["o"]), linear(x576, layer["gate_up"])
            linear(x1536, layer["down"])
        linear(x576, lm_head)

    nbytes = sum(w.nbytes for layer in layers for w in layer.values()) + head.nbytes
    mine = measure(lambda: token(layers, head, cpu_linear.linear), 1, args)
    floats = [{n: int4_format.dequantize(w) for n, w in layer.items()} for layer in layers]
    float_head = int4_format.dequantize(head)
    fbytes = sum(w.nbytes for layer in floats for w in layer.values()) + float_head.nbytes
    time.sleep(0.2)
    base = measure(lambda: token(floats, float_head, lambda x, w: x @ w.T), 1, args)
    if mine is None or base is None:
        print("decoder_token: the machine was too busy; no rows", file=sys.stderr)
        return []
    shape = f"M=1 layers={LAYERS} (qkv, o, gate_up, down) + lm_head, {nbytes / 1e6:.1f} MB"
    dtype = f"{INT4_DTYPE}, lm_head {Q8_DTYPE}"
    return [row("gemv/decoder_token", shape, dtype, "GB/s", [nbytes / t / 1e9 for t in mine],
                [fbytes / t / 1e9 for t in base]),
            row("gemv/decoder_token", shape, dtype, "ms", [t * 1e3 for t in mine], [t * 1e3 for t in base])]


def row(case, shape, dtype, metric, ours, theirs) -> dict:
    return make_row(bench=BENCH, case=case, shape=shape, dtype=dtype, device="cpu", metric=metric, ours=ours,
                    baseline=BASELINE, theirs=theirs,
                    impl=f"smolvlm_fast._cpu ({cpu_linear._cpu.simd}, {cpu_linear.get_num_threads()} threads)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=[*SHAPES, "decoder_token"], default=[*SHAPES, "decoder_token"])
    p.add_argument("--repeats", type=int, default=30, help="timed samples per implementation (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed samples first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: the usable cores)")
    p.add_argument("--no-save", action="store_true", help="print only; append no rows to the results file")
    p.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    p.add_argument("--max-contention", type=float, default=0.10,
                   help="largest share of the CPU other processes may use during a measurement (default 0.10)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not cpu_linear.cpu_kernels_available():
        raise SystemExit("smolvlm_fast._cpu is not built: pip install -e . (with a C++ compiler)")
    if args.threads:
        cpu_linear.set_num_threads(args.threads)
    for case in args.cases:
        for r in run_token(args) if case == "decoder_token" else run_case(case, args):
            print(format_row(r), flush=True)
            if not args.no_save:
                append_row(BENCH, r, args.results_dir)


if __name__ == "__main__":
    main()
