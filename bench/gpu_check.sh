#!/usr/bin/env bash
# On a machine with a CUDA GPU and nvcc: build smolvlm_fast._C for this GPU, run every `gpu` test, the CUDA kernel
# tests under compute-sanitizer (memcheck and racecheck), and the kernel benchmarks. Each step's log goes to
# bench/results/gpu_check_<step>.log, the benchmarks' rows to bench/results/<bench>.jsonl. Exits 1 if a step failed.
#
#   bash bench/gpu_check.sh                  # everything
#   SKIP_BENCH=1 bash bench/gpu_check.sh     # build and tests only
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#
# Offline machines: the build uses the installed setuptools and pybind11 (--no-build-isolation --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=bench/results
mkdir -p "$OUT"
status=0

step() {  # step NAME COMMAND...: run it, log to $OUT/gpu_check_NAME.log, show the log's tail
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    if "$@" >"$OUT/gpu_check_$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED ($((SECONDS - start)) s; log: $OUT/gpu_check_$name.log)"
        status=1
    fi
    tail -n 5 "$OUT/gpu_check_$name.log" | sed 's/^/   | /'
}

step build env SMOLVLM_FAST_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
step env "$PY" -m smolvlm_fast.env
step test_cuda_build "$PY" -m pytest -q tests/test_cuda_build.py tests/test_env.py
step pytest_gpu "$PY" -m pytest -q -ra -m gpu tests/

# compute-sanitizer over the small case of every CUDA kernel (tests/test_cuda_kernels.py -k small), checking only
# our kernels (their mangled names hold the namespace smolvlm_cuda); without PyTorch's caching allocator every tensor
# is its own allocation, so memcheck sees an access past a tensor's end.
SANITIZE=(compute-sanitizer --error-exitcode 1 --kernel-name regex:smolvlm_cuda)
TESTS=(-m pytest -q -p no:cacheprovider -m gpu -k small tests/test_cuda_kernels.py)
if command -v compute-sanitizer >/dev/null 2>&1; then
    step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZE[@]}" --tool memcheck "$PY" "${TESTS[@]}"
    step racecheck "${SANITIZE[@]}" --tool racecheck "$PY" "${TESTS[@]}"
    step synccheck "${SANITIZE[@]}" --tool synccheck "$PY" "${TESTS[@]}"
else
    echo "== compute-sanitizer not found: memcheck / racecheck skipped"
    status=1
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    step bench_attention "$PY" bench/bench_attention.py              # rope_attention, cross_attention (Triton)
    step bench_paged_attention "$PY" bench/bench_paged_attention.py  # Triton and CUDA columns
    step bench_small_ops "$PY" bench/bench_small_ops.py              # write_kv_cache: Triton and CUDA columns
    for bench in bench/bench_int4_gemm.py bench/bench_patch_embed.py; do
        [ -f "$bench" ] && step "$(basename "$bench" .py)" "$PY" "$bench"
    done
    # The CUDA kernels whose benchmarks time only Triton: one line each, CUDA against Triton on the same inputs.
    step cuda_vs_triton "$PY" - <<'EOF'
import numpy as np, torch, triton.testing
from smolvlm_fast.formats import int4 as quant
from smolvlm_fast.models.int4_linear import Int4Tensors
from smolvlm_fast.ops import cuda
from smolvlm_fast.kernels.int4_gemm import int4_gemm
from smolvlm_fast.kernels.patch_embed import patch_embed
from smolvlm_fast.kernels.cross_attention import cross_attention

def ms(fn):
    return triton.testing.do_bench(fn, return_mode="median")

print(f"# {torch.cuda.get_device_name()}, bf16, median ms (do_bench, L2 flushed)")
for M, N, K in [(1, 960, 576), (1, 1536 * 2, 576), (1, 576, 1536), (1, 49152, 576), (16, 960, 576), (16, 576, 1536)]:
    w = Int4Tensors.from_numpy(quant.quantize_int4(np.random.randn(N, K).astype(np.float32), group_size=64), "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    c, t = ms(lambda: cuda.int4_gemm(x, w)), ms(lambda: int4_gemm(x, w))
    gbps = (w.qweight.numel() + 4 * w.scales.numel()) / (c * 1e-3) / 1e9
    print(f"int4_gemm M={M:<3} N={N:<6} K={K:<5} cuda {c:.4f}  triton {t:.4f}  ratio {t / c:.2f}x  cuda {gbps:.0f} GB/s")
pixels = torch.randn(13, 3, 512, 512, device="cuda", dtype=torch.bfloat16)
weight = torch.randn(768, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
pos, ids = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16), None
c, t = ms(lambda: cuda.patch_embed(pixels, weight, None, pos, ids)), ms(lambda: patch_embed(pixels, weight, None, pos, ids))
print(f"patch_embed 13x512x512 P16 D768 cuda {c:.4f}  triton {t:.4f}  ratio {t / c:.2f}x  "
      f"cuda {2 * 13 * 1024 * 768 * 768 / (c * 1e-3) / 1e12:.0f} TFLOP/s")
for B, T in [(1, 64), (8, 1088), (32, 1088)]:
    q = torch.randn(B, 1, 9, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, 3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c, t = ms(lambda: cuda.cross_attention(q, k, v)), ms(lambda: cross_attention(q, k, v))
    print(f"cross_attention B={B:<2} T={T:<5} cuda {c:.4f}  triton {t:.4f}  ratio {t / c:.2f}x  "
          f"cuda {2 * k.numel() * 2 / (c * 1e-3) / 1e9:.0f} GB/s")
EOF
    step bench_e2e "$PY" bench/bench_e2e.py  # both scenarios, bf16 on CUDA, against transformers in the same run
fi
exit $status
