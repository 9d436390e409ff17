"""Reading a checkpoint's JSON files (tokenizer, processor and model configs), for the tokenizer and processor."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


def read_json(path: Path) -> dict:
    """The file's JSON; {} when the file is absent (every config file here is optional), a CheckpointError when it
    cannot be read or parsed."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
