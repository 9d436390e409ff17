"""The one generation loop: continuous batching over the paged KV cache, with sampling, stop conditions and streaming.
transformers-style `generate()`, the CLI, `LLM` and (later) the server all use it.

An `Engine` step is three calls, as in nano-vllm: the scheduler picks each running sequence's next tokens (decodes
first, then chunks of prompts, within a token budget; it preempts when blocks run out), the model runs them packed
in one forward, and the sequences that reached their end sample a token and check their stop conditions.

It drives either backend's model (model_torch.SmolVLM or model_numpy.NumpyModel) through the same five
members: config, allocate_kv_cache, forward(ids, StepMetadata, kv_caches, image_features), compute_logits,
image_features_per_row. No torch here: the PyTorch-free path runs this loop too.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError, check_image_tokens
from .cache import FeatureCache, PagedCache, schedule_step
from .sampling import select_token
from .scheduler import Scheduler, SchedulerConfig
from .sequence import ImageInput, ImageSpan, Request, Sequence


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0           # of the requests admitted
    cached_prompt_tokens: int = 0    # of those, found in the prefix cache when first scheduled
    prefill_tokens: int = 0          # run through the model in prompt chunks (after a preemption: prompt + output)
    decode_tokens: int = 0
    images_encoded: int = 0          # vision encoder runs, one per image
    feature_cache_hits: int = 0      # images whose features came from the LRU instead
    preemptions: int = 0
    evictions: int = 0               # cached blocks reused for other tokens


def check_requests(model, requests: list[Request]) -> None:
    """Every request fits the context, and its <image> tokens match its image features."""
    for i, r in enumerate(requests):
        try:
            check_request(model, r)
        except InputError as e:
            raise InputError(f"request {i}: {e}") from None


def check_request(model, r: Request, capacity: int | None = None) -> None:
    """One request at the border: a prompt in the vocabulary, room in the context (and in a cache of `capacity`
    tokens), images only for a VLM and as many <image> tokens as its images give features."""
    config = model.config
    limit = config.text.max_position_embeddings
    if not r.prompt_ids:
        raise InputError("the prompt is empty")
    if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= config.text.vocab_size:
        raise InputError(f"prompt token ids must be in [0, {config.text.vocab_size}), got values in "
                         f"[{min(r.prompt_ids)}, {max(r.prompt_ids)}]")
    needed = len(r.prompt_ids) + max(r.params.max_new_tokens, 1)
    if needed > limit:
        raise InputError(f"prompt of {len(r.prompt_ids)} tokens + max_new_tokens "
                         f"{r.params.max_new_tokens} exceeds the model's context of {limit} tokens")
    if capacity is not None and needed > capacity:
        raise InputError(f"prompt of {len(r.prompt_ids)} tokens + max_new_tokens {r.params.max_new_tokens} "
                         f"needs more than the whole KV cache ({capacity} tokens): raise num_blocks")
    if (r.images or r.image_features is not None) and not config.is_vlm:
        raise InputError("this is a text-only model; it cannot take images (use a SmolVLM checkpoint)")
    if config.is_vlm:
        n_features = sum(image_token_count(config, im) for im in request_images(r))
        markers = r.prompt_ids.count(config.image_token_id)
        if not config.is_xattn:
            check_image_tokens(markers, n_features)
        elif markers * config.image_seq_len != n_features:  # cross-attention: one <image> token per image
            raise InputError(f"the prompt has {markers} <image> token(s) but its images give "
                             f"{n_features / config.image_seq_len:g} image(s): one <image> per image")


def request_images(r: Request) -> list[ImageInput]:
    if r.images and r.image_features is not None:
        raise InputError("pass a request's images either as images or as image_features, not both")
    return list(r.images) if r.image_features is None else [ImageInput(features=r.image_features)]


def image_token_count(config, image: ImageInput) -> int:
    """The <image> tokens one image fills: its feature rows, or image_seq_len per frame. Checks the image's shape
    against the model at the border, so that a bad one never reaches a step it would fail with its neighbours."""
    if image.features is not None:
        shape = tuple(getattr(image.features, "shape", ()))
        if len(shape) != 2 or shape[1] != config.text.hidden_size or shape[0] == 0:
            raise InputError(f"image features must be [tokens > 0, {config.text.hidden_size}] (the text hidden size), "
                             f"got shape {shape}")
        return int(shape[0])
    shape = getattr(image.pixel_values, "shape", None)
    if shape is None or len(shape) != 4:
        raise InputError(f"an image's pixel_values must be [frames, channels, height, width], got shape {shape}")
    v = config.vision
    if shape[1] != v.num_channels or shape[2] < v.patch_size or shape[3] < v.patch_size:
        raise InputError(f"an image's pixel_values {tuple(shape)} must have {v.num_channels} channels and be at "
                         f"least one {v.patch_size}x{v.patch_size} patch")
    config.check_image_size(int(shape[2]), int(shape[3]))
    mask = image.pixel_attention_mask
    if mask is not None and tuple(mask.shape) != (shape[0], shape[2], shape[3]):
        raise InputError(f"pixel_attention_mask {tuple(mask.shape)} does not match pixel_values {tuple(shape)}")
    return int(shape[0]) * config.image_seq_len


def image_hash(image: ImageInput) -> bytes:
    """The image's content hash: given, or of its pixels; features alone get a random one (shared with nobody)."""
    if image.content_hash is not None:
        return image.content_hash
    if image.pixel_values is None:
        return os.urandom(32)
    pixels = np.ascontiguousarray(to_numpy(image.pixel_values))
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=32).digest()


def concat_features(features: list):
    """The requests' image features, in order, as one array of the backend's type (or None)."""
    features = [f for f in features if f is not None]
    if len(features) <= 1:
        return features[0] if features else None
    if isinstance(features[0], np.ndarray):
        return np.concatenate(features)
    import torch
    return torch.cat(features)


def to_numpy(x) -> np.ndarray:
    """Logits of either backend as a float32 NumPy array (a torch tensor is moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def prefill(model, cache: PagedCache, kv_caches, requests: list[Request], seq_ids: list[int]):
    """Run every prompt through the model at once. Returns the hidden states [T, D] and the step metadata.
    (One forward over whole prompts, for logits at every position; generation goes through Engine.)"""
    meta = schedule_step(cache, {s: len(r.prompt_ids) for s, r in zip(seq_ids, requests)})
    ids = np.array([t for r in requests for t in r.prompt_ids], dtype=np.int64)
    if model.config.is_xattn:
        cross = [None if r.image_features is None else model.cross_kv(r.image_features) for r in requests]
        return model.forward(ids, meta, kv_caches, cross_kv=cross), meta
    return model.forward(ids, meta, kv_caches, concat_features([r.image_features for r in requests])), meta


def new_cache(model, token_counts: list[int], block_size: int):
    cache = PagedCache(sum(-(-n // block_size) for n in token_counts), block_size)
    return cache, model.allocate_kv_cache(cache.allocator.num_blocks, block_size)


class Engine:
    """Continuous batching over one model: requests join and leave the running batch at every step."""

    def __init__(self, model, *, num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = True, feature_cache_bytes: int = 256 << 20,
                 decode: Callable[[list[int]], str] | None = None):
        self.model, self.decode = model, decode
        self.cache = PagedCache(num_blocks, block_size, enable_prefix_caching)
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.scheduler = Scheduler(self.cache, SchedulerConfig(max_num_batched_tokens, max_num_seqs))
        self.features = FeatureCache(feature_cache_bytes)
        self._counts = EngineStats()
        self._ids = itertools.count()
        self._last_step: list[Sequence] | None = []

    @property
    def stats(self) -> EngineStats:
        return replace(self._counts, preemptions=self.scheduler.num_preemptions,
                       cached_prompt_tokens=self.scheduler.cached_prompt_tokens,
                       evictions=self.cache.allocator.evictions)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- requests
    def add_request(self, request: Request) -> Sequence:
        """Check a request (InputError when it can never run) and queue it."""
        check_request(self.model, request, self.cache.capacity)
        seq = self._new_sequence(request)
        if request.params.max_new_tokens == 0:
            seq.finish_reason = "length"
            return seq
        self._counts.prompt_tokens += seq.num_prompt_tokens
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "abort", error: str | None = None) -> None:
        """Stop a sequence now; its blocks go back to the cache."""
        if not seq.finished:
            seq.finish_reason, seq.error = reason, error
        self._release(seq)

    def fail_last_step(self, error: str) -> list[Sequence]:
        """After a step raised: end the sequences it ran with the error, so that the others go on (all of them
        when it failed before it had picked any: the scheduler itself)."""
        picked = self._last_step if self._last_step is not None else [*self.scheduler.running, *self.scheduler.waiting]
        failed = [s for s in picked if not s.finished]
        for seq in failed:
            self.abort(seq, "error", error)
        return failed

    def reset_prefix_cache(self) -> None:
        self.cache.allocator.reset()
        self.features.clear()

    def _new_sequence(self, request: Request) -> Sequence:
        config = self.model.config
        seq = Sequence(request, rng=_rng(request.params.seed), seq_id=next(self._ids),
                       token_ids=list(request.prompt_ids), image_token_id=config.image_token_id)
        if config.is_xattn:  # images reach the text through cross-attention; <image> ids stay ordinary tokens
            seq.image_token_id, seq.attends_images = None, True
        elif config.is_vlm:
            seq.image_positions = [p for p, t in enumerate(request.prompt_ids) if t == config.image_token_id]
        if config.is_vlm:
            start = 0
            for image in request_images(request):
                n = image_token_count(config, image)
                seq.images.append(ImageSpan(image, image_hash(image), start, start + n))
                start += n
        return seq

    # -- one step
    def step(self) -> list[Sequence]:
        """Run one batch; returns the sequences that got a token or finished in it."""
        self._last_step = None
        batch = self.scheduler.schedule()
        self._last_step = batch.seqs
        if not batch.seqs:
            return []
        self._counts.steps += 1
        ids, features = self._inputs(batch.seqs, batch.num_tokens)
        if self.model.config.is_xattn:
            cross = [self._cross_kv(seq) for seq in batch.seqs]
            hidden = self.model.forward(ids, batch.meta, self.kv_caches, cross_kv=cross)
        else:
            hidden = self.model.forward(ids, batch.meta, self.kv_caches, features)
        done = [self._computed(seq, n) for seq, n in zip(batch.seqs, batch.num_tokens)]
        rows = [batch.meta.last_token_indices[i] for i, d in enumerate(done) if d]
        sampling = [seq for seq, d in zip(batch.seqs, done) if d]
        if sampling:
            self._accept(sampling, to_numpy(self.model.compute_logits(hidden[rows])))
        for seq in sampling:
            if seq.finished:
                self._release(seq)
        return sampling

    def _cross_kv(self, seq: Sequence):
        """A cross-attention request's image K/V: computed from its images' features at its first step, then kept
        (through preemptions too) until it ends; None for a request without images."""
        if seq.cross_kv is None and seq.images:
            features = concat_features([self._image_features(seq, i) for i in range(len(seq.images))])
            seq.cross_kv = self.model.cross_kv(features)
            seq.features.clear()
        return seq.cross_kv

    def _inputs(self, seqs: list[Sequence], counts: list[int]):
        """The step's packed token ids [T] and the features of its <image> tokens, in order (or None)."""
        spans = [(seq, seq.num_computed, seq.num_computed + n) for seq, n in zip(seqs, counts)]
        ids = np.array([t for seq, start, end in spans for t in seq.token_ids[start:end]], dtype=np.int64)
        return ids, concat_features([f for span in spans for f in self._features_for(*span)])

    def _features_for(self, seq: Sequence, start: int, end: int) -> list:
        """The features of the <image> tokens at positions start..end-1, sliced where a chunk splits an image."""
        f0, f1 = seq.image_range(start, end)
        return [self._image_features(seq, i)[max(f0, s.start) - s.start:min(f1, s.end) - s.start]
                for i, s in enumerate(seq.images) if s.start < f1 and s.end > f0]

    def _image_features(self, seq: Sequence, index: int):
        """An image's features: held by the sequence, from the LRU, or from the vision encoder (then cached)."""
        if index in seq.features:
            return seq.features[index]
        span = seq.images[index]
        features = span.image.features if span.image.features is not None else self.features.get(span.digest)
        if features is not None:
            self._counts.feature_cache_hits += span.image.features is None
        else:
            image = span.image
            mask = None if image.pixel_attention_mask is None else image.pixel_attention_mask[None]
            features = self.model.image_features_per_row(image.pixel_values[None], mask)[0]
            self._counts.images_encoded += 1
            self.features.put(span.digest, features)
        seq.features[index] = features
        return features

    def _computed(self, seq: Sequence, n: int) -> bool:
        """Book n more tokens of seq as cached (naming its newly full blocks); True when it is to sample."""
        decoding = seq.num_computed == seq.num_tokens - 1 and seq.num_computed >= seq.num_prompt_tokens
        if decoding:
            self._counts.decode_tokens += n
        else:
            self._counts.prefill_tokens += n
        seq.num_computed += n
        full = seq.num_computed // self.cache.block_size
        self.cache.name_blocks(seq.seq_id, seq.block_digests(full, self.cache.block_size))
        if seq.image_positions and seq.num_computed > seq.image_positions[-1]:
            seq.features.clear()  # every image token is in the cache: the features are not needed any more
        return seq.num_computed == seq.num_tokens

    def _accept(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        """Pick each sequence's next token from its logits row, then check its stop conditions."""
        for row, seq in enumerate(seqs):
            params = seq.request.params
            token = select_token(logits[row], params, seq.token_ids, seq.rng)
            seq.append_token(token)
            if seq.request.on_token:
                seq.request.on_token(token)
            if token in params.stop_token_ids or _hit_stop_string(seq, self.decode):
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= params.max_new_tokens:
                seq.finish_reason = "length"

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.cache.free(seq.seq_id)
        seq.features.clear()
        seq.cross_kv = None


def generate(model, requests: list[Request], *, decode: Callable[[list[int]], str] | None = None,
             block_size: int = 16) -> list[Sequence]:
    """Generate for every request together; sequences of different lengths decode in one batch.

    A cache with room for every request and a token budget of all the prompts: one prefill step, then decode
    steps, no preemption (the transformers-style generate() promises the whole batch at once)."""
    check_requests(model, requests)
    blocks = sum(-(-(len(r.prompt_ids) + r.params.max_new_tokens) // block_size) for r in requests)
    engine = Engine(model, num_blocks=max(blocks, 1), block_size=block_size,
                    max_num_batched_tokens=max(sum(len(r.prompt_ids) for r in requests), 1),
                    max_num_seqs=max(len(requests), 1), enable_prefix_caching=False, decode=decode)
    seqs = [engine.add_request(r) for r in requests]
    while engine.has_unfinished():
        engine.step()
    return seqs


def _rng(seed):
    return None if seed is None else np.random.default_rng(seed)


def _hit_stop_string(seq: Sequence, decode) -> bool:
    stops = seq.request.params.stop_strings
    if not stops or decode is None:
        return False
    seq.text = decode(seq.output_ids)
    return any(s in seq.text for s in stops)
