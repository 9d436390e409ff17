"""The tokenizer a GGUF file's tokenizer.ggml.* metadata describes, built the way transformers converts one
(byte-level BPE, the pre-tokenizer split named by tokenizer.ggml.pre, control and user-defined tokens added whole)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..inputs.tokenizer import Tokenizer

TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regex that splits text before BPE; None: GPT-2's own ByteLevel split.
# As transformers converts them (integrations/gguf/gguf_tokenizer_mapping.py). llama.cpp splits "smollm" text
# at every digit first; the two differ where a run of whitespace meets a digit ("\n\n1", "a  1").
PRE_TOKENIZER_SPLITS = {
    None: None, "default": None, "gpt2": None, "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
}


def read_tokenizer(meta: dict, path: Path) -> Tokenizer:
    """The tokenizer of a GGUF file's metadata (gguf_reader.GGUFFile.metadata)."""
    from ..inputs.tokenizer import Tokenizer

    backend = build_backend(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    return Tokenizer(backend, chat_template=meta.get("tokenizer.chat_template"), padding_side="left",
                     bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
                     pad_token=special("padding_token_id"), unk_token=special("unknown_token_id"))


def build_backend(meta: dict, path: Path):
    """A `tokenizers.Tokenizer` (byte-level BPE) from tokenizer.ggml.{model, pre, tokens, merges, token_type, ...}."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level BPE)")
    if pre not in PRE_TOKENIZER_SPLITS:
        known = ", ".join(sorted(p for p in PRE_TOKENIZER_SPLITS if p))
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {known})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing metadata field {key}")
    for key in SPECIAL_ID_KEYS:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(meta["tokenizer.ggml.tokens"]):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} {token_id} is not a token id")

    try:  # the tokenizers library refuses bad vocabularies and merges with its own exceptions
        return _backend(meta, pre)
    except Exception as e:
        raise CheckpointError(f"{path}: the tokenizer in tokenizer.ggml.* cannot be built ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def _backend(meta: dict, pre: str | None):
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {byte_level_spelling(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    del vocab, merges  # the library holds its own copies; a big vocabulary need not be held twice from here on
    if (split := PRE_TOKENIZER_SPLITS[pre]) is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()

    special, user_defined = added_tokens(meta)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    backend.post_processor = bos_eos_processor(meta, tokens)
    return backend


def added_tokens(meta: dict) -> tuple[list[str], list[str]]:
    """(special, user-defined) tokens, matched whole in text: control tokens and the bos/eos/unk/pad ones are
    special, user-defined ones (like `<think>`) plain. A token outside the byte alphabet is no real vocabulary
    entry (a llama.cpp mislabel, as transformers puts it): skipped."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    if types is None or len(types) == 0:  # a NumPy array: no `or` on it
        types = [TOKEN_TYPE_NORMAL] * len(tokens)
    named = {meta.get(f"tokenizer.ggml.{k}") for k in SPECIAL_ID_KEYS}
    special, user_defined = [], []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if not set(token) <= BYTE_ALPHABET:
            continue
        if kind == TOKEN_TYPE_CONTROL or i in named:
            special.append(token)
        elif kind == TOKEN_TYPE_USER_DEFINED:
            user_defined.append(token)
    return special, user_defined


def bos_eos_processor(meta: dict, tokens):
    """BOS/EOS around every encoding when tokenizer.ggml.add_bos_token / add_eos_token say so."""
    from tokenizers import processors

    bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = meta.get("tokenizer.ggml.eos_token_id") if meta.get("tokenizer.ggml.add_eos_token") else None
    if bos is None and eos is None:
        return None

    def around(seq: str, type_id: int) -> list[str]:
        return [f"{tokens[i]}:{type_id}" for i in (bos,) if i is not None] + [f"{seq}:{type_id}"] + \
               [f"{tokens[i]}:{type_id}" for i in (eos,) if i is not None]

    return processors.TemplateProcessing(single=around("$A", 0), pair=around("$A", 0) + around("$B", 1),
                                         special_tokens=[(tokens[i], i) for i in {bos, eos} - {None}])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the alphabet byte-level BPE tokens are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = _bytes_to_unicode()
BYTE_ALPHABET = frozenset(BYTE_TO_CHAR.values())


def byte_level_spelling(token: str) -> str:
    """A token already in the byte alphabet stays; one stored as plain text is spelled byte by byte."""
    return token if set(token) <= BYTE_ALPHABET else "".join(BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
