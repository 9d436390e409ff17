"""The pinned autotuning configs (SMOLVLM_FAST_TRITON_CONFIGS=pinned, kernels/tuning.py) that the GPU bring-up's
test steps run: one config per kernel (per size class where a kernel prunes by it), each a member of the kernel's
full space, so the bring-up tests configs the autotuner may pick. The spaces are built as on a GPU (the
interpreter's own one-config spaces put aside)."""
from __future__ import annotations

import pytest

from smolvlm_fast.kernels import int4_gemm, paged_attention, patch_embed, rope_attention, tuning

SPACES = {"paged_attention": (paged_attention, paged_attention.configs, 1),
          "int4_gemm": (int4_gemm, int4_gemm.configs, 1),
          "patch_embed": (patch_embed, patch_embed.gemm_configs, 1),
          "dwsep_patch_embed": (patch_embed, patch_embed.dwsep_configs, 1),
          "rope_attention": (rope_attention, rope_attention.configs, 2)}


def described(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


@pytest.mark.parametrize("name", list(SPACES))
def test_pinned_configs_are_in_the_full_space(name, monkeypatch):
    module, configs, count = SPACES[name]
    monkeypatch.setattr(module, "INTERPRET", False)
    monkeypatch.delenv(tuning.CONFIGS_ENV, raising=False)
    full = {described(c) for c in configs()}
    monkeypatch.setenv(tuning.CONFIGS_ENV, "pinned")
    pinned = [described(c) for c in configs()]
    assert len(pinned) == count and set(pinned) <= full, f"{name}: {pinned} not all in its space of {len(full)}"
    assert len(full) > count  # the full space is a real search


def test_rope_attention_pins_one_config_per_size_class(monkeypatch):
    """Its prune keeps the 16-row configs for decode-sized work and the others for the rest: one of each."""
    monkeypatch.setattr(rope_attention, "INTERPRET", False)
    monkeypatch.setenv(tuning.CONFIGS_ENV, "pinned")
    pinned = rope_attention.configs()
    for size_class in (0, 1):
        assert len(rope_attention.prune_configs(pinned, {"size_class": size_class})) == 1


def test_a_bad_value_is_an_error(monkeypatch):
    monkeypatch.setenv(tuning.CONFIGS_ENV, "fast")
    with pytest.raises(ValueError, match="SMOLVLM_FAST_TRITON_CONFIGS='fast'"):
        tuning.space([1, 2], [1])
