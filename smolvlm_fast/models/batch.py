"""What a model sees of the requests in one forward step: StepMetadata (positions, cache slots, block tables, lengths,
as plain lists) and, per sequence, its SequenceImages. The engine builds them, the models read them; a model never
sees a request.

A model decides itself how images reach the text: a spliced model (idefics3 / smolvlm) takes the features of the
step's <image> tokens (`spliced_features`), a cross-attention model (the factorized variant) derives image K/V once
per sequence from all of its images (`derived_per_sequence`) and attends to them at every step."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError


@dataclass
class StepMetadata:
    """What one forward step needs to know about the cache, as plain lists (the runner makes tensors)."""
    positions: list[int]          # [T] position of each packed token in its sequence
    slot_mapping: list[int]       # [T] where each token's K/V are written
    block_tables: list[list[int]]  # [num_seqs, max_blocks], padded with 0
    seq_lens: list[int]           # [num_seqs] cached tokens per sequence, the new ones included
    query_start_loc: list[int]    # [num_seqs + 1] cumulative new-token counts
    last_token_indices: list[int]  # [num_seqs] index in the packed tokens of each sequence's last token


@dataclass(eq=False)
class SequenceImages:
    """One sequence's images as a forward step takes them.

    Features are fetched per image on first need (`feature_of`: the engine runs the vision encoder or reads its
    cache then), so a chunk that reaches no image encodes none. `rows` are the feature rows, counted over all the
    sequence's images in order, that this step's <image> tokens take; the engine sets them before each step.
    `kept` is what a model derived from the images and keeps with the sequence until it ends (cross-attention
    K/V); once it is set the features themselves are not needed any more."""
    spans: tuple[tuple[int, int], ...] = ()          # per image, its rows [start, end) among the sequence's
    feature_of: Callable[[int], Any] | None = None   # image index -> its features [end - start, D]
    rows: tuple[int, int] = (0, 0)
    kept: Any = None

    @classmethod
    def of(cls, features) -> "SequenceImages":
        """A sequence whose image features [n, D] (all its images, in order) come at once, every row in this step."""
        n = int(features.shape[0])
        return cls(spans=((0, n),), feature_of=lambda _: features, rows=(0, n))

    def step_features(self) -> list:
        """The features of this step's rows, one slice per image that they touch (in order)."""
        f0, f1 = self.rows
        return [self.feature_of(i)[max(f0, start) - start:min(f1, end) - start]
                for i, (start, end) in enumerate(self.spans) if start < f1 and end > f0]

    def all_features(self) -> list:
        return [self.feature_of(i) for i in range(len(self.spans))]


def check_images(meta: StepMetadata, images: list | None) -> list:
    """The step's images, one entry per sequence (None: it has none); [None, ...] when none are given."""
    if images is None:
        return [None] * len(meta.seq_lens)
    if len(images) != len(meta.seq_lens):
        raise InputError(f"images has {len(images)} entries for a step of {len(meta.seq_lens)} sequences")
    return list(images)


def spliced_features(images: list) -> list:
    """A spliced model's input: the features of the step's <image> tokens, in packed order (empty: none)."""
    return [f for im in images if im is not None for f in im.step_features()]


def derived_per_sequence(images: list, derive: Callable[[list], Any]) -> list:
    """A cross-attention model's input: per sequence, what derive(all its image features) gives, computed at its
    first step and kept with it (None for a sequence without images)."""
    for im in images:
        if im is not None and im.kept is None:
            im.kept = derive(im.all_features())
    return [None if im is None else im.kept for im in images]


def cross_spans(meta: StepMetadata, cross_kv: list | None) -> list | None:
    """For cross-attention models: (first packed row, rows, its image K/V) of each sequence of the step that has
    images (cross_kv holds one entry per sequence, None for a text-only one), or None when no sequence has."""
    if not cross_kv or all(kv is None for kv in cross_kv):
        return None
    starts = meta.query_start_loc
    return [(starts[s], starts[s + 1] - starts[s], kv) for s, kv in enumerate(cross_kv) if kv is not None]
