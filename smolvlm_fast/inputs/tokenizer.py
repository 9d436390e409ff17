"""A transformers-compatible tokenizer on the `tokenizers` library (chat templates: chat_template.py).

Token ids equal transformers 5's AutoTokenizer on the same files: the backend is tokenizer.json as saved, and its
post-processor decides what `add_special_tokens=True` adds (transformers 5 ignores `add_bos_token` in
tokenizer_config.json whenever tokenizer.json exists; for SmolVLM and SmolLM2 nothing is added). transformers is never
imported; torch is imported only for `return_tensors="pt"` and `BatchFeature.to`.

Known difference: for a tokenizer_config.json naming a class that rebuilds its backend from the vocabulary (e.g.
`GPT2Tokenizer`), transformers 5 replaces tokenizer.json's pre-tokenizer with the class's own (dropping SmolLM2's
digit splitting); we keep tokenizer.json's. With SmolLM2's vocabulary (no multi-digit tokens) the ids agree.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers

from ..errors import CheckpointError, InputError
from .batch_feature import BatchFeature, to_tensor
from .chat_template import (
    as_template_dict,
    normalize_conversations,
    read_chat_templates,
    render_chat_template,
)
from .files import read_json

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# --- loading tokenizer files -------------------------------------------------------------------------------------


def _token_str(value) -> str | None:
    """A special-token entry as saved: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_tokens_config(path: Path, config: dict) -> dict:
    """Named special tokens, extra special tokens and model-specific ones (e.g. image_token), as transformers 5 reads
    them from tokenizer_config.json and (legacy) special_tokens_map.json."""
    merged = dict(config)
    legacy = path / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        for key, value in read_json(legacy).items():
            if key in ("additional_special_tokens", "extra_special_tokens") and merged.get(key):
                continue
            merged[key] = value
    extra = merged.get("extra_special_tokens") or merged.get("additional_special_tokens") or []
    model_specific = {k: _token_str(v) for k, v in merged.items()
                      if k.endswith("_token") and k not in NAMED_SPECIAL_TOKENS and isinstance(_token_str(v), str)}
    if isinstance(extra, dict):
        model_specific.update({k: _token_str(v) for k, v in extra.items()})
        extra = []
    named = {k: _token_str(merged[k]) for k in NAMED_SPECIAL_TOKENS if merged.get(k) is not None}
    return {"named": named, "extra": [_token_str(t) for t in extra], "model_specific": model_specific}


# --- the tokenizer -----------------------------------------------------------------------------------------------


class Tokenizer:
    """Encodes, decodes and applies chat templates; ids match transformers' AutoTokenizer on the same files."""

    def __init__(self, backend: tokenizers.Tokenizer, *, chat_template: str | dict[str, str] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, padding_side: str = "right", extra_special_tokens=(),
                 model_specific_tokens: dict[str, str] | None = None, clean_up_tokenization_spaces: bool = False):
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.backend = backend
        self.backend.no_padding()
        self.chat_templates = as_template_dict(chat_template)
        self.special_tokens = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                                                     pad_token=pad_token).items() if v is not None}
        self.special_tokens.update(model_specific_tokens or {})
        self.extra_special_tokens = list(extra_special_tokens)
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._add_missing_special_tokens()

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """Load from a directory with tokenizer.json (+ tokenizer_config.json, special_tokens_map.json and the chat
        template as chat_template.jinja or in tokenizer_config.json)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path / 'tokenizer.json'} not found: a tokenizers-format tokenizer is required")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise CheckpointError(f"cannot load {path / 'tokenizer.json'}: {e}") from None
        config = read_json(path / "tokenizer_config.json")
        special = _special_tokens_config(path, config)
        padding = backend.padding or {}
        named = special["named"]
        return cls(
            backend,
            chat_template=read_chat_templates(path, config),
            bos_token=named.get("bos_token"),
            eos_token=named.get("eos_token"),
            pad_token=named.get("pad_token", padding.get("pad_token")),
            unk_token=named.get("unk_token"),
            padding_side=config.get("padding_side", padding.get("direction", "right")),
            extra_special_tokens=special["extra"],
            model_specific_tokens={**{k: v for k, v in named.items() if k in ("sep_token", "cls_token", "mask_token")},
                                   **special["model_specific"]},
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    def _add_missing_special_tokens(self) -> None:
        """Special tokens named in the config but absent from the vocabulary are added, as transformers does."""
        missing = [t for t in [*self.special_tokens.values(), *self.extra_special_tokens]
                   if self.backend.token_to_id(t) is None]
        if missing:
            self.backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])

    # --- special tokens ----------------------------------------------------------------------------------------

    def __getattr__(self, name: str):
        """bos_token, eos_token, pad_token, unk_token, image_token, ... and their *_id forms."""
        tokens = self.__dict__.get("special_tokens", {})
        if name in tokens:
            return tokens[name]
        if name.endswith("_id") and name[:-3] in tokens:
            return self.backend.token_to_id(tokens[name[:-3]])
        if name in NAMED_SPECIAL_TOKENS or (name.endswith("_id") and name[:-3] in NAMED_SPECIAL_TOKENS):
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (and model-specific ones): the variables a chat template sees."""
        return dict(self.special_tokens)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def convert_tokens_to_ids(self, token: str | list[str]) -> int | list[int] | None:
        """Unknown tokens map to the unk id (None if there is none), as in transformers."""
        if isinstance(token, str):
            index = self.backend.token_to_id(token)
            return index if index is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in token]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    # --- encoding ----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(self._check_text(text), add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], *, padding: bool | str = False, padding_side: str | None = None,
                 return_tensors: str | None = None, add_special_tokens: bool = True) -> BatchFeature:
        """Text or a batch of texts -> BatchFeature(input_ids, attention_mask). A single string gives flat lists."""
        batched = not isinstance(text, str)
        texts = [self._check_text(t) for t in (text if batched else [text])]
        ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        masks = [[1] * len(seq) for seq in ids]
        if _padding_enabled(padding) and len(ids) > 1:
            ids, masks = self.pad(ids, masks, padding_side=padding_side)
        if not batched and return_tensors is None:
            ids, masks = ids[0], masks[0]
        return BatchFeature(input_ids=to_tensor(ids, return_tensors, "input_ids"),
                            attention_mask=to_tensor(masks, return_tensors, "attention_mask"))

    def pad(self, ids: list[list[int]], masks: list[list[int]], *, padding_side: str | None = None):
        """Pad to the longest sequence with pad_token_id on padding_side (mask 0 there)."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
        if self.pad_token_id is None:
            raise InputError("padding needs a pad token, and the tokenizer config names none (pad_token)")
        longest = max(len(seq) for seq in ids)
        fill = [longest - len(seq) for seq in ids]
        pad = self.pad_token_id
        if side == "left":
            return [[pad] * n + s for n, s in zip(fill, ids)], [[0] * n + m for n, m in zip(fill, masks)]
        return [s + [pad] * n for n, s in zip(fill, ids)], [m + [0] * n for n, m in zip(fill, masks)]

    @staticmethod
    def _check_text(text) -> str:
        if not isinstance(text, str):
            raise InputError(f"text must be a string or a list of strings, got {type(text).__name__}")
        return text

    # --- decoding ----------------------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Token ids (int, list, array or tensor) -> text."""
        ids = _as_id_list(ids)
        if ids and isinstance(ids[0], list):
            raise InputError("decode takes one sequence; use batch_decode for a batch")
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._clean_up(text)

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        seqs = [_as_id_list(seq) for seq in _as_id_list(seqs)]  # [batch][ids]
        return [self._clean_up(t) for t in self.backend.decode_batch(seqs, skip_special_tokens=skip_special_tokens)]

    def _clean_up(self, text: str) -> str:
        """transformers' clean_up_tokenization, skipped for BPE models as transformers 5 does."""
        if not self.clean_up_tokenization_spaces or type(self.backend.model).__name__ == "BPE":
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    # --- chat --------------------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools=None) -> str:
        """The template to use: an explicit one, a named one, 'tool_use' when tools are given, else the default."""
        if chat_template is not None and chat_template in self.chat_templates:
            return self.chat_templates[chat_template]
        if chat_template is not None:
            return chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" not in self.chat_templates:
            raise InputError("this tokenizer has no chat template (no chat_template.jinja or 'chat_template' in "
                             "tokenizer_config.json); pass chat_template=...")
        return self.chat_templates["default"]

    def render_chat(self, conversation, *, chat_template: str | None = None, add_generation_prompt: bool = False,
                    continue_final_message: bool | str = False, tools=None, documents=None, **template_kwargs):
        """The chat as text (a list of texts for a batch of conversations)."""
        template = self.get_chat_template(chat_template, tools)
        conversations, batched = normalize_conversations(conversation)
        rendered = render_chat_template(template, conversations, add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, tools=tools,
                                        documents=documents, **{**self.special_tokens_map, **template_kwargs})
        return rendered if batched else rendered[0]

    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = True, padding: bool | str = False,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            tools=None, documents=None, **template_kwargs):
        """As transformers 5: the rendered text (tokenize=False), else a BatchFeature (return_dict=True, the
        transformers 5 default) or the input ids. Special tokens are never added: the template writes them."""
        text = self.render_chat(conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message, tools=tools, documents=documents,
                                **template_kwargs)
        if not tokenize:
            return text
        out = self(text, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        return out if return_dict else out["input_ids"]


def _padding_enabled(padding) -> bool:
    if padding in (True, "longest"):
        return True
    if padding in (False, None, "do_not_pad"):
        return False
    raise InputError(f"padding must be True, False or 'longest', got {padding!r} (max_length padding is not supported)")


def _as_id_list(ids):
    """int / list / np.ndarray / torch.Tensor -> python int or (nested) list of ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return list(ids)
