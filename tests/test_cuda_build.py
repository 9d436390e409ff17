"""smolvlm_fast._C builds from csrc/cuda/ with nvcc and exposes every entry point; no GPU needed.

The module `pip install -e .` built in place (setup.py builds it when nvcc is found; .ci/run requires it) is checked as
it is when it was built from the current csrc/cuda/ (its source_hash says so). Otherwise the extension is built here,
with setup.py, into build/test_cuda_build/<hash>/ (reused while csrc/cuda/ does not change). Skipped without nvcc.
The entry points' argument checks run before any CUDA call, so they are tested here too; the numbers are
tests/test_cuda_kernels.py's (marked gpu).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("int4_gemm", "paged_attention", "cross_attention", "write_kv_cache", "patch_embed",
                "dwsep_patch_embed")


def load(path: Path, name: str = "smolvlm_fast._C"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = load(REPO / "setup.py", "smolvlm_fast_setup")  # its helpers (setup() runs only as __main__)
source_hash, find_nvcc = SETUP.cuda_source_hash, SETUP.find_nvcc


def build(out: Path) -> Path:
    """setup.py build_ext for _C alone into a scratch folder, then moved to `out` (concurrent runs don't collide)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix="building-"))
    env = dict(os.environ, SMOLVLM_FAST_BUILD_CPU="0", SMOLVLM_FAST_BUILD_CUDA="1")
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(scratch / "lib"),
                          "--build-temp", str(scratch / "tmp")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
    if run.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        pytest.fail(f"building smolvlm_fast._C failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    try:
        scratch.rename(out)
    except OSError:  # another run finished first
        shutil.rmtree(scratch, ignore_errors=True)
    return next(out.glob("lib/smolvlm_fast/_C*.so"))


@pytest.fixture(scope="module")
def cuda_ext():
    if find_nvcc() is None:
        pytest.skip("nvcc not found: smolvlm_fast._C cannot be built here")
    current = source_hash()
    try:
        from smolvlm_fast import _C
        if _C.source_hash == current:
            return _C
    except ImportError:
        pass
    out = REPO / "build" / "test_cuda_build" / current
    built = list(out.glob("lib/smolvlm_fast/_C*.so"))
    return load(built[0] if built else build(out))


def test_exposes_every_entry_point(cuda_ext):
    for name in ENTRY_POINTS:
        assert callable(getattr(cuda_ext, name)), name
        assert getattr(cuda_ext, name).__doc__, name
    assert cuda_ext.source_hash == source_hash()
    assert all(a.startswith("sm_") for a in cuda_ext.archs.split(";")), cuda_ext.archs
    assert cuda_ext.int4_gemm_max_m == 16 and cuda_ext.attention_max_split == 512
    assert [cuda_ext.decode_attention_head_dim_supported(d) for d in (64, 72, 80, 96, 128, 256)] == \
        [True, False, True, True, True, False]


def test_runtime_queries_work_without_a_gpu(cuda_ext):
    assert cuda_ext.cuda_runtime_version() >= 12000
    assert cuda_ext.cuda_driver_version() >= 0
    assert cuda_ext.device_count() >= 0


INT4 = dict(y=256, x=256, qweight=256, scales=256, mins=0, bias=0, workspace=0, M=1, N=64, K=576, group_size=64,
            stride_y=64, stride_x=576, stride_q=288, stride_s=9, dtype=1, bias_dtype=1, splits=1, device=0, stream=0)
PAGED = dict(out=256, q=256, k_cache=256, v_cache=256, block_tables=256, seq_lens=256, query_start_loc=0, cos_sin=0,
             positions=0, partial_acc=0, partial_max=0, partial_sum=0, num_tokens=2, num_seqs=2, num_q_heads=9,
             num_kv_heads=3, head_dim=64, block_size=16, stride_qt=576, stride_qh=64, stride_ot=576, stride_oh=64,
             stride_kb=3072, stride_ks=192, stride_kh=64, stride_vb=3072, stride_vs=192, stride_vh=64, stride_bt=4,
             stride_cs=0, rotary_dim=0, cos_sin_dtype=0, positions_int64=False, scale=0.125, split_size=512,
             num_splits=1, dtype=2, device=0, stream=0)
CROSS = dict(out=256, q=256, k=256, v=256, kv_lens=0, partial_acc=0, partial_max=0, partial_sum=0, batch=2,
             queries_per_batch=1, kv_tokens=64, num_q_heads=9, num_kv_heads=3, head_dim=64, stride_qt=576,
             stride_qh=64, stride_ot=576, stride_oh=64, stride_kb=12288, stride_kt=192, stride_kh=64,
             stride_vb=12288, stride_vt=192, stride_vh=64, kv_lens_int64=False, scale=0.125, split_size=512,
             num_splits=1, dtype=1, device=0, stream=0)
KV = dict(k=256, v=256, k_cache=256, v_cache=256, slot_mapping=256, cos_sin=0, positions=0, num_tokens=1,
          num_heads=3, head_dim=64, block_size=16, num_blocks=8, stride_kt=192, stride_kh=64, stride_vt=192,
          stride_vh=64, stride_kcb=3072, stride_kcs=192, stride_kch=64, stride_vcb=3072, stride_vcs=192,
          stride_vch=64, stride_cs=0, rotary_dim=0, slots_int64=False, positions_int64=False, cos_sin_dtype=0,
          dtype=2, device=0, stream=0)
PATCH = dict(out=256, pixels=256, weight=256, bias=0, pos_embed=0, position_ids=0, batch=1, channels=3, patches_h=2,
             patches_w=2, patch=16, dim=64, stride_pb=3072, stride_pc=1024, stride_ph=32, stride_pw=1, stride_pos=0,
             stride_ib=0, stride_in=0, ids_int64=False, dtype=1, bias_dtype=1, pos_dtype=1, out_dtype=1, device=0,
             stream=0)
DWSEP = dict(out=256, pixels=256, dw_weight=256, dw_bias=0, pw_weight=256, pw_bias=0, pos_embed=0, position_ids=0,
             batch=1, channels=3, patches_h=2, patches_w=2, patch=16, dim=64, stride_pb=3072, stride_pc=1024,
             stride_ph=32, stride_pw=1, stride_pos=0, stride_ib=0, stride_in=0, ids_int64=False, dtype=0,
             bias_dtype=0, pos_dtype=0, out_dtype=0, device=0, stream=0)

ARGS = {"paged_attention": "PagedAttentionArgs", "cross_attention": "CrossAttentionArgs",
        "write_kv_cache": "WriteKvCacheArgs", "patch_embed": "PatchEmbedArgs",
        "dwsep_patch_embed": "DwsepPatchEmbedArgs"}  # the argument struct each entry point takes


def call(module, name: str, fields: dict):
    """_C.<name> with these arguments: by keyword, or as its argument struct _C.<ARGS[name]>(**fields)."""
    if name in ARGS:
        return getattr(module, name)(getattr(module, ARGS[name])(**fields))
    return getattr(module, name)(**fields)


BAD_CALLS = [
    ("int4_gemm", INT4, dict(M=17), "1 to 16 rows"),
    ("int4_gemm", INT4, dict(dtype=0), "fp16 or bf16"),
    ("int4_gemm", INT4, dict(K=560), "multiple of 32"),
    ("int4_gemm", INT4, dict(group_size=48), "group_size"),
    ("int4_gemm", INT4, dict(qweight=264), "16-byte aligned"),
    ("int4_gemm", INT4, dict(stride_x=577), "16-byte aligned rows"),
    ("int4_gemm", INT4, dict(splits=3), "workspace"),
    ("int4_gemm", INT4, dict(x=0), "required"),
    ("paged_attention", PAGED, dict(head_dim=72), "head_dim"),
    ("paged_attention", PAGED, dict(num_q_heads=8), "multiple of the KV heads"),
    ("paged_attention", PAGED, dict(num_tokens=3), "one query per sequence"),
    ("paged_attention", PAGED, dict(split_size=513), "split_size"),
    ("paged_attention", PAGED, dict(num_splits=2), "workspaces"),
    ("paged_attention", PAGED, dict(stride_ks=196), "16-byte aligned"),
    ("paged_attention", PAGED, dict(cos_sin=256, positions=256, rotary_dim=63, cos_sin_dtype=0), "rotary_dim"),
    ("paged_attention", PAGED, dict(dtype=5), "dtype code"),
    ("cross_attention", CROSS, dict(head_dim=256), "head_dim"),
    ("cross_attention", CROSS, dict(num_splits=2, split_size=512), "without an empty split"),
    ("cross_attention", CROSS, dict(k=264), "16-byte aligned"),
    ("write_kv_cache", KV, dict(slot_mapping=0), "required"),
    ("write_kv_cache", KV, dict(cos_sin=256, positions=0, rotary_dim=64), "positions"),
    ("write_kv_cache", KV, dict(cos_sin=256, positions=256, rotary_dim=66), "rotary_dim"),
    ("patch_embed", PATCH, dict(dtype=0), "fp16 or bf16"),
    ("patch_embed", PATCH, dict(weight=0), "weight is required"),
    ("patch_embed", PATCH, dict(patch=0), "positive"),
    ("dwsep_patch_embed", DWSEP, dict(channels=513), "512 channels"),
    ("dwsep_patch_embed", DWSEP, dict(pw_weight=0), "required"),
]


@pytest.mark.parametrize("name, base, change, message", BAD_CALLS,
                         ids=[f"{c[0]}-{'-'.join(c[2])}" for c in BAD_CALLS])
def test_entry_points_reject_bad_arguments(cuda_ext, name, base, change, message):
    """ValueError with a message naming the problem, before any CUDA call (the pointers are never dereferenced)."""
    with pytest.raises(ValueError, match=message):
        call(cuda_ext, name, {**base, **change})


@pytest.mark.parametrize("name, base", [("paged_attention", PAGED), ("cross_attention", CROSS),
                                        ("write_kv_cache", KV), ("patch_embed", PATCH), ("dwsep_patch_embed", DWSEP)])
def test_argument_structs_take_every_field_by_keyword(cuda_ext, name, base):
    struct = getattr(cuda_ext, ARGS[name])
    args = struct(**base)
    assert {field: getattr(args, field) for field in base} == base
    with pytest.raises(TypeError, match="fields by keyword"):
        struct(**{k: v for k, v in base.items() if k != "stream"})
    with pytest.raises(AttributeError):
        struct(**base, not_a_field=0)


@pytest.mark.parametrize("name, base", [("int4_gemm", INT4), ("paged_attention", PAGED), ("cross_attention", CROSS),
                                        ("write_kv_cache", KV), ("patch_embed", PATCH), ("dwsep_patch_embed", DWSEP)])
def test_valid_call_without_a_gpu_is_a_runtime_error(cuda_ext, name, base):
    """Arguments that pass the checks reach CUDA, which has no device here: a RuntimeError, not a crash."""
    if cuda_ext.device_count() > 0:
        pytest.skip("a GPU is present (tests/test_cuda_kernels.py runs the kernels)")
    with pytest.raises(RuntimeError):
        call(cuda_ext, name, base)
