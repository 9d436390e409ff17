"""StepMetadata: all a model sees of the requests in one forward step (positions, cache slots, block tables, lengths),
as plain lists; the engine builds it, the models read it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepMetadata:
    """What one forward step needs to know about the cache, as plain lists (the runner makes tensors)."""
    positions: list[int]          # [T] position of each packed token in its sequence
    slot_mapping: list[int]       # [T] where each token's K/V are written
    block_tables: list[list[int]]  # [num_seqs, max_blocks], padded with 0
    seq_lens: list[int]           # [num_seqs] cached tokens per sequence, the new ones included
    query_start_loc: list[int]    # [num_seqs + 1] cumulative new-token counts
    last_token_indices: list[int]  # [num_seqs] index in the packed tokens of each sequence's last token


def cross_spans(meta: StepMetadata, cross_kv: list | None) -> list | None:
    """For cross-attention models: (first packed row, rows, its image K/V) of each sequence of the step that has
    images (cross_kv holds one entry per sequence, None for a text-only one), or None when no sequence has."""
    if not cross_kv or all(kv is None for kv in cross_kv):
        return None
    starts = meta.query_start_loc
    return [(starts[s], starts[s + 1] - starts[s], kv) for s, kv in enumerate(cross_kv) if kv is not None]
