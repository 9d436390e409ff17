"""Read Hugging Face safetensors checkpoints (single file or sharded with an index) into torch tensors."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checking the index when there is one."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_NAME).exists():
        files = [model_dir / SINGLE_NAME]
    else:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded, convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in {INDEX_NAME} is missing")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield (name, tensor) one tensor at a time, so a checkpoint is never held twice in memory."""
    from safetensors import SafetensorError, safe_open

    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated?") from None
