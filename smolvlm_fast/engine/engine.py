"""The one generation loop: continuous batching over the paged KV cache, with sampling, stop conditions and streaming.
transformers-style `generate()`, the CLI, `LLM` and (later) the server all use it.

An `Engine` step is three calls, as in nano-vllm: the scheduler picks each running sequence's next tokens (decodes
first, then chunks of prompts, within a token budget; it preempts when blocks run out), the model runs them packed
in one forward, and the sequences that reached their end sample a token and check their stop conditions.

It drives either backend's model (models/smolvlm_torch.SmolVLM or models/smolvlm_numpy.NumpyModel) through the
same members: config, backend, allocate_kv_cache, forward(ids, StepMetadata, kv_caches, images per sequence),
compute_logits, image_features_per_row. Each model decides itself how images reach its text (spliced into the
<image> tokens or through cross-attention): the step is schedule -> run -> postprocess for both. What differs per
backend is in engine/backend.py. No torch here: the PyTorch-free path runs this loop too.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from ..errors import InputError
from ..models.batch import SequenceImages
from .backend import as_numpy, backend_of
from .cache import FeatureCache, PagedCache, schedule_step
from .checks import check_request, check_requests, image_token_count, request_images
from .grammar import Grammars, advance
from .sampling import select_token
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import ImageInput, ImageSpan, Request, Sequence, image_digest

__all__ = ["Engine", "EngineStats", "Request", "check_request", "check_requests", "generate", "new_cache", "prefill"]


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
    graph_replays: int = 0           # steps replayed from a CUDA graph (cuda_graphs on; models/decode_graphs.py)
    # gauges: the engine's state when the stats were read
    running: int = 0                 # sequences in the running batch
    waiting: int = 0                 # sequences waiting to join it
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0          # unreferenced: never named, or named and reusable from the prefix cache
    kv_blocks_cached: int = 0        # named in the prefix cache (held or reusable)


def prefill(model, cache: PagedCache, kv_caches, requests: list[Request], seq_ids: list[int]):
    """Run every prompt through the model at once. Returns the hidden states [T, D] and the step metadata.
    (One forward over whole prompts, for logits at every position; generation goes through Engine.)"""
    meta = schedule_step(cache, {s: len(r.prompt_ids) for s, r in zip(seq_ids, requests)})
    ids = np.array([t for r in requests for t in r.prompt_ids], dtype=np.int64)
    images = [None if r.image_features is None else SequenceImages.of(r.image_features) for r in requests]
    return model.forward(ids, meta, kv_caches, images), meta


def image_hash(image: ImageInput) -> bytes:
    """The image's content hash: given, or of its pixels; features alone get a random one (shared with nobody)."""
    if image.content_hash is not None:
        return image.content_hash
    if image.pixel_values is None:
        return os.urandom(32)
    return image_digest(as_numpy(image.pixel_values))


def new_cache(model, token_counts: list[int], block_size: int):
    cache = PagedCache(sum(-(-n // block_size) for n in token_counts), block_size)
    return cache, model.allocate_kv_cache(cache.allocator.num_blocks, block_size)


class Engine:
    """Continuous batching over one model: requests join and leave the running batch at every step."""

    def __init__(self, model, *, num_blocks: int, block_size: int = 16, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, enable_prefix_caching: bool = True, feature_cache_bytes: int = 256 << 20,
                 decode: Callable[[list[int]], str] | None = None, cuda_graphs: bool | None = None,
                 tokenizer=None):
        """cuda_graphs: replay decode steps from CUDA graphs (torch on a GPU); None: SMOLVLM_FAST_CUDA_GRAPHS=1.
        tokenizer: what structured outputs (SamplingParams.response_format) are compiled for; without it a request
        that asks for one is refused."""
        self.model, self.decode, self.backend = model, decode, backend_of(model)
        self.grammars = None if tokenizer is None else Grammars(
            tokenizer, model.config.text.vocab_size, getattr(tokenizer, "eos_token_id", None))
        self.cache = PagedCache(num_blocks, block_size, enable_prefix_caching)
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        # what runs a step's forward: the model, or its decode steps from CUDA graphs (models/decode_graphs.py)
        self.graphs = self.backend.decode_graphs(model, self.kv_caches, block_size, max_num_seqs, cuda_graphs)
        self.scheduler = Scheduler(self.cache, SchedulerConfig(max_num_batched_tokens, max_num_seqs))
        self.features = FeatureCache(feature_cache_bytes)
        self._counts = EngineStats()
        self._ids = itertools.count()
        self._last_step: list[Sequence] | None = []

    @property
    def stats(self) -> EngineStats:
        allocator = self.cache.allocator
        return replace(self._counts, preemptions=self.scheduler.num_preemptions,
                       cached_prompt_tokens=self.scheduler.cached_prompt_tokens, evictions=allocator.evictions,
                       running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                       kv_blocks_total=allocator.num_blocks, kv_blocks_free=allocator.num_free,
                       kv_blocks_cached=allocator.num_cached,
                       graph_replays=self.graphs.replays if self.graphs is not None else 0)

    @property
    def capacity(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.cache.capacity

    def check(self, request: Request) -> None:
        """The one request check (InputError when it can never run): vocabulary, context, capacity, images, and
        a response format that compiles."""
        check_request(self.model, request, self.cache.capacity)
        self.check_response_format(request.params)

    def check_response_format(self, params) -> None:
        """InputError when the params ask for structured output that this engine cannot enforce."""
        if params.schema is None:
            return
        if self.grammars is None:
            raise InputError("structured output (response_format / json_schema) needs the model's tokenizer; "
                             "this engine has none")
        self.grammars.compile(params.schema)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- requests
    def add_request(self, request: Request, *, checked: bool = False) -> Sequence:
        """Check a request (InputError when it can never run; checked=True: its caller just did) and queue it."""
        if not checked:
            self.check(request)
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
                       token_ids=list(request.prompt_ids))
        spans, start = [], 0
        for image in request_images(request) if config.is_vlm else ():
            n = image_token_count(config, image)
            spans.append(ImageSpan(image, image_hash(image), start, start + n))
            start += n
        seq.place_images(spans, config)
        schema = request.params.schema
        if schema is not None and self.grammars is not None:  # (no grammars: check() refused it)
            seq.matcher = self.grammars.matcher(schema)
        if spans:
            seq.model_images = SequenceImages(spans=tuple((s.start, s.end) for s in spans),
                                              feature_of=partial(self._image_features, seq))
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
        hidden = self._run(batch)
        return self._postprocess(batch, hidden)

    def _run(self, batch: ScheduledBatch):
        """The step's tokens, packed, through the model -> hidden states [T, D]."""
        spans = [(seq, seq.num_computed, seq.num_computed + n) for seq, n in zip(batch.seqs, batch.num_tokens)]
        ids = np.array([t for seq, start, end in spans for t in seq.token_ids[start:end]], dtype=np.int64)
        images = [self._step_images(*span) for span in spans]
        hidden = (self.graphs or self.model).forward(ids, batch.meta, self.kv_caches, images)
        for seq, _, _ in spans:
            if seq.model_images is not None and seq.model_images.kept is not None:
                seq.features.clear()  # the model keeps what it derived from them: the features are not needed
        return hidden

    def _step_images(self, seq: Sequence, start: int, end: int) -> SequenceImages | None:
        """The sequence's images for the tokens start..end-1: the feature rows of its <image> tokens there."""
        if seq.model_images is not None:
            seq.model_images.rows = seq.image_range(start, end)
        return seq.model_images

    def _postprocess(self, batch: ScheduledBatch, hidden) -> list[Sequence]:
        """Book the computed tokens; the sequences at their end sample a token, and those that finished leave."""
        done = [self._computed(seq, n) for seq, n in zip(batch.seqs, batch.num_tokens)]
        rows = [batch.meta.last_token_indices[i] for i, d in enumerate(done) if d]
        sampling = [seq for seq, d in zip(batch.seqs, done) if d]
        if sampling:
            self._accept(sampling, self.backend.to_numpy(self.model.compute_logits(hidden[rows])))
        for seq in sampling:
            if seq.finished:
                self._release(seq)
        return sampling

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
        """Pick each sequence's next token from its logits row (within its grammar, if it has one), then check its
        stop conditions."""
        matchers = [seq.matcher for seq in seqs]
        if any(m is not None for m in matchers):
            logits = np.array(logits, dtype=np.float32)
            self.grammars.mask(matchers, logits, [seq.request.params.stop_token_ids for seq in seqs])
        for row, seq in enumerate(seqs):
            params = seq.request.params
            if seq.matcher is not None and seq.matcher.is_error():  # a grammar limit hit: no token is allowed
                seq.finish_reason, seq.error = "error", f"structured output: {seq.matcher.get_error()}"
                continue
            token = select_token(logits[row], params, seq.token_ids, seq.rng)
            seq.append_token(token)
            if seq.request.on_token:
                seq.request.on_token(token)
            grammar_end = None
            if token in params.stop_token_ids or _hit_stop_string(seq, self.decode):
                seq.finish_reason = "stop"
            elif seq.matcher is not None and (grammar_end := advance(seq.matcher, token)):
                seq.finish_reason = grammar_end
                if grammar_end == "error":
                    seq.error = f"structured output: token {token} refused ({seq.matcher.get_error()})"
            elif len(seq.output_ids) >= params.max_new_tokens:
                seq.finish_reason = "length"

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.cache.free(seq.seq_id)
        seq.features.clear()
        seq.model_images = None  # what the model kept of its images (cross-attention K/V) goes with it
        seq.matcher = None


def generate(model, requests: list[Request], *, decode: Callable[[list[int]], str] | None = None,
             block_size: int = 16, tokenizer=None) -> list[Sequence]:
    """Generate for every request together; sequences of different lengths decode in one batch.

    A cache with room for every request and a token budget of all the prompts: one prefill step, then decode
    steps, no preemption (the transformers-style generate() promises the whole batch at once)."""
    check_requests(model, requests)
    blocks = sum(-(-(len(r.prompt_ids) + r.params.max_new_tokens) // block_size) for r in requests)
    engine = Engine(model, num_blocks=max(blocks, 1), block_size=block_size,
                    max_num_batched_tokens=max(sum(len(r.prompt_ids) for r in requests), 1),
                    max_num_seqs=max(len(requests), 1), enable_prefix_caching=False, decode=decode,
                    tokenizer=tokenizer)
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
