"""JSON Schemas for the structured-output tests and bench/bench_structured.py, each with one instance that satisfies it.

They cover what issue 18 names: nested objects, arrays, enums, required fields, numbers and strings with patterns,
plus the project's own use cases (album tags, a receipt read from a document). FINITE ones cap every string, array and
number, so that even a random-weight model must close them; the OPEN ones need a model that follows the prompt (the
real SmolLM2 weights) to end in time.
"""
from __future__ import annotations

TAGS = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4},
    },
    "required": ["caption", "tags"],
    "additionalProperties": False,
}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
    },
    "required": ["name", "age", "role", "email"],
    "additionalProperties": False,
}

RECEIPT = {
    "type": "object",
    "properties": {
        "shop": {"type": "string", "maxLength": 24},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "total": {"type": "number", "minimum": 0, "maximum": 10000},
        "items": {
            "type": "array", "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 16}, "price": {"type": "number", "minimum": 0,
                                                                                      "maximum": 1000}},
                "required": ["name", "price"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["shop", "date", "total", "items"],
    "additionalProperties": False,
}

NESTED = {
    "type": "object",
    "properties": {
        "scene": {
            "type": "object",
            "properties": {
                "indoor": {"type": "boolean"},
                "light": {"enum": ["day", "night", "artificial"]},
                "objects": {"type": "array", "items": {"enum": ["cat", "dog", "car", "tree", "person"]},
                            "maxItems": 3},
            },
            "required": ["indoor", "light", "objects"],
            "additionalProperties": False,
        },
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["scene", "confidence"],
    "additionalProperties": False,
}

# (name, schema, an instance of it). FINITE: every string, array and number is capped, so that every output the
# grammar allows ends within MAX_FINITE_TOKENS tokens, whatever the model prefers (a token is at least one byte).
FINITE = [
    ("tags", TAGS, {"caption": "A cat on a sofa", "tags": ["cat", "sofa"]}),
    ("person", PERSON, {"name": "Ada", "age": 36, "role": "admin", "email": "ada@math.org"}),
    ("nested", NESTED, {"scene": {"indoor": True, "light": "day", "objects": ["cat"]}, "confidence": 90}),
]
# The longest is TAGS: a character costs at most 12 bytes in JSON (a surrogate pair of \\u escapes), so 40 + 4 x 12
# characters, 1,056 bytes, plus ~60 of keys and punctuation.
MAX_FINITE_TOKENS = 1200

# open: numbers, strings and arrays without caps, as users write them (a model has to choose to end them)
OPEN = [
    ("receipt", RECEIPT, {"shop": "Corner Shop", "date": "2026-03-14", "total": 12.5,
                          "items": [{"name": "bread", "price": 2.5}, {"name": "cheese", "price": 10}]}),
    ("object", {"type": "object"}, {"answer": "yes", "n": [1, 2]}),
    ("list", {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string"}}},
              "required": ["colors"]}, {"colors": ["red", "green"]}),
]

# schemas no grammar can be made of (the server answers 400)
INVALID = [
    {"type": "string", "pattern": "(unclosed"},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "no-such-type"},
    {"$ref": "#/$defs/missing"},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 9, "maxLength": 2}}, "required": ["a"]},
]
