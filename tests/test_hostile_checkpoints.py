"""Hostile checkpoints: a valid small file with one field made to lie, one case per rule of each format.

The readers must answer every lie with a CheckpointError naming the file and the field; nothing else may escape
(no MemoryError, struct.error, numpy or library error), and no library error may be merely re-worded (the readers'
last-resort messages, hostile_files.MISSED_BY_CHECKS, mean our own checks missed the lie).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("gguf")  # the hostile GGUF files are written with its types (and the reader under test needs it)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

from smolvlm_fast.errors import CheckpointError  # noqa: E402
from smolvlm_fast.formats import hub  # noqa: E402
from smolvlm_fast.formats.gguf_reader import INT64_MAX, MAX_ARRAY_ELEMENTS  # noqa: E402
from smolvlm_fast.formats.safetensors import iter_safetensors, iter_safetensors_file  # noqa: E402
from smolvlm_fast.formats.safetensors import load_checkpoint_numpy, read_safetensors  # noqa: E402
from tests.hostile_files import (MERGES, MISSED_BY_CHECKS, TOKENS, RawArray, gguf_fields, gguf_kvs, gguf_tensors,  # noqa: E402
                                 read_gguf_everything, safetensors_bytes, safetensors_parts)


def assert_refused(read, path, pattern: str) -> None:
    with pytest.raises(CheckpointError) as error:
        read(path)
    message = str(error.value)
    assert str(path) in message
    assert re.search(pattern, message), message
    assert not any(m in message for m in MISSED_BY_CHECKS), message


# --- GGUF ---------------------------------------------------------------------------------------------------------

Q_W, DOWN = "blk.0.attn_q.weight", "blk.0.ffn_down.weight"
VALID = gguf_fields()
FILE_SIZE = len(VALID.to_bytes())


def kv(key: str, part: str) -> str:
    return f"kv:{key}.{part}"


def tensor(name: str, part: str) -> str:
    return f"tensor:{name}.{part}"


def offset_of(name: str) -> int:
    return next(value for label, _, value in VALID if label == tensor(name, "offset"))


def with_kvs(*changes: tuple[str, object, object], drop: str | None = None) -> bytes:
    """The valid file with key-values added (or replaced, by key) and one dropped; counts stay consistent."""
    kvs = [item for item in gguf_kvs() if item[0] != drop]
    for key, vtype, value in changes:
        kvs = [item if item[0] != key else (key, vtype, value) for item in kvs]
        kvs += [] if any(item[0] == key for item in kvs) else [(key, vtype, value)]
    return gguf_fields(kvs).to_bytes()


# in place: {field label: lying value}; whole files: bytes
GGUF_CASES = {
    "magic": (gguf_fields(magic=b"GGML").to_bytes(), r"not a GGUF file"),
    "version 1": ({"version": 1}, r"version 1 is not supported \(only 2 and 3\)"),
    "version 4": ({"version": 4}, r"version 4 is not supported"),
    "version byte-swapped": ({"version": 3 << 24}, r"version 50331648 is not supported"),
    "n_kv 2**64-1": ({"n_kv": 2**64 - 1}, r"n_kv 18446744073709551615 needs at least \d+ bytes but only \d+ remain"),
    "n_kv 2**31": ({"n_kv": 2**31}, r"n_kv 2147483648 needs at least"),
    "n_tensors 2**63-1": ({"n_tensors": INT64_MAX}, r"n_tensors 9223372036854775807 needs at least"),
    "n_tensors one more": ({"n_tensors": 12}, r"tensor 11"),
    "key length 2**64-1": ({kv("general.architecture", "key.len"): 2**64 - 1}, r"metadata key 0: length \d+ needs"),
    "key length past the file": ({kv("general.architecture", "key.len"): FILE_SIZE}, r"metadata key 0: length"),
    "string length 2**63": ({kv("general.architecture", "value.len"): 2**63},
                            r"metadata key 0 'general.architecture': value: length 9223372036854775808 needs"),
    "array length 2**62": ({kv("tokenizer.ggml.tokens", "n"): 2**62},
                           r"'tokenizer.ggml.tokens': array length 4611686018427387904 needs at least"),
    "array string length 2**64-1": ({"kv:tokenizer.ggml.tokens[3].len": 2**64 - 1},
                                    r"'tokenizer.ggml.tokens'\[3\]: length \d+ needs"),
    "array string not UTF-8": ({"kv:tokenizer.ggml.tokens[3]": b"\xff"}, r"'tokenizer.ggml.tokens'\[3\]: not valid UTF-8"),
    "value type 13": ({kv("general.architecture", "type"): 13}, r"'general.architecture': value type 13 is unknown"),
    "value type 2**32-1": ({kv("llama.block_count", "type"): 2**32 - 1}, r"'llama.block_count': value type \d+ is unknown"),
    "element type 99": ({kv("tokenizer.ggml.merges", "elem_type"): 99},
                        r"'tokenizer.ggml.merges': array element: value type 99 is unknown"),
    "array of arrays": ({kv("tokenizer.ggml.merges", "elem_type"): int(V.ARRAY)}, r"arrays of arrays are not supported"),
    "string key as u64": ({kv("general.architecture", "type"): int(V.UINT64)},
                          r"'general.architecture': value type UINT64 does not fit \(expected STRING\)"),
    "tokens as int32s": ({kv("tokenizer.ggml.tokens", "elem_type"): int(V.INT32)},
                         r"'tokenizer.ggml.tokens': value type ARRAY of INT32 does not fit \(expected ARRAY of STRING\)"),
    "alignment as int32": ({kv("general.alignment", "type"): int(V.INT32)}, r"'general.alignment': value type INT32"),
    "alignment 48": ({kv("general.alignment", "value"): 48}, r"'general.alignment' 48 is not a power of two"),
    "alignment 0": ({kv("general.alignment", "value"): 0}, r"'general.alignment' 0 is not a power of two"),
    "key not UTF-8": (gguf_fields([(b"\xff\xfe", V.UINT32, 1)] + gguf_kvs()).to_bytes(), r"metadata key 0: not valid UTF-8"),
    "string not UTF-8": ({kv("general.architecture", "value"): b"\xffllam"}, r"'general.architecture': value: not valid UTF-8"),
    "duplicate key": (gguf_fields(gguf_kvs() + [("llama.block_count", V.UINT32, 1)]).to_bytes(),
                      r"metadata key 20 'llama.block_count': duplicate key"),
    "too many array elements": (with_kvs(("x.big", (V.ARRAY, V.UINT8), bytes(MAX_ARRAY_ELEMENTS + 1))),
                                rf"'x.big': array length {MAX_ARRAY_ELEMENTS + 1} passes the limit"),
    "duplicate tensor name": (gguf_fields(tensors=gguf_tensors() + gguf_tensors()[1:2]).to_bytes(),
                              r"tensor 11 'output_norm.weight': duplicate tensor name"),
    "tensor name 64 bytes": (gguf_fields(tensors=[("n" * 64, Q.F32, [2], bytes(8))]).to_bytes(),
                             r"tensor 0 'n+': name is 64 bytes, the limit is 63"),
    "tensor name not UTF-8": ({tensor(Q_W, "name"): b"\xc3" + Q_W.encode()[1:]}, r"tensor 4: name: not valid UTF-8"),
    "n_dims 0": ({tensor(Q_W, "n_dims"): 0}, rf"tensor 4 '{Q_W}': n_dims 0 out of range 1..4"),
    "n_dims 9": ({tensor(Q_W, "n_dims"): 9}, rf"tensor 4 '{Q_W}': n_dims 9 out of range 1..4"),
    "n_dims 2**32-1": ({tensor(Q_W, "n_dims"): 2**32 - 1}, r"n_dims 4294967295 out of range"),
    "dim negative": ({tensor(Q_W, "dim1"): 2**64 - 1}, rf"tensor 4 '{Q_W}': dims \[32, \d+\]: a dim is negative as int64"),
    "dims overflow int64": ({tensor(Q_W, "dim0"): 2**32, tensor(Q_W, "dim1"): 2**32},
                            r"dims \[4294967296, 4294967296\]: the element count overflows int64"),
    "a 0 dim beside a huge one": ({tensor(DOWN, "dim0"): 0, tensor(DOWN, "dim1"): 2**62}, r"overflows int64"),
    "row not whole blocks": ({tensor(Q_W, "dim0"): 33}, rf"'{Q_W}': row length 33 is not a multiple of Q8_0's block size 32"),
    "type unknown": ({tensor(Q_W, "type"): 4}, rf"'{Q_W}': type 4 is unknown"),  # Q4_2, removed from ggml
    "type 2**32-1": ({tensor(Q_W, "type"): 2**32 - 1}, r"type 4294967295 is unknown"),
    "type Q5_0": ({tensor(Q_W, "type"): int(Q.Q5_0)}, rf"'{Q_W}': type Q5_0 is not supported \(only F32, F16"),
    "type BF16": ({tensor(Q_W, "type"): int(Q.BF16)}, r"type BF16 is not supported"),
    "offset not aligned": ({tensor(Q_W, "offset"): offset_of(Q_W) + 2}, r"data offset \d+ is not a multiple of general.alignment 32"),
    "offset overlaps": ({tensor(Q_W, "offset"): 0}, rf"'{Q_W}': data offset 0 overlaps the previous tensor"),
    "offset leaves a gap": ({tensor(Q_W, "offset"): offset_of(Q_W) + 32}, r"leaves a gap after the previous tensor"),
    "offset 2**64-32": ({tensor(Q_W, "offset"): 2**64 - 32}, r"data offset 18446744073709551584 leaves a gap"),
    "data past the end": ({tensor(DOWN, "dim1"): 2**20}, rf"'{DOWN}': data \[\d+, \d+\) runs past the end of the "
                                                        rf"{FILE_SIZE}-byte file"),
    "truncated in the header": (VALID.to_bytes()[:300], r"300-byte file|truncated\?"),
    "truncated in the tensor infos": (VALID.to_bytes()[:1700], r"tensor \d+.*truncated\?"),
    "truncated in the data": (VALID.to_bytes()[:-100], rf"'{DOWN}': data .* runs past the end .*truncated\?"),
    # what the header says the model is: sizes size loops and arrays, so they are bounded too
    "block_count 2**31": ({kv("llama.block_count", "value"): 2**31}, r"llama.block_count is 2147483648, expected an integer"),
    "block_count 1000": ({kv("llama.block_count", "value"): 1000}, r"llama.block_count 1000 but the file holds only 11"),
    "head_count 0": ({kv("llama.attention.head_count", "value"): 0}, r"llama.attention.head_count is 0, expected"),
    "head_count_kv 0": ({kv("llama.attention.head_count_kv", "value"): 0}, r"head_count_kv is 0, expected"),
    "bos id not a token": ({kv("tokenizer.ggml.bos_token_id", "value"): 999}, r"tokenizer.ggml.bos_token_id 999 is not"),
    "merge of unknown tokens": (with_kvs(("tokenizer.ggml.merges", (V.ARRAY, V.STRING), ["q z"])),
                                r"the tokenizer in tokenizer.ggml.\* cannot be built"),
    "no tokens": (with_kvs(drop="tokenizer.ggml.tokens"), r"missing metadata field tokenizer.ggml.tokens"),
}


def test_the_valid_gguf_loads(tmp_path):
    path = tmp_path / "valid.gguf"
    path.write_bytes(VALID.to_bytes())
    read_gguf_everything(path)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_hostile_gguf(tmp_path, case):
    lie, pattern = GGUF_CASES[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(lie if isinstance(lie, bytes) else VALID.to_bytes(lie))
    assert_refused(read_gguf_everything, path, pattern)


# what reading a file costs: the crafted arrays the rules allow at their largest, read by every consumer. gguf's
# GGUFReader kept ~1 KB of Python objects per element (8 MB of empty strings cost 1.5 GB); ours keeps the numbers'
# bytes and 8 bytes of offset per string. Measured as the peak resident memory of a fresh process (Python, NumPy and
# the tokenizers library alike), past what reading the valid file first took.
PEAK_SCRIPT = """
import resource, sys
from tests.hostile_files import read_gguf_everything
read_gguf_everything(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
read_gguf_everything(sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
ELEMENTS_LEFT = MAX_ARRAY_ELEMENTS - 2 * len(TOKENS) - len(MERGES)  # the valid file's tokens, types and merges
BIGGEST_ARRAYS = {
    "a million empty strings": (V.STRING, bytes(8 * ELEMENTS_LEFT)),  # 8 bytes each: a length of 0
    "a million uint64s": (V.UINT64, bytes(8 * ELEMENTS_LEFT)),
}


@pytest.mark.skipif(sys.platform not in ("linux", "darwin"), reason="ru_maxrss")
@pytest.mark.parametrize("case", list(BIGGEST_ARRAYS))
def test_reading_costs_a_small_multiple_of_the_file(tmp_path, case):
    etype, data = BIGGEST_ARRAYS[case]
    valid, crafted = tmp_path / "valid.gguf", tmp_path / "crafted.gguf"
    valid.write_bytes(VALID.to_bytes())
    biggest = ("x.big", (V.ARRAY, etype), RawArray(ELEMENTS_LEFT, data))
    crafted.write_bytes(gguf_fields(gguf_kvs() + [biggest]).to_bytes())
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(valid), str(crafted)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout) * (1 if sys.platform == "darwin" else 1024)  # Linux counts KiB
    size = crafted.stat().st_size
    assert growth <= 4 * size + 16 * 2**20, f"{growth / 2**20:.0f} MB resident reading a {size / 2**20:.0f} MB file"


# --- safetensors --------------------------------------------------------------------------------------------------

HEADER, DATA = safetensors_parts()
TEXT = json.dumps(HEADER)


def entry(name: str, **fields) -> dict:
    return {**HEADER, name: {**HEADER[name], **fields}}


SAFETENSORS_CASES = {
    "header length over 100 MB": (safetensors_bytes(HEADER, DATA, length=100 * 2**20 + 1), r"header length 104857601 exceeds"),
    "header length 2**64-1": (safetensors_bytes(HEADER, DATA, length=2**64 - 1), r"header length \d+ exceeds"),
    "header length past the file": (safetensors_bytes(HEADER, b"", length=len(TEXT) + 1), r"runs past the end"),
    "too short": (b"\x01\x02", r"too short for a safetensors header length"),
    "header a list": (safetensors_bytes("[1, 2]"), r"header is a JSON list, expected an object"),
    "header not UTF-8": (safetensors_bytes(b"\xff{}"), r"header is not valid UTF-8 JSON"),
    "duplicate key": (safetensors_bytes(TEXT[:-1] + ', "a.weight": ' + json.dumps(HEADER["a.weight"]) + "}", DATA),
                      r"header has the key 'a.weight' twice"),
    "NaN": (safetensors_bytes(TEXT.replace("[4, 3]", "[NaN, 3]"), DATA), r"not valid UTF-8 JSON .*NaN is not JSON"),
    "nested 100000 deep": (safetensors_bytes("[" * 100000 + "]" * 100000), r"header is not valid UTF-8 JSON"),
    "a 5000-digit integer": (safetensors_bytes(TEXT.replace("[4, 3]", f"[{'9' * 5000}, 3]"), DATA), r"not valid UTF-8 JSON"),
    "metadata not strings": (safetensors_bytes({**HEADER, "__metadata__": {"n": 1}}, DATA), r"__metadata__ must be"),
    "metadata a list": (safetensors_bytes({**HEADER, "__metadata__": ["x"]}, DATA), r"__metadata__ must be"),
    "entry a number": (safetensors_bytes({**HEADER, "a.weight": 7}, DATA), r"tensor a.weight: entry must be an object"),
    "dtype missing": (safetensors_bytes({**HEADER, "a.weight": {"shape": [4, 3], "data_offsets": [0, 48]}}, DATA),
                      r"tensor a.weight: missing field 'dtype'"),
    "dtype unknown": (safetensors_bytes(entry("a.weight", dtype="F128"), DATA), r"tensor a.weight: dtype 'F128' is not supported"),
    "dtype a list": (safetensors_bytes(entry("a.weight", dtype=["F32"]), DATA), r"tensor a.weight: dtype \['F32'\] is not"),
    "shape a string": (safetensors_bytes(entry("a.weight", shape="4, 3"), DATA), r"tensor a.weight: shape .* non-negative"),
    "shape negative": (safetensors_bytes(entry("a.weight", shape=[-4, -3]), DATA), r"tensor a.weight: shape .* non-negative"),
    "shape of bools": (safetensors_bytes(entry("a.weight", shape=[True, 3]), DATA), r"tensor a.weight: shape .* non-negative"),
    "shape of 33 dims": (safetensors_bytes(entry("a.weight", shape=[1] * 33), DATA), r"shape has 33 dims, the limit is 32"),
    "shape overflows": (safetensors_bytes(entry("a.weight", shape=[2**63, 2**63]), DATA), r"tensor \S+: shape .* the byte count overflows int64"),
    "shape of a million dims": (safetensors_bytes(entry("a.weight", shape=[2**62] * 10**6), DATA), r"tensor a.weight: shape has 1000000 dims, the limit is 32"),
    "a 0 dim beside a huge one": (safetensors_bytes(entry("d.empty", shape=[33, 0, 2**60]), DATA), r"overflows int64"),
    "offsets negative": (safetensors_bytes(entry("a.weight", data_offsets=[-48, 0]), DATA), r"data_offsets \[-48, 0\] must be"),
    "offsets reversed": (safetensors_bytes(entry("a.weight", data_offsets=[48, 0]), DATA), r"must be \[begin, end\]"),
    "offsets three": (safetensors_bytes(entry("a.weight", data_offsets=[0, 24, 48]), DATA), r"must be \[begin, end\]"),
    "byte count": (safetensors_bytes(entry("a.weight", shape=[4, 4]), DATA), r"hold 48 bytes but shape \[4, 4\] of F32 needs 64"),
    "overlap": (safetensors_bytes(entry("b.bf16", data_offsets=[40, 60]), DATA), r"tensor b.bf16: data_offsets \[40, 60\] overlaps"),
    "gap": (safetensors_bytes(entry("c.half", data_offsets=[70, 76]), DATA), r"tensor c.half: .* leaves a gap after byte 68"),
    "not from 0": (safetensors_bytes({"a.weight": {**HEADER["a.weight"], "data_offsets": [8, 56]}}, bytes(56)),
                   r"leaves a gap after byte 0"),
    "past the end": (safetensors_bytes(HEADER, DATA[:-10]), r"run past the end of the \d+-byte data buffer \(truncated\?\)"),
    "data left over": (safetensors_bytes(HEADER, DATA + bytes(4)), r"the tensors cover 74 bytes but the data buffer has 78"),
}


@pytest.mark.parametrize("reader", [read_safetensors, iter_safetensors_file], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_hostile_safetensors(tmp_path, case, reader):
    raw, pattern = SAFETENSORS_CASES[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(raw)
    assert_refused(lambda p: list(reader(p)), path, pattern)


def test_the_valid_safetensors_loads_on_both_paths(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(HEADER, DATA))
    assert read_safetensors(path).keys() == dict(iter_safetensors(tmp_path)).keys() == set(HEADER) - {"__metadata__"}


# --- pickle is never loaded ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt", "w.pkl", "W.PICKLE"])
def test_a_pickle_file_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04 would run code")
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: pickle checkpoints are never loaded \(unpickling"):
        hub.resolve_model(tmp_path / name)


@pytest.mark.parametrize("load", [load_checkpoint_numpy, lambda d: list(iter_safetensors(d))], ids=["numpy", "torch"])
def test_a_pickle_only_directory_is_refused(tmp_path, load):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*found pytorch_model.bin: pickle .* can run any code"):
        load(tmp_path)


@pytest.mark.parametrize("shard", ["pytorch_model-00001.bin", "../model.safetensors", "/etc/passwd", 7])
def test_an_index_may_name_only_safetensors_files_beside_it(tmp_path, shard):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: weight_map"):
        load_checkpoint_numpy(tmp_path)


def test_hub_downloads_skip_pickle_files(monkeypatch, tmp_path):
    calls = []
    fake = types.SimpleNamespace(snapshot_download=lambda **kw: calls.append(kw) or str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert hub.resolve_model("someone/model") == tmp_path
    assert {"*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"} <= set(calls[0]["ignore_patterns"])
