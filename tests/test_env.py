"""`python -m smolvlm_fast.env`: versions, GPU, extensions, and the implementation each op takes on a CUDA tensor."""
import subprocess
import sys

from smolvlm_fast import env, ops


def run_env(prelude: str = "") -> str:
    code = f"{prelude}\nimport runpy\nrunpy.run_module('smolvlm_fast.env', run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def field(text: str, name: str) -> str:
    """The value printed after `name` at the start of a line."""
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    assert lines, f"no {name!r} line in:\n{text}"
    return lines[0][len(name):].strip()


def test_prints_versions_gpu_and_extensions():
    import numpy
    import torch

    out = run_env()
    assert field(out, "smolvlm_fast").startswith("0.")
    assert field(out, "numpy") == numpy.__version__
    assert field(out, "torch").startswith(torch.__version__)
    for name in ("python", "triton", "nvcc", "smolvlm_fast._cpu", "smolvlm_fast._C"):
        field(out, name)
    assert "GPU" in out
    if not torch.cuda.is_available():
        assert field(out, "GPU") == "none visible"


def test_names_the_implementation_of_every_op():
    """One line per op: the CUDA kernel where _C has it, else Triton, else the reference (the registry's order),
    why any of the three is left out, then, under it, what each kernel covers, read from the same registry the ops
    dispatch with."""
    report = env.report()
    op_lines = [line for line in report if line.startswith("  ") and not line.startswith("   ")]
    lines = {line.split()[0]: line.split() for line in op_lines}
    assert set(lines) == set(ops.OPS)
    for name in ops.OPS:
        have = ops.available(name)
        expect = "cuda" if "cuda" in have else "triton" if "triton" in have else "reference"
        assert lines[name][1] == expect, lines[name]
        line = " ".join(lines[name][2:])
        assert line.split("]")[0] + "]" == f"[{', '.join(have)}]"
        for impl in set(ops.ORDER) - set(have):
            assert f"{impl}: " in line, line  # why it is left out
        at = report.index(next(line for line in op_lines if line.split()[0] == name))
        scopes = [(i.name, i.scope) for i in ops.implementations(name) if i.name != "reference"]
        assert [line.split(None, 1) for line in report[at + 1:at + 1 + len(scopes)]] == [list(s) for s in scopes]


def test_extension_lines_match_what_imports():
    out = run_env()
    try:
        from smolvlm_fast import _C
    except ImportError:
        _C = None
    if _C is None:
        assert field(out, "smolvlm_fast._C").startswith("not built")
    else:
        assert field(out, "smolvlm_fast._C").startswith(f"built (archs: {_C.archs}")


def test_works_without_torch():
    out = run_env('import sys\nsys.modules["torch"] = None  # import torch raises ImportError')
    assert field(out, "torch").startswith("not installed")
    assert "ops on a CUDA tensor" not in out
    field(out, "smolvlm_fast._C")


def test_shows_the_kernel_order_and_who_chose_it():
    out = run_env('import os\nos.environ["SMOLVLM_FAST_KERNELS"] = "reference"')
    assert field(out, "kernel order").startswith("reference (SMOLVLM_FAST_KERNELS=reference")
    ops_lines = [line.split() for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert ops_lines and all(line[1] == "reference" for line in ops_lines), ops_lines
    assert "not in the kernel order" in out or "cuda" not in out.split("ops on a CUDA tensor")[1]
    bad = run_env('import os\nos.environ["SMOLVLM_FAST_KERNELS"] = "cuda,fast"')
    assert "give one or more of cuda, triton, reference" in field(bad, "kernel order")
