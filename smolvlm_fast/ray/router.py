"""Prefix affinity for the Engine deployment: a request's key (its images' hashes and the start of its prompt) and a
Ray Serve request router that sends every request with the same key to the same replica.

Why a router of our own: Ray's PrefixCacheAffinityRouter is public as ray.serve.llm.request_router, which does not
import without vLLM or SGLang (Ray 2.60's ray.serve.llm imports their protocol models); the class itself is in the
private ray.llm._internal, and it makes blocking ray.get calls to one detached prefix-tree actor per routing
decision. This one is rendezvous hashing over the replicas' ids: no state, no actor, every ingress replica (on any
node) picks the same replica for a key, and when a replica goes only its keys move. It gives up the tree's
longest-prefix match: two requests share a replica when their keys (a fixed-length prefix) are equal.
"""
from __future__ import annotations

import hashlib
import json

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PREFIX_CHARS = 512   # a text prompt's key: its first characters (a long shared system prompt keeps its replica)
PREFIX_IDS = 128     # a /v1/completions prompt given as token ids: its first ids


def affinity_key(path: str, body: bytes) -> str | None:
    """The routing key of a request body: for a chat, its parts in order, each image as its content's hash, up to
    and with the first image (the image's tokens dominate the prefix the KV cache shares) or PREFIX_CHARS of text;
    for a completion, the prompt's start. None for a body that is not JSON (the replica answers its 400)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if path.endswith("/chat/completions"):
        prefix = chat_prefix(data.get("messages"))
    elif path.endswith("/completions"):
        prefix = completion_prefix(data.get("prompt"))
    else:
        return None
    return hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest() if prefix else None


def chat_prefix(messages) -> str:
    out = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        parts = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, dict) and (url := media_url(part)):
                out.append(f"<image {hashlib.sha256(url.encode()).hexdigest()}>")  # a data: URL: the content's hash
                return "".join(out)
            if sum(map(len, out)) >= PREFIX_CHARS:
                return "".join(out)[:PREFIX_CHARS]
    return "".join(out)[:PREFIX_CHARS]


def media_url(part: dict) -> str | None:
    for kind in ("image_url", "video_url"):
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if isinstance(url, str):
            return url
    return None


def completion_prefix(prompt) -> str:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS]
    if isinstance(prompt, list):
        return "ids:" + ",".join(map(str, prompt[:PREFIX_IDS]))
    return ""


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of the replicas for key: the first is the key's home."""
    def weight(replica: str) -> bytes:
        return hashlib.sha256(f"{key}|{replica}".encode()).digest()
    return sorted(replica_ids, key=weight, reverse=True)


class AffinityRouter(RequestRouter):
    """Sends a request with an affinity key (the handle call's `affinity` keyword) to the key's home replica,
    then, if that one is full (max_ongoing_requests), to the least loaded of the others; a request without a key
    (GET /health, /metrics, /v1/models) to the least loaded replica."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("affinity") if pending_request is not None else None
        if pending_request is not None:
            # every rank tried and full: wait between rounds rather than spin
            pending_request.routing_context.should_backoff = True
        if not key:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        home, *others = rank(key, list(by_id))
        return [[by_id[home]], [by_id[i] for i in others]] if others else [[by_id[home]]]
