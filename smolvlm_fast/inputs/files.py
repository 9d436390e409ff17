"""Files the inputs read: a checkpoint's JSON files (tokenizer, processor and model configs), and a caller's image or
video file named by a path."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, InputError


def read_json(path: Path) -> dict:
    """The file's JSON; {} when the file is absent (every config file here is optional), a CheckpointError when it
    cannot be read or parsed."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def local_file(source, kind: str) -> tuple[Path, str]:
    """(path, "<kind> file <path>") of a caller's image or video path; an InputError for a URL (never fetched
    here) or a path that is no file."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        raise InputError(f"{kind} URL {text!r}: URLs are not fetched; download the file and pass its path")
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{kind} file not found: {path}")
    return path, f"{kind} file {path}"
