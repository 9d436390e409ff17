"""Next-token selection: repetition penalty, temperature, top-k, top-p (in transformers' order), greedy."""
from __future__ import annotations

import torch

from .config import SamplingParams


def apply_repetition_penalty(logits, seen_ids, penalty):
    """logits [V]: tokens already seen are divided by penalty when positive, multiplied when negative."""
    if penalty == 1.0 or not seen_ids:
        return logits
    ids = torch.tensor(sorted(set(seen_ids)), device=logits.device)
    score = logits[ids]
    logits[ids] = torch.where(score < 0, score * penalty, score / penalty)
    return logits


def filter_top_k_top_p(logits, top_k, top_p):
    """logits [V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def select_token(logits, params: SamplingParams, seen_ids: list[int], generator: torch.Generator | None) -> int:
    """logits [V] (any dtype) -> the next token id for one sequence."""
    logits = apply_repetition_penalty(logits.float().clone(), seen_ids, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
