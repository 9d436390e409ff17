"""The errors smolvlm_fast raises for bad input. Each names the file, tensor, field or limit at fault."""


class SmolVLMError(ValueError):
    """Base class: a clear, user-facing error (never a bare traceback from inside the forward)."""


class CheckpointError(SmolVLMError):
    """A checkpoint is missing, truncated, or does not match its config."""


class InputError(SmolVLMError):
    """A prompt, image or generation argument is invalid."""


def check_image_tokens(n_tokens: int, n_features: int) -> None:
    """A prompt's <image> tokens must match its images' features one for one."""
    if n_tokens != n_features:
        raise InputError(f"the prompt has {n_tokens} <image> tokens but the images give {n_features} "
                         "features: expand prompts with the processor, one <image> per image")
