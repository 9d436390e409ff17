"""Shared fixtures: tiny random checkpoints (built once per session with transformers), small test images, and each
test's random seed (tests/conftest_seed.py: SMOLVLM_FAST_TEST_SEED replays a failure's inputs)."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable must be set
# before triton is first imported, which is why it is done here, at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

from tests.conftest_gguf import smollm2_gguf  # noqa: F401  (the real SmolLM2 GGUF, for tests marked slow)
from tests.conftest_seed import (  # noqa: F401  (fixtures and hooks: pytest finds them by name here)
    _seeded_randomness,
    pytest_report_header,
    pytest_runtest_makereport,
    pytest_terminal_summary,
    rng,
    seed,
)
from tests.fixtures import build_tiny_llama, build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory):
    """A SmolVLM v1 (model_type idefics3) checkpoint dir with processor files."""
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_idefics3"), "idefics3")


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory):
    """A SmolVLM2 (model_type smolvlm) checkpoint dir with processor files."""
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_smolvlm"), "smolvlm")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A text-only Llama checkpoint dir with the same tokenizer and a ChatML-style template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def float32_kv_cache(monkeypatch):
    """The numpy model's KV cache in float32 whatever the model (a quantized or bfloat16 one gets float16 by
    default), for tests that compare products to 1e-4; the float16 cache itself is checked in test_cpu_kv16.py."""
    monkeypatch.setenv("SMOLVLM_FAST_KV_DTYPE", "float32")


@pytest.fixture
def default_kernel_order(monkeypatch):
    """The ops' kernel order at its default (no SMOLVLM_FAST_KERNELS, no use_kernels) for the test, and after it."""
    from smolvlm_fast.ops import registry
    monkeypatch.delenv(registry.KERNELS_ENV, raising=False)
    registry.use_kernels(None)
    yield
    registry.use_kernels(None)


def _rng(image_seed: int) -> np.random.Generator:
    return np.random.default_rng(image_seed)


@pytest.fixture(scope="session")
def small_rgb() -> Image.Image:
    """40 wide x 30 high: smaller than one tile, upscaled by the processor."""
    return Image.fromarray(_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="session")
def large_rgb() -> Image.Image:
    """300 wide x 170 high: resized to 192x108, then 192x128 = 2 rows x 3 cols of tiles + the global image."""
    return Image.fromarray(_rng(2).integers(0, 256, (170, 300, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="session")
def grey_image() -> Image.Image:
    return Image.fromarray(_rng(3).integers(0, 256, (50, 80), dtype=np.uint8), "L")


@pytest.fixture(scope="session")
def rgba_image() -> Image.Image:
    """Random colours with alpha varying from 0 (fully transparent) to 255 across the image."""
    rgba = _rng(4).integers(0, 256, (90, 60, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 90 * 60).reshape(90, 60).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="session")
def palette_image() -> Image.Image:
    rgb = Image.fromarray(_rng(5).integers(0, 256, (45, 70, 3), dtype=np.uint8), "RGB")
    return rgb.quantize(colors=16)


@pytest.fixture(scope="session")
def palette_transparent_image(palette_image) -> Image.Image:
    """A palette image whose colour 0 is transparent (composited on white, like RGBA)."""
    image = palette_image.copy()
    image.info["transparency"] = 0
    return image


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
