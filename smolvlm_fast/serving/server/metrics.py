"""The server's counters (responses, tokens, time to first token) and the engine's gauges (LLM.stats), in the
Prometheus text format of GET /metrics."""
from __future__ import annotations

from collections import Counter
from itertools import accumulate

from ...engine.engine import EngineStats


class Metrics:
    """Counters of this server and gauges of the engine, in the Prometheus text format."""

    TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
    MODEL_PATH = "/v1/models/"  # GET /v1/models/{id}: counted as one endpoint whatever the id

    def __init__(self):
        self.responses: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def count_response(self, path: str, status: int) -> None:
        self.responses[(self.endpoint(path), status)] += 1

    def endpoint(self, path: str) -> str:
        if path.startswith(self.MODEL_PATH) and len(path) > len(self.MODEL_PATH):
            return self.MODEL_PATH + "{id}"
        return path if path in self.ENDPOINTS else "other"

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_counts[sum(seconds > b for b in self.TTFT_BUCKETS)] += 1
        self.ttft_sum += seconds

    def render(self, stats: EngineStats) -> str:
        """Every metric, the engine's as of stats (LLM.stats: counters since the start, gauges as of now)."""
        lines: list[str] = []

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP smolvlm_{name} {help}", f"# TYPE smolvlm_{name} {kind}"])
            lines.extend(f"smolvlm_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP responses by endpoint and status (499: the client left first).",
               [(f'{{endpoint="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.responses.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens of the requests served.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated for the requests served.",
               [("", self.generation_tokens)])
        cumulative = list(accumulate(self.ttft_counts))
        buckets = [*(f"{b:g}" for b in self.TTFT_BUCKETS), "+Inf"]
        metric("time_to_first_token_seconds", "histogram", "From a request's arrival to its first token.",
               [*((f'_bucket{{le="{b}"}}', c) for b, c in zip(buckets, cumulative)),
                ("_sum", self.ttft_sum), ("_count", cumulative[-1])])
        metric("num_requests_running", "gauge", "Sequences in the running batch.", [("", stats.running)])
        metric("num_requests_waiting", "gauge", "Sequences waiting to join the batch.", [("", stats.waiting)])
        metric("kv_cache_blocks_used", "gauge", "KV-cache blocks held by sequences.",
               [("", stats.kv_blocks_total - stats.kv_blocks_free)])
        metric("kv_cache_blocks_total", "gauge", "KV-cache blocks in all.", [("", stats.kv_blocks_total)])
        metric("prefix_cache_blocks", "gauge", "Blocks named in the prefix cache (held or reusable).",
               [("", stats.kv_blocks_cached)])
        metric("prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [("", stats.prompt_tokens)])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
               [("", stats.cached_prompt_tokens)])
        metric("preemptions_total", "counter", "Sequences preempted for want of KV-cache blocks.",
               [("", stats.preemptions)])
        metric("images_encoded_total", "counter", "Vision encoder runs, one per image.", [("", stats.images_encoded)])
        metric("image_feature_cache_hits_total", "counter", "Images whose features came from the cache.",
               [("", stats.feature_cache_hits)])
        return "\n".join(lines) + "\n"
