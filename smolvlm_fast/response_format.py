"""A request's response format -> the JSON Schema its output must satisfy (as JSON text), or None for free text.
SamplingParams checks its response_format / json_schema here at construction; engine/grammar.py compiles the
schema for the decoder."""
from __future__ import annotations

import json

from .errors import InputError

ANY_OBJECT = '{"type": "object"}'


def schema_text(response_format, json_schema) -> str | None:
    """The JSON Schema (as JSON text) that SamplingParams' response_format / json_schema ask for, or None for free
    text. response_format is OpenAI's: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}; json_schema is a schema itself (a dict or JSON
    text). InputError for anything else, and for both at once."""
    if response_format is not None and json_schema is not None:
        raise InputError("SamplingParams: give response_format or json_schema, not both")
    if json_schema is not None:
        return _schema_json(json_schema, "json_schema")
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                      "json_schema"):
        raise InputError('response_format must be {"type": "text"}, {"type": "json_object"} or '
                         f'{{"type": "json_schema", "json_schema": {{"schema": ...}}}}, got {_short(response_format)}')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise InputError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}, '
                         f"got {_short(spec)}")
    return _schema_json(spec["schema"], "response_format.json_schema.schema")


def _schema_json(schema, where: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise InputError(f"{where} must be a JSON Schema object, got {_short(schema)}")
    try:
        return json.dumps(schema)  # property order is kept: the output follows it
    except (TypeError, ValueError) as e:
        raise InputError(f"{where} is not JSON: {e}") from None


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
