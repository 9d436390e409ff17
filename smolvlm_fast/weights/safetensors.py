"""Read Hugging Face safetensors checkpoints (single file or sharded with an index) into torch tensors."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError
from .hub import PICKLE_REFUSAL, PICKLE_SUFFIXES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checking the index when there is one."""
    index = model_dir / INDEX_NAME
    if index.exists():
        files = [model_dir / name for name in _shard_names(index)]
    elif (model_dir / SINGLE_NAME).exists():
        files = [model_dir / SINGLE_NAME]
    else:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: {PICKLE_REFUSAL})" if pickles else ""
        raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in {INDEX_NAME} is missing")
    return files


def _shard_names(index: Path) -> list[str]:
    """The shard file names an index lists: plain .safetensors names in its own folder (no '../', no pickles)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must be an object of file names")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: weight_map names {name!r}: shards must be .safetensors files beside the index")
    return names


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield (name, tensor) one tensor at a time, so a checkpoint is never held twice in memory."""
    for path in checkpoint_files(model_dir):
        yield from iter_safetensors_file(path)


def iter_safetensors_file(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """One file's tensors. Our own header check runs first: the library enforces the same rules, but this way a
    bad file gets the same message on the torch path as on the NumPy path."""
    from safetensors import SafetensorError, safe_open

    from .safetensors_numpy import check_safetensors  # imports this module: import it late

    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:  # never seen after check_safetensors; the fuzz tests look for this message
        raise CheckpointError(f"{path}: the safetensors library refused a checked file ({e})") from None
