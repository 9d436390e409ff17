"""smolvlm_fast: a fast inference engine for SmolVLM. Change one import in transformers code:

    from smolvlm_fast import AutoProcessor, AutoModelForVision2Seq

or serve many requests at once, vLLM-style:

    from smolvlm_fast import LLM, SamplingParams
"""
import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    # OpenBLAS's threads spin for a while after each product; between the vision encoder's BLAS products the C++
    # kernels (attention, norms) then share the cores with them (~10% of an image's encode on 2 cores). A short
    # timeout lets them sleep. Read when OpenBLAS loads, so only if numpy is not imported yet; a user's value wins.
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .auto import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForVision2Seq,
    AutoProcessor,
    AutoTokenizer,
    SmolVLMForConditionalGeneration,
)
from .config import ModelConfig, SamplingParams
from .errors import CheckpointError, InputError, SmolVLMError
from .inputs.streaming import TextStreamer
from .patch import patch
from .random_checkpoint import init_random
from .serving.llm import LLM, RequestOutput

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoProcessor",
           "AutoTokenizer", "SmolVLMForConditionalGeneration", "ModelConfig", "SamplingParams", "CheckpointError",
           "InputError", "SmolVLMError", "TextStreamer", "LLM", "RequestOutput", "patch", "init_random",
           "__version__"]
