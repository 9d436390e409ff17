"""Next-token selection in NumPy (both backends hand their logits over as float32 arrays): repetition
penalty, temperature, top-k and top-p in transformers' order, then greedy or a seeded draw."""
from __future__ import annotations

import numpy as np

from ..config import SamplingParams


def apply_repetition_penalty(logits, seen_ids, penalty):
    """logits [V]: tokens already seen are divided by penalty when positive, multiplied when negative."""
    if penalty == 1.0 or not seen_ids:
        return logits
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    score = logits[ids]
    logits[ids] = np.where(score < 0, score * penalty, score / penalty)
    return logits


def filter_top_k_top_p(logits, top_k, top_p):
    """logits [V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(logits, kind="stable")  # ascending
        cumulative = np.cumsum(softmax(logits[order]))
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.copy()
        logits[order[drop]] = -np.inf
    return logits


def softmax(x):
    e = np.exp(x - x.max(), dtype=np.float64)
    return e / e.sum()


def select_token(logits, params: SamplingParams, seen_ids: list[int], rng: np.random.Generator | None) -> int:
    """logits [V] float32 -> the next token id for one sequence."""
    logits = apply_repetition_penalty(np.array(logits, dtype=np.float32), seen_ids, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = softmax(logits)
    return int((rng or np.random.default_rng()).choice(len(probs), p=probs))
