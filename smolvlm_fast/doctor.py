"""`smolvlm-fast doctor`: every kernel this machine would run, checked against its reference and timed, as a short
table to attach to a bug report. Exits 1 when an implementation that calls would get (the first in the kernel order
for its op) fails.

On a GPU: each op's implementations (CUDA, Triton) on a small bfloat16 probe, against the PyTorch reference under the
self-check's rule (ops/selfcheck.py: within twice the plain reference's error, plus one rounding). On the CPU: the
C++ kernels of smolvlm_fast._cpu (GEMMs in float32, bf16, int4 and q8, the paged attention, the small ops) against
float64 NumPy, within 1e-5 relative as tests/test_cpu_*.py hold them; and any op implementation that runs on the CPU
besides the reference.
"""
from __future__ import annotations

import time

import numpy as np

CPU_TOLERANCE = 1e-5  # relative to max |exact|: the C++ kernels sum in float32, as NumPy's matmul (tests/test_cpu_*)


def _timed(call, repeat: int, sync=lambda: None) -> float:
    """Seconds per call over `repeat` calls after one warm-up."""
    call()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    sync()
    return (time.perf_counter() - start) / max(repeat, 1)


def _row(op: str, impl: str, dtype: str, chosen: bool, result: str, err, limit, seconds) -> dict:
    return {"op": op, "impl": impl + ("*" if chosen else ""), "dtype": dtype, "result": result,
            "max error": "-" if err is None else f"{err:.2e}", "limit": "-" if limit is None else f"{limit:.2e}",
            "time/call": "-" if seconds is None else f"{seconds * 1e6:.1f} us"}


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
    return lines + ["  ".join(r[k].ljust(w) for k, w in widths.items()) for r in rows]


# ---------------------------------------------------------------- the C++ CPU kernels

def _gemm_inputs(rng, M=5, N=72, K=576):
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.05)
    return x, w


def _f32_gemm(rng):
    from .cpu.native import _cpu

    x, w = _gemm_inputs(rng)
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    return lambda: (_cpu.f32_gemm(x, w, out), out)[1], x.astype(np.float64) @ w.astype(np.float64).T


def _bf16_gemm(rng):
    from .cpu.linear import linear
    from .formats.bf16 import dequantize_bf16, pack_bf16, round_bf16

    x, w = _gemm_inputs(rng)
    packed = pack_bf16(w)
    exact = round_bf16(x).astype(np.float64) @ dequantize_bf16(packed).astype(np.float64).T
    return lambda: linear(x, packed), exact


def _quantized_gemm(rng, q8: bool):
    from .cpu.linear import linear
    from .formats import int4

    x, w = _gemm_inputs(rng)
    if q8:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize
        weight = int4.q8_from_gguf(quantize(w, GGMLQuantizationType.Q8_0))
    else:
        weight = int4.quantize_int4(w, group_size=64)
    return lambda: linear(x, weight), x.astype(np.float64) @ int4.dequantize(weight).astype(np.float64).T


def _layer_norm(rng):
    from .cpu import ops as cpu_ops

    x, w, b = (rng.standard_normal(s, dtype=np.float32) for s in ((6, 768), (768,), (768,)))
    return lambda: cpu_ops.layer_norm(x, w, b, 1e-6), cpu_ops.layer_norm_numpy(x.astype(np.float64), w, b, 1e-6)


def _gelu_tanh(rng):
    from .cpu import ops as cpu_ops

    x = rng.standard_normal((6, 1536), dtype=np.float32) * np.float32(3)
    return lambda: cpu_ops.gelu_tanh(x), cpu_ops.gelu_tanh_numpy(x.astype(np.float64))


def _paged_inputs(rng, q_lens, seq_lens, Hq=9, Hkv=3, Dh=64, block_size=16):
    need = [-(-n // block_size) for n in seq_lens]
    k_cache, v_cache = (rng.standard_normal((sum(need), block_size, Hkv, Dh), dtype=np.float32) for _ in range(2))
    ids, tables = rng.permutation(sum(need)).astype(np.int32), np.zeros((len(seq_lens), max(need)), np.int32)
    for s, n in enumerate(need):
        tables[s, :n] = ids[sum(need[:s]):sum(need[:s]) + n]  # the blocks in a shuffled order
    q = rng.standard_normal((sum(q_lens), Hq, Dh), dtype=np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return q, k_cache, v_cache, tables, np.array(seq_lens, np.int32), qsl


def _attention_exact(q, k_cache, v_cache, tables, lens, qsl, scale):
    """Causal paged attention in float64: query j of sequence s sits at position lens[s] - q_len + j."""
    out = np.zeros(q.shape, np.float64)
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for s, n in enumerate(lens):
        a, b, slots = qsl[s], qsl[s + 1], np.arange(n)
        k, v = (np.repeat(c[tables[s, slots // block_size], slots % block_size].astype(np.float64), group, axis=1)
                for c in (k_cache, v_cache))  # [n, Hq, Dh]
        scores = np.einsum("qhd,khd->hqk", q[a:b].astype(np.float64), k) * scale  # [Hq, q_len, n]
        scores[:, (n - (b - a) + np.arange(b - a))[:, None] < slots[None, :]] = -np.inf
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[a:b] = np.einsum("hqk,khd->qhd", p / p.sum(axis=-1, keepdims=True), v)
    return out


def _paged_attention(rng, decode: bool):
    from .cpu import ops as cpu_ops

    q_lens, seq_lens = ([1, 1, 1], [40, 16, 5]) if decode else ([7, 16], [23, 16])
    q, kc, vc, tables, lens, qsl = _paged_inputs(rng, q_lens, seq_lens)
    scale = q.shape[-1] ** -0.5
    return (lambda: cpu_ops.paged_attention(q, kc, vc, tables, lens, query_start_loc=None if decode else qsl),
            _attention_exact(q, kc, vc, tables, lens, qsl, scale))


# name -> builder(rng) -> (run the kernel, its float64 NumPy reference)
CPU_CHECKS = {
    "f32_gemm": _f32_gemm, "bf16_gemm": _bf16_gemm,
    "int4_gemm": lambda rng: _quantized_gemm(rng, q8=False), "q8_gemm": lambda rng: _quantized_gemm(rng, q8=True),
    "layer_norm": _layer_norm, "gelu_tanh": _gelu_tanh,
    "paged_decode_attention": lambda rng: _paged_attention(rng, decode=True),
    "paged_prefill_attention": lambda rng: _paged_attention(rng, decode=False),
}


def cpu_rows(repeat: int) -> list[dict]:
    rng = np.random.default_rng()
    rows = []
    for name, build in CPU_CHECKS.items():
        try:
            run, exact = build(rng)
            out = np.asarray(run(), dtype=np.float64)
            err = float(np.abs(out - exact).max()) if out.shape == exact.shape else float("inf")
            limit = CPU_TOLERANCE * float(np.abs(exact).max())
            ok = err <= limit  # NaN fails
            rows.append(_row(name, "cpp", "float32", True, "ok" if ok else "FAIL", err, limit, _timed(run, repeat)))
        except Exception as e:  # noqa: BLE001  a kernel that raises is a finding of the report
            rows.append(_row(name, "cpp", "float32", True, f"FAIL {type(e).__name__}: {e}"[:80], None, None, None))
    return rows


# ---------------------------------------------------------------- the op implementations (torch)

def probes(device: str, dtype) -> dict[str, tuple[tuple, dict]]:
    """op -> (args, kwargs): a small call of every op of the kind the model makes (SmolVLM-256M's head shapes: 9
    query heads over 3 KV heads of 64, hidden 576), one each kernel covers (decode for paged attention and int4)."""
    import torch

    from .formats import int4
    from .models.int4_linear import Int4Tensors
    from .ops import reference

    def g(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    D, H, Hkv, Dh = 576, 9, 3, 64
    cos_sin = reference.rope_table(Dh, 64, 10000.0, device=device)
    weight = int4.quantize_int4(np.random.default_rng().standard_normal((96, D), dtype=np.float32), group_size=64)
    return {
        "rms_norm": ((g(4, D), g(D), 1e-6), {}),
        "layer_norm": ((g(4, D), g(D), g(D), 1e-6), {}),
        "silu_and_mul": ((g(4, 2 * D),), {}),
        "gelu_tanh": ((g(4, D),), {}),
        "patch_embed": ((g(2, 3, 32, 48), g(64, 3, 16, 16), g(64), g(10, 64), ints([[0, 1, 2, 3, 4, 5]] * 2)), {}),
        "dwsep_patch_embed": ((g(2, 3, 32, 48), g(3, 1, 16, 16), g(3), g(64, 3), g(64), g(10, 64), None), {}),
        "rope_attention": ((g(2, 24, H, Dh), g(2, 24, Hkv, Dh), g(2, 24, Hkv, Dh)),
                           {"cos_sin": cos_sin, "positions": torch.arange(24, device=device).expand(2, 24)}),
        "write_kv_cache": ((g(5, Hkv, Dh), g(5, Hkv, Dh), g(8, 16, Hkv, Dh), g(8, 16, Hkv, Dh),
                            ints([3, 17, -1, 40, 127])), {"cos_sin": cos_sin, "positions": ints([3, 1, 0, 8, 63])}),
        "paged_attention": ((g(2, H, Dh), g(8, 16, Hkv, Dh), g(8, 16, Hkv, Dh), ints([[0, 1, 2], [3, 4, 5]]),
                             ints([40, 17])), {"cos_sin": cos_sin, "positions": ints([39, 16])}),
        "cross_attention": ((g(2, 1, H, Dh), g(2, 30, Hkv, Dh), g(2, 30, Hkv, Dh)), {"kv_lens": ints([30, 12])}),
        "int4_gemm": ((g(4, D), Int4Tensors.from_numpy(weight, device=device)), {}),
    }


def _fresh(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The probe's tensors copied (write_kv_cache writes into its caches)."""
    def copy(a):
        return a.clone() if hasattr(a, "clone") else a
    return tuple(map(copy, args)), {k: copy(v) for k, v in kwargs.items()}


def op_rows(device: str, dtype, repeat: int) -> list[dict]:
    """Every implementation but the reference that runs on `device`, per op, on its probe; the first in the kernel
    order is the one calls get (marked *)."""
    import torch

    from .ops import registry, selfcheck

    calls = probes(device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for name in registry.OPS:
        args, kwargs = calls[name]
        on_device = [i for i in registry.walk(name, None) if registry._on_its_device(i, args[0])]
        chosen = next((i.name for i in on_device if i.covers(*args, **kwargs)), None)
        for impl in on_device:
            if impl.name != "reference":
                rows.append(_op_row(name, impl, impl.name == chosen, args, kwargs, dtype, repeat, sync))
    return rows


def _op_row(name, impl, chosen, args, kwargs, dtype, repeat, sync) -> dict:
    from .ops import registry, selfcheck

    dtype_name = str(dtype).replace("torch.", "")
    if not impl.covers(*args, **kwargs):
        return _row(name, impl.name, dtype_name, chosen, "does not cover the probe", None, None, None)
    reference = registry.implementations(name)[-1].fn
    try:
        a, kw = _fresh(args, kwargs)
        out = impl.fn(*a, **kw)
        sync()
        err, limit = selfcheck.error(name, out, reference, a, kw)
        seconds = _timed(lambda: impl.fn(*a, **kw), repeat, sync)
    except Exception as e:  # noqa: BLE001  a kernel that raises is a finding of the report
        return _row(name, impl.name, dtype_name, chosen, f"FAIL {type(e).__name__}: {e}"[:80], None, None, None)
    return _row(name, impl.name, dtype_name, chosen, "ok" if err <= limit else "FAIL", err, limit, seconds)


# ---------------------------------------------------------------- the report

def _header(torch) -> list[str]:
    from . import env

    wanted = ("smolvlm_fast", "python", "torch", "triton", "GPU", "smolvlm_fast._cpu", "smolvlm_fast._C",
              "kernel order", "self-check", "_C on GPU", "cpu threads", "cpu bf16 products")
    return [line for line in env.report() if line.startswith(wanted)]


def report(repeat: int = 5) -> tuple[list[str], bool]:
    """(the report's lines, whether every chosen implementation passed)."""
    try:
        import torch
    except ImportError:
        torch = None
    lines = _header(torch)
    rows = []
    from .cpu.native import _cpu
    if _cpu is not None:
        rows += cpu_rows(repeat)
    if torch is not None:
        rows += op_rows("cpu", torch.float32, repeat)  # none but the reference, unless a kernel runs on the CPU
        if torch.cuda.is_available():
            rows += op_rows("cuda", torch.bfloat16, repeat)
    lines += ["", *(_table(rows) or ["no kernel to check (the reference and NumPy code run)"])]
    failed = [r for r in rows if r["impl"].endswith("*") and r["result"].startswith("FAIL")]
    lines.append("")
    lines.append(f"{len(failed)} chosen implementation(s) FAIL: " + ", ".join(f"{r['op']} {r['impl'][:-1]}"
                                                                              for r in failed)
                 if failed else f"all {len(rows)} checks of chosen implementations pass (* = what calls get)"
                 if all(not r["result"].startswith("FAIL") for r in rows) else
                 "the chosen implementations pass (* = what calls get); an implementation not chosen fails")
    return lines, not failed


def main(repeat: int = 5) -> int:
    lines, ok = report(repeat)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
