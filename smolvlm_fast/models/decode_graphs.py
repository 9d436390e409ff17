"""CUDA graphs for the decode step of the torch model: a step of one new token per sequence, replayed from a graph
captured once per (batch bucket, length bucket), instead of launching its few hundred small kernels one by one.

Applied from outside the model: `DecodeGraphs(model, kv_caches, ...).forward` takes the engine's calls as
`model.forward` does and runs what it cannot replay eagerly (prefill chunks, image features in the step, a
cross-attention model, more sequences than the largest bucket). Off by default until it is measured on a GPU:
SMOLVLM_FAST_CUDA_GRAPHS=1, or cuda_graphs=True on the engine, `LLM` and `from_pretrained`.

How a step is replayed. A graph reads its inputs at the addresses it was captured with, so each bucket has one
int32 buffer on the device holding them all (ids, positions, slots, lengths, query starts, block tables), filled
from a pinned host copy in one transfer. The batch is padded up to its bucket with rows the ops' contract makes
harmless: slot -1 (write_kv_cache skips it) and length 0 (a query that sees no key is 0). The block tables are as
wide as a sequence can grow, and the attention's context splits are sized by a bound of the length bucket
(`max_seq_len`), so no op reads a length back to the host while the graph is recorded. The RoPE table is grown
to the whole context before the first capture, so it never moves under a graph.

`capture` is how a graph is made: `cuda_capture` on a GPU; the tests pass `eager_capture`, which re-runs the
recorded call on the same static buffers, to check the padding and bucketing on the CPU.
"""
from __future__ import annotations

import os
import warnings
from bisect import bisect_left
from collections.abc import Callable

import numpy as np
import torch

from ..errors import InputError
from .batch import StepMetadata, check_images, spliced_features
from .smolvlm_torch import ForwardBatch

GRAPHS_ENV = "SMOLVLM_FAST_CUDA_GRAPHS"
SHORTEST_BUCKET = 256  # tokens: the smallest length bucket (a split of the attention kernels covers 64-256 keys)


def graphs_wanted(option: bool | None) -> bool:
    """cuda_graphs= as given, else SMOLVLM_FAST_CUDA_GRAPHS (1 on, unset or 0 off)."""
    if option is not None:
        return bool(option)
    value = os.environ.get(GRAPHS_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise InputError(f"{GRAPHS_ENV}={value!r}: use 1 (capture the decode step) or 0 (off, the default)")
    return value == "1"


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to max_batch (max_batch itself the last): at most 7 padding rows past 8."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return (*sizes, max_batch)


def length_buckets(capacity: int) -> tuple[int, ...]:
    """Powers of two from SHORTEST_BUCKET up to the capacity (the capacity itself the last)."""
    sizes, n = [], SHORTEST_BUCKET
    while n < capacity:
        sizes.append(n)
        n *= 2
    return (*sizes, capacity)


def cuda_capture(run: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """run() recorded into a CUDA graph (after two warm-up runs on a side stream, which also compile and tune the
    Triton kernels and pass the ops' first-use self-checks): (replay, the output tensor replay writes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph.replay, out


def eager_capture(run: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for cuda_capture off the GPU: replay runs the call again on the same buffers and writes the same
    output tensor, as a graph would."""
    out = run()
    return lambda: out.copy_(run()), out


class StaticStep:
    """One bucket's step inputs at fixed device addresses: views into one int32 buffer, loaded in one copy."""
    # what a padding row holds: token 0 at position 0, written nowhere (slot -1), seeing no key (length 0)
    PADDING = {"ids": 0, "positions": 0, "slots": -1, "seq_lens": 0}

    def __init__(self, batch: int, width: int, max_seq_len: int, device: torch.device):
        sizes = {"ids": batch, "positions": batch, "slots": batch, "seq_lens": batch, "starts": batch + 1,
                 "tables": batch * width}
        pinned = device.type == "cuda"
        self.host = torch.zeros(sum(sizes.values()), dtype=torch.int32, pin_memory=pinned)
        self.device = torch.zeros_like(self.host, device=device)
        self.batch, self.width, self._host_views = batch, width, {}
        views, offset = {}, 0
        for name, n in sizes.items():
            self._host_views[name] = self.host.numpy()[offset:offset + n]
            views[name] = self.device[offset:offset + n]
            offset += n
        self._host_views["starts"][:] = np.arange(batch + 1)  # one query per row, padding rows included
        self.ids = views["ids"]
        self.forward_batch = ForwardBatch(views["positions"], views["slots"], views["tables"].view(batch, width),
                                          views["seq_lens"], views["starts"], max_seq_len)

    def load(self, input_ids: np.ndarray, meta: StepMetadata) -> None:
        """The step's rows first, padding after: slot -1 (not written) and length 0 (sees no key, gives 0)."""
        n, host = len(meta.seq_lens), self._host_views
        given = {"ids": input_ids, "positions": meta.positions, "slots": meta.slot_mapping, "seq_lens": meta.seq_lens}
        for name, values in given.items():
            host[name][:n], host[name][n:] = values, self.PADDING[name]
        tables = host["tables"].reshape(self.batch, self.width)
        tables[:] = 0
        if n:
            rows = np.asarray(meta.block_tables, dtype=np.int32)  # [n, the step's width <= self.width]
            tables[:n, :rows.shape[1]] = rows
        # asynchronous from pinned memory: the engine reads the step's logits back before it loads the next
        # step, and that read waits for this copy, so the host buffer is never rewritten under a pending copy
        self.device.copy_(self.host, non_blocking=True)


class DecodeGraphs:
    """model.forward for the engine, with one-token-per-sequence steps replayed from CUDA graphs."""

    def __init__(self, model, kv_caches, *, block_size: int, max_batch: int, capture=cuda_capture):
        if model.config.is_xattn:
            raise ValueError("CUDA graphs cover spliced models (idefics3 / smolvlm / Llama); a cross-attention "
                             "model attends to per-request image K/V at every step")
        text = model.config.text
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.width = min(-(-text.max_position_embeddings // block_size), kv_caches[0][0].shape[0])
        self.batches = batch_buckets(max_batch)
        self.lengths = length_buckets(self.width * block_size)
        self.graphs: dict[tuple[int, int], tuple[StaticStep, Callable[[], None], torch.Tensor]] = {}
        self.replays = 0
        self.failed: str | None = None  # why capturing failed, after which every step runs eagerly
        self._pool = torch.cuda.graph_pool_handle() if capture is cuda_capture else None
        self._cos_sin = None  # the RoPE table every graph was captured with

    def forward(self, input_ids, meta: StepMetadata, kv_caches, images: list | None = None):
        """As model.forward: packed ids [T] -> hidden states [T, D] (a view the next replay overwrites)."""
        if self.failed is not None or not self.replayable(meta, kv_caches, images):
            return self.model.forward(input_ids, meta, kv_caches, images)
        n = len(meta.seq_lens)
        key = (self.batches[bisect_left(self.batches, n)], self.lengths[bisect_left(self.lengths, max(meta.seq_lens))])
        try:
            static, replay, hidden = self.graphs.get(key) or self._capture_bucket(*key)
        except Exception as e:  # noqa: BLE001  an op that cannot be captured (a host sync): decode stays eager
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"CUDA graphs are off for this engine: capturing the decode step failed ({self.failed}); "
                          "every step runs eagerly", RuntimeWarning, stacklevel=2)
            return self.model.forward(input_ids, meta, kv_caches, images)
        static.load(np.asarray(input_ids), meta)
        replay()
        self.replays += 1
        return hidden[:n]

    def replayable(self, meta: StepMetadata, kv_caches, images) -> bool:
        """One new token per sequence, no image features in the step, within the largest bucket, on the caches
        and RoPE table the graphs were captured with, and no per-launch sync (SMOLVLM_FAST_CUDA_SYNC=1)."""
        n = len(meta.seq_lens)
        return (0 < n <= self.batches[-1] and meta.query_start_loc == list(range(n + 1))
                and kv_caches is self.kv_caches and len(meta.block_tables[0]) <= self.width
                and not spliced_features(check_images(meta, images))
                and (self._cos_sin is None or self.model.text.cos_sin is self._cos_sin)
                and os.environ.get("SMOLVLM_FAST_CUDA_SYNC") != "1")

    def _capture_bucket(self, batch: int, max_len: int):
        text = self.model.text
        if self._cos_sin is None:  # grown once to the whole context: it never moves under a captured graph
            self._cos_sin = text.rope(self.model.config.text.max_position_embeddings)
        static = StaticStep(batch, self.width, max_len, self.model.device)
        static.load(np.zeros(0, dtype=np.int64), StepMetadata([], [], [[]], [], [0], []))  # all padding

        def run():
            return text(text.embed_tokens(static.ids), static.forward_batch, self.kv_caches)

        replay, hidden = self.capture(run, self._pool)
        self.graphs[(batch, max_len)] = (static, replay, hidden)
        return self.graphs[(batch, max_len)]
