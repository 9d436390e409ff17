"""`smolvlm-fast doctor` on the CPU: the C++ kernels against NumPy in float64, any op implementation that runs on
the CPU against the reference, one table; a planted wrong kernel makes it exit 1."""
import numpy as np
import pytest
import torch

from smolvlm_fast import cli, doctor, ops
from smolvlm_fast.ops import cuda, reference, registry
from smolvlm_fast.ops.registry import Impl, any_call


# each test starts from the default kernel order and leaves it so (conftest.default_kernel_order)
pytestmark = pytest.mark.usefixtures("default_kernel_order")


def rows_of(text: str) -> dict[str, list[str]]:
    """The table's rows by op name (first column), split on runs of two spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[cells[0]] = cells
    return rows


def test_every_cpu_kernel_passes_and_is_timed(capsys):
    pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built")
    assert cli.main(["doctor", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert set(doctor.CPU_CHECKS) <= set(rows)
    for name in doctor.CPU_CHECKS:
        assert rows[name][1:4] == ["cpp*", "float32", "ok"], rows[name]
        assert float(rows[name][4]) <= float(rows[name][5]) and rows[name][6].endswith(" us")
    for name in ("smolvlm_fast._cpu", "smolvlm_fast._C", "GPU", "kernel order", "self-check"):
        assert any(line.startswith(name) for line in out.splitlines()), name


def test_a_wrong_cpu_kernel_fails_the_doctor(monkeypatch, capsys):
    pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built")
    real = doctor.CPU_CHECKS["f32_gemm"]

    def wrong(rng):
        run, exact = real(rng)
        return (lambda: run() * np.float32(1.001)), exact

    monkeypatch.setitem(doctor.CPU_CHECKS, "f32_gemm", wrong)
    assert doctor.main(repeat=1) == 1
    out = capsys.readouterr().out
    assert rows_of(out)["f32_gemm"][3] == "FAIL" and "FAIL: f32_gemm cpp" in out


def test_a_wrong_op_implementation_fails_the_doctor(capsys):
    """An implementation that runs on the CPU (planted; none does in this install) is checked as on a GPU."""
    def wrong(x, weight, eps, residual=None):
        return reference.rms_norm(x, weight, eps, residual) + 1e-3

    with registry.stand_in("rms_norm", Impl("triton", ops.ORDER.index("triton"), None, wrong, any_call)):
        assert doctor.main(repeat=1) == 1
        rows = rows_of(capsys.readouterr().out)
        assert rows["rms_norm"][1:4] == ["triton*", "float32", "FAIL"], rows["rms_norm"]
        registry.use_kernels("reference")  # out of the kernel order: not what calls get, not checked
        assert doctor.main(repeat=1) == 0
        assert "rms_norm" not in rows_of(capsys.readouterr().out)


def test_a_right_op_implementation_passes(capsys):
    with registry.stand_in("layer_norm", Impl("triton", ops.ORDER.index("triton"), None, reference.layer_norm,
                                              any_call)):
        rows = doctor.op_rows("cpu", torch.float32, 1)
    assert [(r["op"], r["impl"], r["result"]) for r in rows] == [("layer_norm", "triton*", "ok")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_probes_are_valid_calls_the_cuda_kernels_cover(dtype):
    """Each probe runs through the reference; a bf16 probe is inside every CUDA kernel's limits, so the doctor on a
    GPU checks the CUDA kernels, not just the fallbacks."""
    calls = doctor.probes("cpu", dtype)
    assert set(calls) == set(ops.OPS)
    for name, (args, kwargs) in calls.items():
        getattr(reference, name)(*args, **kwargs)
        if dtype == torch.bfloat16 and cuda.available() and name in cuda.COVERS:
            assert cuda.COVERS[name](*args, **kwargs), name
