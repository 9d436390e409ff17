"""Which tokens of which sequences run in the next step: continuous batching with chunked prefill.

Every step has a budget of max_num_batched_tokens tokens. Running sequences that decode go first (one token
each, oldest first), then the running sequences still in their prompt (a chunk each, as much as the budget and
the free blocks allow), then waiting sequences join (oldest first, a preempted one before the new ones) while
the budget, max_num_seqs and the cache allow. A waiting sequence that joins first takes the cached blocks of its
prompt's leading full blocks (prefix caching) and computes only the rest.

When a running sequence finds no free block, the newest running sequence is preempted: its blocks are freed
(the full ones stay in the prefix cache until evicted) and it goes back to the front of the queue with its
prompt and the tokens it has generated so far, to be computed again; its output goes on as if nothing happened.
The oldest sequence always makes progress, and a request never needs more than the whole cache (that is checked
when it is added), so every request finishes.

Plain Python, no torch. Sequences are engine.Sequence: seq_id, token_ids, num_computed, num_tokens,
num_prompt_tokens, num_cached_tokens, block_digests(), image_safe_end().
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..models.batch import StepMetadata
from .cache import PagedCache, step_metadata

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # tokens per step: bounds a step's time, so prefills never stall decodes long
    max_num_seqs: int = 64             # sequences running at once

    def __post_init__(self):
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(f"max_num_batched_tokens and max_num_seqs must be >= 1, got {self}")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens per sequence, in order
    meta: StepMetadata | None = None


class Scheduler:
    def __init__(self, cache: PagedCache, config: SchedulerConfig = SchedulerConfig()):
        self.cache, self.config = cache, config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order they joined: the last is the newest
        self.num_preemptions = 0
        self.cached_prompt_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues (its blocks are the caller's to free)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        step = _Step(self.config.max_num_batched_tokens)
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        preempted = self._schedule_running(step, decoding + prefilling)
        if not preempted:
            self._admit_waiting(step)
        if step.slots:
            step.batch.meta = step_metadata(self.cache, step.slots)
        return step.batch

    # -- running sequences
    def _schedule_running(self, step: _Step, seqs: list[Sequence]) -> bool:
        """Give each running sequence its next tokens; returns whether any sequence was preempted."""
        preempted = False
        for seq in seqs:
            if step.budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this step
                continue
            n, kind = self._chunk(seq, step)
            while n and self.cache.room(seq.seq_id) == 0:
                preempted = True
                victim = self._newest_unscheduled(step)
                self._preempt(victim)
                if victim is seq:
                    n = 0
            n = min(n, self.cache.room(seq.seq_id))
            if n:
                step.take(self.cache, seq, n, kind)
        return preempted

    def _newest_unscheduled(self, step: _Step) -> Sequence:
        return next(s for s in reversed(self.running) if s.seq_id not in step.slots)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first, to compute its prompt and output again (recompute preemption)."""
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        seq.features.clear()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- waiting sequences
    def _admit_waiting(self, step: _Step) -> None:
        while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = self._match_prefix(seq)
            n, kind = self._chunk(seq, step)
            if n == 0 or not self.cache.can_fit({seq.seq_id: n}):
                self.cache.free(seq.seq_id)  # give the prefix blocks back; it tries again next step
                seq.num_computed = 0
                return
            self.waiting.popleft()
            self.running.append(seq)
            if seq.num_cached_tokens is None:  # first admission (not after a preemption)
                seq.num_cached_tokens = hit
                self.cached_prompt_tokens += hit
            step.take(self.cache, seq, n, kind)

    def _match_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks of seq's leading full blocks. The last token is always computed again: its
        logits are what the sequence samples from."""
        full = (seq.num_tokens - 1) // self.cache.block_size
        digests = seq.block_digests(full, self.cache.block_size) if self.cache.allocator.enable_caching else []
        seq.num_computed = self.cache.match_prefix(seq.seq_id, digests)
        return seq.num_computed

    def _chunk(self, seq: Sequence, step: _Step) -> tuple[int, str | None]:
        """(tokens seq may run in this step, the step's image kind with them)."""
        start = seq.num_computed
        end, kind = seq.image_safe_end(start, min(seq.num_tokens, start + step.budget), step.image_kind)
        return end - start, kind


class _Step:
    """The step being built: the sequences taken so far, their slots, what is left of the budget."""

    def __init__(self, budget: int):
        self.budget, self.image_kind = budget, None
        self.batch = ScheduledBatch()
        self.slots: dict[int, list[int]] = {}

    def take(self, cache: PagedCache, seq: Sequence, n: int, kind: str | None) -> None:
        self.slots[seq.seq_id] = cache.append(seq.seq_id, n)
        self.batch.seqs.append(seq)
        self.batch.num_tokens.append(n)
        self.budget -= n
        self.image_kind = kind
