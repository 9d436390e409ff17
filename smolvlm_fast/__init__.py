"""smolvlm_fast: a fast inference engine for SmolVLM. Change one import in transformers code:

    from smolvlm_fast import AutoProcessor, AutoModelForVision2Seq

or serve many requests at once, vLLM-style:

    from smolvlm_fast import LLM, SamplingParams
"""
from .auto import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForVision2Seq, AutoProcessor,
                   AutoTokenizer, SmolVLMForConditionalGeneration)
from .config import ModelConfig, SamplingParams
from .errors import CheckpointError, InputError, SmolVLMError
from .llm import LLM, RequestOutput
from .patch import patch
from .random_checkpoint import init_random
from .streaming import TextStreamer

__version__ = "0.1.0"

__all__ = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoProcessor",
           "AutoTokenizer", "SmolVLMForConditionalGeneration", "ModelConfig", "SamplingParams", "CheckpointError",
           "InputError", "SmolVLMError", "TextStreamer", "LLM", "RequestOutput", "patch", "init_random",
           "__version__"]
