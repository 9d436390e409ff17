"""Checks shared by the Triton kernel tests (smolvlm_fast/ops/README.md: NaN-poisoned outputs, fp32 within 1e-5
relative)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every tensor the kernels allocate with torch.empty starts as NaN, so an element never written fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def run_into_nan(kernel, like, *args, **kwargs):
    """Call kernel(*args, out=..., **kwargs) with a NaN-filled output shaped like `like`: an element the kernel
    never writes stays NaN and fails the check."""
    out = torch.full_like(like, float("nan"))
    result = kernel(*args, out=out, **kwargs)
    assert result is out
    return out


def assert_matches_fp32(out, expect, nan_means="unwritten, or NaN arithmetic"):
    """out (any device) against the float64 reference expect: no NaN, max error <= 1e-5 x max |expect|."""
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN outputs ({nan_means})"
    err = (out.cpu().double() - expect).abs().max().item()
    assert err <= 1e-5 * expect.abs().max().item(), f"max error {err:.3g}"
