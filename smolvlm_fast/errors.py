"""The errors smolvlm_fast raises for bad input. Each names the file, tensor, field or limit at fault."""


class SmolVLMError(ValueError):
    """Base class: a clear, user-facing error (never a bare traceback from inside the forward)."""


class CheckpointError(SmolVLMError):
    """A checkpoint is missing, truncated, or does not match its config."""


class InputError(SmolVLMError):
    """A prompt, image or generation argument is invalid."""
