"""Our NumPy safetensors reader (formats/safetensors.py): the same tensors as the safetensors library and torch
give, for every dtype the checkpoints use, and one generated bad file per rule of the format, each a CheckpointError
that names the file and the tensor or field at fault."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from smolvlm_fast.errors import CheckpointError
from smolvlm_fast.formats.safetensors import load_checkpoint_numpy, read_safetensors

RNG = np.random.default_rng(0)


def test_float32_float16_and_integers_equal_the_safetensors_library(tmp_path):
    tensors = {"a.weight": RNG.standard_normal((7, 5), dtype=np.float32),
               "b.half": RNG.standard_normal((3, 4, 2)).astype(np.float16),
               "c.ids": RNG.integers(-9, 9, (6,), dtype=np.int64), "d.i32": RNG.integers(-9, 9, (2, 2), dtype=np.int32),
               "e.u8": RNG.integers(0, 255, (5,), dtype=np.uint8), "f.i8": RNG.integers(-9, 9, (3,), dtype=np.int8),
               "g.mask": RNG.random((4,)) < 0.5, "h.scalar": np.array(3.5, np.float32),
               "i.empty": np.zeros((0, 3), np.float32)}
    save_numpy(tensors, tmp_path / "x.safetensors", metadata={"format": "np"})
    ours = read_safetensors(tmp_path / "x.safetensors")
    assert ours.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], expected)
    assert not ours["a.weight"].flags.writeable and not ours["a.weight"].flags.owndata  # a view of the mapped file


def test_bfloat16_copies_let_their_pages_go(tmp_path, monkeypatch):
    """A BF16 tensor copied out of the mapping (to float32, or by the bf16 hook) has its pages released
    (MADV_DONTNEED), a view kept by the hook (Bf16Bits) and float32 views do not; every value stays right."""
    from smolvlm_fast.formats import safetensors as st
    from smolvlm_fast.formats.bf16 import Bf16Bits

    tensors = {"big": torch.randn(512, 64, dtype=torch.bfloat16), "kept": torch.randn(512, 64, dtype=torch.bfloat16),
               "f32": torch.randn(512, 64)}
    save_torch(tensors, tmp_path / "x.safetensors")
    released, real = [], st._release
    monkeypatch.setattr(st, "_release", lambda buffer, start, end: released.append(end - start) or real(buffer, start, end))
    ours = read_safetensors(tmp_path / "x.safetensors", lambda name, bits: Bf16Bits(bits) if name == "kept" else None
                            or st.bf16_to_float32(bits))
    assert released == [512 * 64 * 2]  # "big" only
    np.testing.assert_array_equal(ours["big"], tensors["big"].float().numpy())
    np.testing.assert_array_equal(ours["kept"].float32(), tensors["kept"].float().numpy())
    np.testing.assert_array_equal(ours["f32"], tensors["f32"].numpy())


def test_bfloat16_is_exactly_torchs_float32(tmp_path):
    tensors = {"w": torch.randn(33, 17, dtype=torch.bfloat16),
               "special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3e38], dtype=torch.bfloat16)}
    save_torch(tensors, tmp_path / "x.safetensors")
    ours = read_safetensors(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name].view(np.uint32), t.float().numpy().view(np.uint32))


def test_sharded_checkpoint_with_an_index(tmp_path):
    parts = [{"a": torch.randn(4, 3), "b": torch.randn(2).half()}, {"c": torch.randn(5, 5, dtype=torch.bfloat16)}]
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_torch(part, tmp_path / name)
        weight_map |= {key: name for key in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = load_checkpoint_numpy(tmp_path)
    expected = {name: t for part in parts for name, t in part.items()}
    assert ours.keys() == expected.keys()
    for name, t in expected.items():
        np.testing.assert_array_equal(ours[name], t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())


def test_a_tensor_in_two_shards_is_an_error(tmp_path):
    for i in (1, 2):
        save_numpy({"a": np.zeros(2, np.float32)}, tmp_path / f"s{i}.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                      "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match="s2.safetensors: tensor a is also in another shard"):
        load_checkpoint_numpy(tmp_path)


def test_agrees_with_torch_on_a_real_checkpoint(tiny_idefics3):
    ours, theirs = read_safetensors(tiny_idefics3 / "model.safetensors"), load_torch(tiny_idefics3 / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        np.testing.assert_array_equal(ours[name], t.numpy())


# ---------------------------------------------------------------- bad files, one per rule


def write(path, header, data=b"", *, length=None):
    """A safetensors file from a header (a dict, or raw bytes) and a data buffer; length overrides the size field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD = {
    "too short for the length": (b"\x01\x02", None, "too short"),
    "header over 100 MB": (None, {"length": 100 * 1024 * 1024 + 1}, "exceeds"),
    "header past the end": (None, {"length": 1000}, "runs past the end"),
    "header not JSON": (b"{not json", b"", "not valid UTF-8 JSON"),
    "header not UTF-8": (b"\xff\xfe", b"", "not valid UTF-8 JSON"),
    "header a list": (b"[1, 2]", b"", "JSON list, expected an object"),
    "entry not an object": ({"w": [1, 2]}, b"", "tensor w: entry must be an object"),
    "missing dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor w: missing field 'dtype'"),
    "missing shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), "tensor w: missing field 'shape'"),
    "missing offsets": ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), "tensor w: missing field 'data_offsets'"),
    "unknown dtype": ({"w": entry(dtype="F128")}, bytes(8), "tensor w: dtype 'F128' is not supported"),
    "negative dim": ({"w": entry(shape=(-2,))}, bytes(8), "tensor w: shape .* non-negative integers"),
    "float dim": ({"w": entry(shape=(2.0,))}, bytes(8), "tensor w: shape .* non-negative integers"),
    "shape not a list": ({"w": {**entry(), "shape": 2}}, bytes(8), "tensor w: shape .* non-negative integers"),
    "offsets reversed": ({"w": entry(offsets=(8, 0))}, bytes(8), "tensor w: data_offsets .* begin <= end"),
    "offsets not a pair": ({"w": entry(offsets=(0, 4, 8))}, bytes(8), "tensor w: data_offsets"),
    "byte count": ({"w": entry(shape=(3,))}, bytes(8), r"tensor w: data_offsets \[0, 8\] hold 8 bytes .* needs 12"),
    "huge shape": ({"w": entry(shape=(2**62, 2**62))}, bytes(8), r"tensor \S+: shape .* the byte count overflows int64"),
    "overlap": ({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12), "tensor b: .* overlaps"),
    "gap": ({"a": entry(), "b": entry(offsets=(12, 20))}, bytes(20), "tensor b: .* leaves a gap after byte 8"),
    "not from 0": ({"a": entry(offsets=(4, 12))}, bytes(12), "tensor a: .* leaves a gap after byte 0"),
    "past the end": ({"a": entry(), "b": entry(offsets=(8, 16))}, bytes(12), "tensor b: .* run past the end"),
    "trailing bytes": ({"a": entry()}, bytes(12), "cover 8 bytes but the data buffer has 12"),
    "bad metadata": ({"__metadata__": {"n": 1}, "a": entry()}, bytes(8), "__metadata__ must be an object of strings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_a_clear_error(tmp_path, case):
    header, data, message = BAD[case]
    path = tmp_path / "bad.safetensors"
    if case == "too short for the length":
        path.write_bytes(header)
    elif header is None:
        write(path, {"a": entry()}, bytes(8), length=data["length"])
    else:
        write(path, header, data)
    with pytest.raises(CheckpointError, match=message) as error:
        read_safetensors(path)
    assert str(path) in str(error.value)


def test_metadata_and_empty_files_are_fine(tmp_path):
    path = write(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"}, "a": entry(shape=(0,), offsets=(0, 0)),
                                               "b": entry()}, np.arange(2, dtype=np.float32).tobytes())
    ours = read_safetensors(path)
    assert ours["a"].shape == (0,) and ours["b"].tolist() == [0.0, 1.0]
    assert read_safetensors(write(tmp_path / "empty.safetensors", {})) == {}


def test_truncated_real_checkpoint(tiny_llama, tmp_path):
    raw = (tiny_llama / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"tensor model\..*run past the end.*truncated"):
        load_checkpoint_numpy(tmp_path)
