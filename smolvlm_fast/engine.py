"""The one generation loop: prefill, then batched decode over the paged KV cache, with sampling, stop
conditions and streaming. transformers-style `generate()`, the CLI and (later) the server all use it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import PagedCache, schedule_step
from .config import SamplingParams
from .errors import InputError
from .model_torch import ForwardBatch, SmolVLM, check_image_tokens
from .sampling import select_token


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    image_features: torch.Tensor | None = None  # [n_image_tokens, D], already through the connector
    on_token: Callable[[int], None] | None = None


@dataclass
class Sequence:
    request: Request
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"
    generator: torch.Generator | None = None
    text: str = ""  # decoded output, kept only when stop strings are watched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_requests(model: SmolVLM, requests: list[Request]) -> None:
    """Every request fits the context, and its <image> tokens match its image features."""
    limit = model.config.text.max_position_embeddings
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise InputError(f"request {i}: the prompt is empty")
        if model.config.is_vlm:
            n_features = 0 if r.image_features is None else r.image_features.shape[0]
            check_image_tokens(r.prompt_ids.count(model.config.image_token_id), n_features)
        if len(r.prompt_ids) + max(r.params.max_new_tokens, 1) > limit:
            raise InputError(f"request {i}: prompt of {len(r.prompt_ids)} tokens + max_new_tokens "
                             f"{r.params.max_new_tokens} exceeds the model's context of {limit} tokens")


def prefill(model, cache: PagedCache, kv_caches, requests: list[Request], seq_ids: list[int]):
    """Run every prompt through the model at once. Returns the hidden states [T, D] and the step batch."""
    meta = schedule_step(cache, {s: len(r.prompt_ids) for s, r in zip(seq_ids, requests)})
    batch = ForwardBatch.from_metadata(meta, model.device)
    ids = torch.tensor([t for r in requests for t in r.prompt_ids], device=model.device)
    features = [r.image_features for r in requests if r.image_features is not None]
    image_features = torch.cat(features) if features else None
    return model(ids, batch, kv_caches, image_features), batch


def new_cache(model: SmolVLM, token_counts: list[int], block_size: int):
    cache = PagedCache(sum(-(-n // block_size) for n in token_counts), block_size)
    return cache, model.allocate_kv_cache(cache.allocator.num_blocks, block_size)


@torch.inference_mode()
def generate(model: SmolVLM, requests: list[Request], *, decode: Callable[[list[int]], str] | None = None,
             block_size: int = 16) -> list[Sequence]:
    """Generate for every request together; sequences of different lengths decode in one batch."""
    check_requests(model, requests)
    seqs = [Sequence(r, generator=_generator(r.params.seed)) for r in requests]
    cache, kv_caches = new_cache(model, [len(r.prompt_ids) + r.params.max_new_tokens for r in requests], block_size)
    hidden, batch = prefill(model, cache, kv_caches, requests, list(range(len(requests))))
    logits = model.compute_logits(hidden[batch.last_token_indices])
    active = [i for i, s in enumerate(seqs) if not _stop_before_start(s)]
    _accept(seqs, active, logits, decode)
    while active := [i for i in active if not seqs[i].finished]:
        meta = schedule_step(cache, {i: 1 for i in active})
        batch = ForwardBatch.from_metadata(meta, model.device)
        ids = torch.tensor([seqs[i].output_ids[-1] for i in active], device=model.device)
        logits = model.compute_logits(model(ids, batch, kv_caches))
        _accept(seqs, active, logits, decode)
    return seqs


def _generator(seed):
    return None if seed is None else torch.Generator().manual_seed(seed)


def _stop_before_start(seq: Sequence) -> bool:
    if seq.request.params.max_new_tokens == 0:
        seq.finish_reason = "length"
    return seq.finished


def _accept(seqs, active, logits, decode):
    """Pick each active sequence's next token from its logits row, then check its stop conditions."""
    for row, i in enumerate(active):
        seq, params = seqs[i], seqs[i].request.params
        token = select_token(logits[row], params, seq.request.prompt_ids + seq.output_ids, seq.generator)
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
