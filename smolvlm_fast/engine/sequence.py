"""A request and its running state: what a user asks for (Request, its ImageInputs) and what the engine keeps while
it runs (Sequence: tokens, cache progress, prefix-cache digests, where its images' features go).

Its own module, as nano-vllm's engine/sequence.py, so the scheduler and the engine both import it and neither imports
the other."""
from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig, SamplingParams
from ..models.batch import SequenceImages
from .cache import block_digest


def image_digest(pixels: np.ndarray) -> bytes:
    """The content hash that names an image for prefix caching and the feature cache: of its pixels as float32,
    with their shape (two images with the same bytes in other shapes differ)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=32).digest()


@dataclass
class ImageInput:
    """One image of a prompt: its frames (the tiles and the global image, as the processor cuts it) or its features,
    and a content hash that names it for prefix caching."""
    pixel_values: object | None = None          # [n_frames, C, H, W]
    pixel_attention_mask: object | None = None  # [n_frames, H, W] (None: every pixel is real)
    features: object | None = None              # [n_tokens, D] through the connector, in the backend's array type
    content_hash: bytes | None = None           # None: hashed from pixel_values (features alone: never shared)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    image_features: object | None = None  # [n_image_tokens, D] in the backend's array type, through the connector
    on_token: Callable[[int], None] | None = None
    images: list[ImageInput] = field(default_factory=list)  # instead of image_features: per image, cacheable
    request_id: str | None = None


@dataclass
class ImageSpan:
    """Where one image's features go: its tokens are the prompt's <image> tokens start..end-1 (counted in order)."""
    image: ImageInput
    digest: bytes
    start: int
    end: int


@dataclass(eq=False)  # compared by identity: the scheduler's queues hold them
class Sequence:
    request: Request
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    rng: np.random.Generator | None = None
    text: str = ""  # decoded output, kept only when stop strings are watched
    seq_id: int = -1
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    digests: list[bytes] = field(default_factory=list)  # of the full blocks so far
    images: list[ImageSpan] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)  # prompt positions of the <image> tokens, in order
    image_token_id: int | None = None
    features: dict[int, object] = field(default_factory=dict)  # image index -> features, held while prefilling
    error: str | None = None
    attends_images: bool = False  # a cross-attention model: every token depends on all the request's images
    model_images: SequenceImages | None = None  # its images as the model's forward takes them (None: it has none)
    matcher: object | None = None  # its llguidance matcher when its output follows a grammar (engine/grammar.py)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def place_images(self, spans: list[ImageSpan], config: ModelConfig) -> None:
        """Where its images' features go, for the prefix-cache names and the chunk cuts: a spliced model fills the
        prompt's <image> tokens with them; a cross-attention model attends to all of them from every token (its
        <image> ids stay ordinary tokens)."""
        self.images = spans
        if config.is_xattn:
            self.image_token_id, self.attends_images = None, True
        else:
            self.image_token_id = config.image_token_id
            self.image_positions = [p for p, t in enumerate(self.request.prompt_ids) if t == config.image_token_id]

    def append_token(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)

    def block_digests(self, num_blocks: int, block_size: int) -> list[bytes]:
        """The digests of the first num_blocks (full) blocks, computed once each."""
        for b in range(len(self.digests), num_blocks):
            start, end = b * block_size, (b + 1) * block_size
            parent = self.digests[-1] if self.digests else b""
            self.digests.append(block_digest(parent, self.token_ids[start:end], self.images_in(start, end)))
        return self.digests[:num_blocks]

    def image_range(self, start: int, end: int) -> tuple[int, int]:
        """[f0, f1): the <image> tokens (counted in order) at prompt positions start..end-1."""
        return bisect_left(self.image_positions, start), bisect_left(self.image_positions, end)

    def images_in(self, start: int, end: int) -> tuple[tuple[bytes, int], ...]:
        """(content hash, offset into the image) of each image with tokens at positions start..end-1. With
        cross-attention every token depends on every image: the first block names them all (later blocks chain)."""
        if self.attends_images:
            return tuple((s.digest, 0) for s in self.images) if start == 0 else ()
        f0, f1 = self.image_range(start, end)
        return tuple((s.digest, max(f0, s.start) - s.start) for s in self.images if s.start < f1 and s.end > f0)

    def image_safe_end(self, start: int, end: int, kind: str | None) -> tuple[int, str | None]:
        """Cut the chunk start..end-1 so that a step feeds either image features ("real" <image> tokens of the
        prompt) or <image> ids the model generated itself ("literal": embedded as tokens), never both: the model
        replaces every <image> id of a step that has features. Returns (new end, the step's kind)."""
        if self.image_token_id is None:
            return end, kind
        f0, f1 = self.image_range(start, end)
        first_real = self.image_positions[f0] if f1 > f0 else None
        first_literal = next((p for p in range(max(start, self.num_prompt_tokens), end)
                              if self.token_ids[p] == self.image_token_id), None)
        if kind is None:  # the prompt's real ones come before any literal one
            kind = "real" if first_real is not None else "literal" if first_literal is not None else None
        cut = first_literal if kind == "real" else first_real if kind == "literal" else None
        return (end if cut is None else cut), kind
