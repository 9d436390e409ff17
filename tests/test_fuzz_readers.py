"""Property-based fuzzing of the GGUF and safetensors readers (hypothesis, derandomized: CI sees the same examples
every run). Valid small files (tests/hostile_files.py) get integer header fields set to edge values (0, 2**31,
2**63-1, 2**64-1, lengths past the file...), JSON fields set to hostile values, byte flips, insertions and
truncations. Every read must either succeed or raise CheckpointError from our own checks, and allocate at most
4x the file size + 1 MB. `python bench/fuzz_readers.py --iterations 100000` runs the same mutations far longer.

No hang: every loop in the readers' header walks is bounded by a count checked against the bytes left in the file.
"""
from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolvlm_fast.errors import CheckpointError
from tests.hostile_files import (EDGE_INTS, LIMITS, MISSED_BY_CHECKS, gguf_fields, mutate_gguf, mutate_safetensors,
                                 read_gguf_everything, read_safetensors_everything, safetensors_bytes,
                                 safetensors_parts)

FUZZ = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GGUF_FIELDS = gguf_fields()
GGUF_VALID = GGUF_FIELDS.to_bytes()
INT_FIELDS = GGUF_FIELDS.int_fields()
HEADER, DATA = safetensors_parts()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder for the mutated files; the valid ones are read once first, so lazy imports are not counted."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "valid.gguf").write_bytes(GGUF_VALID)
    read_gguf_everything(folder / "valid.gguf")
    (folder / "valid.safetensors").write_bytes(safetensors_bytes(HEADER, DATA))
    read_safetensors_everything(folder / "valid.safetensors")
    return folder


def read_safely(read, path, data: bytes) -> None:
    """read(path) succeeds or raises our CheckpointError, within the memory bound."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        read(path)
    except CheckpointError as e:
        assert not any(m in str(e) for m in MISSED_BY_CHECKS), f"a library caught what our checks missed: {e}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= 4 * len(data) + 2**20, f"{peak} bytes allocated reading a {len(data)}-byte file"


field_lies = st.lists(st.tuples(st.sampled_from(INT_FIELDS),
                                st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, 2**64 - 1))),
                      min_size=1, max_size=3)


@FUZZ
@given(lies=field_lies)
def test_gguf_header_field_lies(workdir, lies):
    data = bytearray(GGUF_VALID)
    for (pos, _, fmt), value in lies:
        struct.pack_into("<" + fmt.upper(), data, pos, value % LIMITS[fmt])
    read_safely(read_gguf_everything, workdir / "lie.gguf", bytes(data))


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_gguf_random_mutations(workdir, rng):
    read_safely(read_gguf_everything, workdir / "mutant.gguf", mutate_gguf(rng, GGUF_FIELDS, GGUF_VALID))


json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.integers(-2**70, 2**70) | st.floats() |
    st.sampled_from(["F32", "BF16", "F8_E4M3", "", "__metadata__"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["dtype", "shape", "data_offsets", "format"]), children, max_size=3),
    max_leaves=8)


@FUZZ
@given(name=st.sampled_from(sorted(HEADER)), field=st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]),
       value=json_values)
def test_safetensors_header_field_lies(workdir, name, field, value):
    header = {**HEADER, name: value if field is None else {**HEADER[name], field: value}}
    read_safely(read_safetensors_everything, workdir / "lie.safetensors",
                safetensors_bytes(_json(header), DATA))


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_safetensors_random_mutations(workdir, rng):
    read_safely(read_safetensors_everything, workdir / "mutant.safetensors", mutate_safetensors(rng, HEADER, DATA))


def _json(header: dict) -> str:
    import json

    return json.dumps(header)  # NaN and Infinity stay in: Python writes them, the readers must refuse them
