"""The bf16 products of csrc/cpu (smolvlm_fast._cpu.bf16_gemm) on SmolVLM's shapes, in GFLOP/s, against torch's
bf16 matmul (F.linear, oneDNN: AMX or AVX512-BF16 where the CPU has them) on the same shapes in the same run, and
against the cores' peak.

Shapes: SmolVLM-256M's SigLIP encoder (hidden 768, MLP 3072; qkv stacked) at one 512-pixel tile (1,024 patches) and
at HF's 17-tile split (17,408 rows), and the decoder's (SmolLM2-135M: 576 / 1536) at 1,088 prompt rows (a 17-tile
image's tokens) and at 1 and 4 rows. Each kernel this CPU can run is timed (`amx`, `avx512bf16`, `f32`; the
emulated AMX is for tests, not timed). Peak: `bf16_peak_gflops` (a tight loop of independent vdpbf16ps on every
thread) for avx512bf16; for amx, 1,024 FLOP per cycle per core at the CPU's reported clock (the tile unit's
rate, not measured). GFLOP/s = 2 M N K / median time. Ours runs first, then torch, so that neither's idle
threads spin during the other. Rows go to bench/results/bench_bf16_gemm.jsonl (fields in bench/README.md).

    python bench/bench_bf16_gemm.py                      # every case; about a minute on 2 cores
    python bench/bench_bf16_gemm.py --cases vision_fc1 --repeats 10 --no-save
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np

from bench.common import append_row, bench_parser, format_row, make_row, quiet_samples
from smolvlm_fast.cpu import linear as cpu_linear

BENCH = "bench_bf16_gemm"
BASELINE = "torch bf16 F.linear"
# name: (M, N, K)
CASES = {
    "vision_qkv": (1024, 2304, 768), "vision_o": (1024, 768, 768), "vision_fc1": (1024, 3072, 768),
    "vision_fc2": (1024, 768, 3072), "vision17_fc1": (17408, 3072, 768),
    "prefill_qkv": (1088, 960, 576), "prefill_gate_up": (1088, 3072, 576), "prefill_down": (1088, 576, 1536),
    "decode_gate_up": (1, 3072, 576), "decode4_gate_up": (4, 3072, 576),
}
TIMED_ISAS = ("amx", "avx512bf16", "f32")


def cpu_mhz() -> float | None:
    """The clock /proc/cpuinfo reports for the first core (MHz), None where it says none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def peak_gflops(isa: str, threads: int) -> tuple[float | None, str]:
    if isa == "avx512bf16":
        return cpu_linear._cpu.bf16_peak_gflops(20_000_000 // threads), "measured vdpbf16ps loop"
    if isa == "amx" and cpu_mhz():
        return 1024 * threads * cpu_mhz() * 1e-3, "AMX-BF16 1024 FLOP/cycle/core at the reported clock"
    return None, "none"


def run_case(name: str, isas: list[str], args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    M, N, K = CASES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32) * K ** -0.5
    packed = cpu_linear._cpu.bf16_pack(w)
    out = np.empty((M, N), np.float32)
    xt, wt = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
    flop, rows = 2 * M * N * K, []
    repeats = max(3, min(args.repeats, int(2e10 / flop)))  # about 20 GFLOP of samples a case
    calls = max(1, int(2e9 / flop))  # samples of at least ~2 GFLOP: tens of ms
    timing = {"calls": calls, "repeats": repeats, "warmup": args.warmup, "max_contention": args.max_contention}
    theirs = quiet_samples(lambda: F.linear(xt, wt), **timing)
    before = cpu_linear._cpu.bf16_isa()
    try:
        for isa in isas:
            cpu_linear._cpu.bf16_set_isa(isa)
            mine = quiet_samples(lambda: cpu_linear._cpu.bf16_gemm(x, packed, N, K, None, False, False, out), **timing)
            time.sleep(0.2)  # our idle workers go to sleep before torch's turn
            if mine is None or theirs is None:
                print(f"{name} {isa}: the machine was too busy; no row", file=sys.stderr)
                continue
            peak, peak_kind = peak_gflops(isa, cpu_linear.get_num_threads())
            row = make_row(bench=BENCH, case=f"bf16_gemm/{name}", shape=f"M={M} N={N} K={K}", dtype="bfloat16",
                           device="cpu", metric="GFLOP/s", ours=[flop / t * 1e-9 for t in mine], baseline=BASELINE,
                           theirs=[flop / t * 1e-9 for t in theirs],
                           impl=f"smolvlm_fast._cpu {isa} ({cpu_linear.get_num_threads()} threads)")
            row.update(isa=isa, peak_gflops=peak, peak_kind=peak_kind,
                       of_peak=row["median"] / peak if peak else None, torch_threads=torch.get_num_threads())
            rows.append(row)
    finally:
        cpu_linear._cpu.bf16_set_isa(before)
    return rows


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--isa", nargs="+", choices=TIMED_ISAS, default=None,
                   help="kernels to time (default: each one this CPU can run)")
    p.add_argument("--repeats", type=int, default=20, help="most timed calls per implementation (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--max-contention", type=float, default=0.10,
                   help="largest share of the CPU other processes may use during a measurement (default 0.10)")
    args = p.parse_args(argv)
    if not cpu_linear.cpu_kernels_available():
        raise SystemExit("smolvlm_fast._cpu is not built: pip install -e . (with a C++ compiler)")
    import torch

    torch.set_num_threads(cpu_linear.get_num_threads())  # the same cores for both
    before = cpu_linear._cpu.bf16_isa()
    isas = [i for i in (args.isa or TIMED_ISAS) if cpu_linear._cpu.bf16_set_isa(i)]
    cpu_linear._cpu.bf16_set_isa(before)
    print(f"kernels: {', '.join(isas)}; threads {cpu_linear.get_num_threads()}")
    for name in args.cases:
        for row in run_case(name, isas, args):
            line = format_row(row)
            if row["of_peak"]:
                line += f"  {row['of_peak']:.0%} of peak {row['peak_gflops']:,.0f}"
            print(line, flush=True)
            if not args.no_save:
                append_row(BENCH, row, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
