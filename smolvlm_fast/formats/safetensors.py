"""Read Hugging Face safetensors checkpoints (single file or sharded with an index): into torch tensors through the
safetensors library, or with NumPy alone (no torch, no safetensors library) for the PyTorch-free path.

Format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}, ...,
"__metadata__": {str: str}}, then the data buffer. Offsets are relative to the buffer, and the tensors tile it
exactly, in order, from 0 to its end. The NumPy reader memory-maps the file: tensors are read-only views into it
(BF16, which NumPy lacks, becomes float32: the 16 bits are the high half of a float32, so the conversion is exact).

Files come from strangers, so every rule is checked against the file's size before anything is mapped or allocated;
check_safetensors guards both paths with the same errors.
"""
from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

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

    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:  # never seen after check_safetensors; the fuzz tests look for this message
        raise CheckpointError(f"{path}: the safetensors library refused a checked file ({e})") from None


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library enforces
INT64_MAX = 2**63 - 1
MAX_DIMS = 32  # NumPy 1.x's limit (2.x allows 64); real checkpoints use at most 5

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def read_safetensors(path: str | Path, bf16: Callable[[str, np.ndarray], object] | None = None) -> dict:
    """Every tensor of one safetensors file, by name: views of the memory-mapped file (BF16 as float32 copies, or
    what bf16(name, bits) makes of its uint16 bit patterns: a loader that keeps bf16 never holds the float32).
    Once a BF16 tensor has been copied out, its pages of the file are let go (MADV_DONTNEED): they would otherwise
    stay resident in this process until the mapping closes, a second copy of the checkpoint in its peak memory."""
    path = Path(path)
    buffer, entries = _open(path)
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        raw = buffer[start:end].view(DTYPES[dtype]).reshape(shape)
        if dtype != "BF16":
            tensors[name] = raw
            continue
        tensors[name] = out = bf16(name, raw) if bf16 is not None else bf16_to_float32(raw)
        if not _is_view_of(out, buffer):
            _release(buffer, start, end)
    return tensors


def _is_view_of(obj, buffer: np.ndarray) -> bool:
    """Whether obj (an array, or a wrapper holding one in .bits) reads buffer's memory."""
    a = getattr(obj, "bits", obj)
    return isinstance(a, np.ndarray) and np.shares_memory(a, buffer)


def _release(buffer: np.ndarray, start: int, end: int) -> None:
    """Drop the whole pages of buffer[start:end] from this process's resident set (read-only file pages: a later
    read faults them back in from the page cache)."""
    mm = buffer.base.obj if isinstance(buffer.base, memoryview) else buffer.base
    if not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    offset = buffer.ctypes.data - np.frombuffer(mm, dtype=np.uint8).ctypes.data  # the data section's start
    page = mmap.PAGESIZE
    lo, hi = -(-(offset + start) // page) * page, (offset + end) // page * page
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def load_checkpoint_numpy(model_dir: str | Path, bf16: Callable[[str, np.ndarray], object] | None = None) -> dict:
    """All tensors of a checkpoint directory (model.safetensors, or the shards its index lists); bf16: as in
    read_safetensors."""
    tensors: dict = {}
    for path in checkpoint_files(Path(model_dir)):
        for name, array in read_safetensors(path, bf16).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} is also in another shard")
            tensors[name] = array
    return tensors


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (the bits become the high half of each float32: exact)."""
    bits = raw.astype(np.uint32)
    bits <<= 16  # in place: the peak stays at one float32 copy
    return bits.view(np.float32)


def check_safetensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Every rule of the format checked, nothing mapped: name -> (dtype, shape, start, end) in the data buffer."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)[1]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e.strerror or e})") from None


def _open(path: Path) -> tuple[np.ndarray, dict]:
    """(the data buffer as a read-only uint8 array over the memory-mapped file, the checked entries)."""
    try:
        with open(path, "rb") as f:
            n, entries = _read_header(f, path)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e.strerror or e})") from None
    return np.frombuffer(mm, dtype=np.uint8, offset=8 + n), entries


def _read_header(f, path: Path) -> tuple[int, dict]:
    """(header length, checked entries), the length bounded by the limit and the file size before it is read."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header length (8 bytes)")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
    return n, _entries(_parse_header(f.read(n), path), size - 8 - n, path)


def _parse_header(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: header has the key {_short(e.args[0])} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also ints past Python's digit limit
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header


def _no_constant(name: str):
    """NaN and Infinity are Python's JSON extensions, not JSON: the safetensors library refuses them, and so do we."""
    raise ValueError(f"{name} is not JSON")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys; a second entry for one tensor is a lie, so refuse it."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _entries(header: dict, data_size: int, path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, start, end), every rule of the format checked."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    entries = {name: _entry(name, info, path) for name, info in header.items() if name != "__metadata__"}
    position = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if start != position:
            what = "overlaps the previous tensor" if start < position else f"leaves a gap after byte {position}"
            raise CheckpointError(f"{path}: tensor {_cut(name)}: data_offsets [{start}, {end}] {what}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {_cut(name)}: data_offsets [{start}, {end}] run past the end of "
                                  f"the {data_size}-byte data buffer (truncated?)")
        position = end
    if position != data_size:
        raise CheckpointError(f"{path}: the tensors cover {position} bytes but the data buffer has {data_size}")
    return entries


def _entry(name: str, info, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    where = f"{path}: tensor {_cut(name)}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry must be an object with dtype, shape and data_offsets")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise CheckpointError(f"{where}: missing field {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: dtype {_short(dtype)} is not supported (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {_short(shape)} must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"{where}: shape has {len(shape)} dims, the limit is {MAX_DIMS}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} must be [begin, end] with 0 <= begin <= end")
    span = offsets[1] - offsets[0]
    n_bytes = _n_bytes(shape, DTYPES[dtype].itemsize)
    if n_bytes is None:
        raise CheckpointError(f"{where}: shape {_short(shape)} of {dtype}: the byte count overflows int64")
    if span != n_bytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} hold {span} bytes but shape {_short(shape)} of "
                              f"{dtype} needs {n_bytes}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _n_bytes(shape: list[int], itemsize: int) -> int | None:
    """product(shape) * itemsize, or None when the dims other than 0 multiply past int64 (NumPy refuses such a
    shape even with a 0 in it)."""
    n = math.prod(d or 1 for d in shape) * itemsize
    return None if n > INT64_MAX else 0 if 0 in shape else n


def _short(value) -> str:
    return _cut(repr(value))


def _cut(text: str) -> str:
    """Text for a message, cut: a hostile header's name or field may be megabytes long."""
    return text if len(text) <= 200 else text[:200] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
