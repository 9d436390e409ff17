"""How many KV-cache blocks an engine gets when the caller does not say: a fraction of the memory the device has
free once the weights are loaded (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable), never more than max_num_seqs
sequences of the model's whole context need. The caller may fix it instead (num_blocks= or kv_cache_bytes=).
The choice is logged, one line, with where it came from."""
from __future__ import annotations

import logging

from ..errors import InputError

# What the KV cache may take of the free memory. The rest is for the step's activations and the vision encoder
# (and, on CUDA, the allocator's slack); the host also runs the process's other work and other processes.
CUDA_FRACTION = 0.8
HOST_FRACTION = 0.25
FALLBACK_BYTES = 1 << 30  # when the free memory cannot be read

log = logging.getLogger("smolvlm_fast.engine")


def block_bytes(model, backend, block_size: int) -> int:
    """The bytes of one block: K and V of block_size tokens in every decoder layer."""
    t = model.config.text
    return 2 * t.num_hidden_layers * block_size * t.num_key_value_heads * t.head_dim * backend.kv_itemsize(model)


def choose_num_blocks(model, backend, block_size: int, max_num_seqs: int, num_blocks: int | None = None,
                      kv_cache_bytes: int | None = None) -> int:
    """num_blocks as given; else as many blocks as kv_cache_bytes (default: a fraction of the free memory) hold,
    at most enough for max_num_seqs whole contexts and at least one."""
    per_block = block_bytes(model, backend, block_size)
    if num_blocks is not None:
        if num_blocks < 1:
            raise InputError(f"num_blocks must be >= 1, got {num_blocks}")
        source = "num_blocks="
    else:
        if kv_cache_bytes is not None:
            budget, source = kv_cache_bytes, "kv_cache_bytes="
        else:
            budget, source = free_memory_budget(model, backend)
        most = max_num_seqs * -(-model.config.text.max_position_embeddings // block_size)
        num_blocks = max(1, min(budget // per_block, most))
        if num_blocks == most:
            source += f", capped at {max_num_seqs} sequences (max_num_seqs) of the whole context"
    log.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%s)", num_blocks, block_size,
             num_blocks * block_size, num_blocks * per_block / 2**20, source)
    return num_blocks


def free_memory_budget(model, backend) -> tuple[int, str]:
    """(bytes the KV cache may take, a note saying how that was found)."""
    free, where = backend.free_memory(model)
    if free is None:
        return FALLBACK_BYTES, f"{where} free memory unknown: {FALLBACK_BYTES >> 20} MiB"
    fraction = CUDA_FRACTION if where == "cuda" else HOST_FRACTION
    return int(free * fraction), f"{fraction:.0%} of the {free / 2**20:,.0f} MiB of {where} memory free"
