"""The one generation loop: prefill, then batched decode over the paged KV cache, with sampling, stop
conditions and streaming. transformers-style `generate()`, the CLI and (later) the server all use it.

It drives either backend's model (model_torch.SmolVLM or model_numpy.NumpyModel) through the same five
members: config, allocate_kv_cache, forward(ids, StepMetadata, kv_caches, image_features), compute_logits.
No torch here: the PyTorch-free path runs this loop too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .cache import PagedCache, schedule_step
from .config import SamplingParams
from .errors import InputError, check_image_tokens
from .sampling import select_token


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    image_features: object | None = None  # [n_image_tokens, D] in the backend's array type, through the connector
    on_token: Callable[[int], None] | None = None


@dataclass
class Sequence:
    request: Request
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    rng: np.random.Generator | None = None
    text: str = ""  # decoded output, kept only when stop strings are watched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_requests(model, requests: list[Request]) -> None:
    """Every request fits the context, and its <image> tokens match its image features."""
    limit = model.config.text.max_position_embeddings
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise InputError(f"request {i}: the prompt is empty")
        if len(r.prompt_ids) + max(r.params.max_new_tokens, 1) > limit:
            raise InputError(f"request {i}: prompt of {len(r.prompt_ids)} tokens + max_new_tokens "
                             f"{r.params.max_new_tokens} exceeds the model's context of {limit} tokens")
        if model.config.is_vlm:
            n_features = 0 if r.image_features is None else r.image_features.shape[0]
            check_image_tokens(r.prompt_ids.count(model.config.image_token_id), n_features)


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
    """Run every prompt through the model at once. Returns the hidden states [T, D] and the step metadata."""
    meta = schedule_step(cache, {s: len(r.prompt_ids) for s, r in zip(seq_ids, requests)})
    ids = np.array([t for r in requests for t in r.prompt_ids], dtype=np.int64)
    return model.forward(ids, meta, kv_caches, concat_features([r.image_features for r in requests])), meta


def new_cache(model, token_counts: list[int], block_size: int):
    cache = PagedCache(sum(-(-n // block_size) for n in token_counts), block_size)
    return cache, model.allocate_kv_cache(cache.allocator.num_blocks, block_size)


def generate(model, requests: list[Request], *, decode: Callable[[list[int]], str] | None = None,
             block_size: int = 16) -> list[Sequence]:
    """Generate for every request together; sequences of different lengths decode in one batch."""
    check_requests(model, requests)
    seqs = [Sequence(r, rng=_rng(r.params.seed)) for r in requests]
    cache, kv_caches = new_cache(model, [len(r.prompt_ids) + r.params.max_new_tokens for r in requests], block_size)
    hidden, meta = prefill(model, cache, kv_caches, requests, list(range(len(requests))))
    logits = to_numpy(model.compute_logits(hidden[meta.last_token_indices]))
    active = [i for i, s in enumerate(seqs) if not _stop_before_start(s)]
    _accept(seqs, active, logits, decode)
    while active := [i for i in active if not seqs[i].finished]:
        meta = schedule_step(cache, {i: 1 for i in active})
        ids = np.array([seqs[i].output_ids[-1] for i in active], dtype=np.int64)
        logits = to_numpy(model.compute_logits(model.forward(ids, meta, kv_caches, None)))
        _accept(seqs, active, logits, decode)
    return seqs


def _rng(seed):
    return None if seed is None else np.random.default_rng(seed)


def _stop_before_start(seq: Sequence) -> bool:
    if seq.request.params.max_new_tokens == 0:
        seq.finish_reason = "length"
    return seq.finished


def _accept(seqs, active, logits, decode):
    """Pick each active sequence's next token from its logits row, then check its stop conditions."""
    for row, i in enumerate(active):
        seq, params = seqs[i], seqs[i].request.params
        token = select_token(logits[row], params, seq.request.prompt_ids + seq.output_ids, seq.rng)
        seq.output_ids.append(token)
        if seq.request.on_token:
            seq.request.on_token(token)
        if token in params.stop_token_ids or _hit_stop_string(seq, decode):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_new_tokens:
            seq.finish_reason = "length"


def _hit_stop_string(seq: Sequence, decode) -> bool:
    stops = seq.request.params.stop_strings
    if not stops or decode is None:
        return False
    seq.text = decode(seq.output_ids)
    return any(s in seq.text for s in stops)
