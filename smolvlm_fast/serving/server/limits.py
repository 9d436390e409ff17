"""The server's limits on one request. Standard library only: the command line builds its `serve --max-*` flags
from these fields (name, type, default, help) without importing the server's dependencies."""
from __future__ import annotations

from dataclasses import dataclass, field


def limit(default, help: str, *, shown: str | None = None, flag: str | None = None):
    """A Limits field: help and the default as --help shows it (shown), and the flag when it is not the field's
    name in dashes."""
    return field(default=default, metadata={"help": help, "shown": shown or f"{default:g}", "flag": flag})


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = limit(32 << 20, "bytes in one request body, base64 images included: 413 past it",
                                shown="32 MiB")
    max_images: int = limit(8, "images in one request")
    max_image_bytes: int = limit(10 << 20, "bytes of one image file, as encoded (PNG, JPEG ...)", shown="10 MiB")
    max_image_pixels: int = limit(40_000_000, "width x height of one image, before the processor resizes it",
                                  shown="40 million")
    max_tokens: int = limit(4096, "max_tokens of one request, and its value when none is asked")
    max_model_len: int | None = limit(None, "prompt + max_tokens of one request",
                                      shown="the model's context, within the KV cache's size")
    remote_timeout_s: float = limit(10.0, "seconds to fetch one remote image, all of it", flag="--remote-timeout")
