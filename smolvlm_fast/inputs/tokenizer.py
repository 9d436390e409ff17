"""A transformers-compatible tokenizer on the `tokenizers` library, and chat templates rendered as transformers does.

Token ids equal transformers 5's AutoTokenizer on the same files: the backend is tokenizer.json as saved, and its
post-processor decides what `add_special_tokens=True` adds (transformers 5 ignores `add_bos_token` in
tokenizer_config.json whenever tokenizer.json exists; for SmolVLM and SmolLM2 nothing is added). transformers is never
imported; torch is imported only for `return_tensors="pt"` and `BatchFeature.to`.

Known difference: for a tokenizer_config.json naming a class that rebuilds its backend from the vocabulary (e.g.
`GPT2Tokenizer`), transformers 5 replaces tokenizer.json's pre-tokenizer with the class's own (dropping SmolLM2's
digit splitting); we keep tokenizer.json's. With SmolLM2's vocabulary (no multi-digit tokens) the ids agree.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from ..errors import CheckpointError, InputError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# --- BatchFeature ------------------------------------------------------------------------------------------------


class BatchFeature(dict):
    """A dict with attribute access, like transformers.BatchFeature; `.to()` moves torch tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, device=None, dtype=None, non_blocking: bool = False) -> "BatchFeature":
        """Move torch tensors to `device`, casting only floating-point ones to `dtype`:
        `.to("cuda")`, `.to(torch.bfloat16)`, `.to("cuda", dtype=torch.bfloat16)`."""
        import torch

        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and torch.is_floating_point(value) else None
                self[key] = value.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self


def to_tensor(value, return_tensors: str | None, name: str):
    """Nested lists / arrays -> np.ndarray ("np") or torch.Tensor ("pt"); None leaves them as they are."""
    if return_tensors is None:
        return value
    if return_tensors not in ("pt", "np"):
        raise InputError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    if isinstance(value, list) and value and isinstance(value[0], list) and len({len(v) for v in value}) > 1:
        raise InputError(f"{name}: sequences have different lengths; pass padding=True to get a tensor")
    array = np.asarray(value)
    if return_tensors == "np":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


# --- chat templates ----------------------------------------------------------------------------------------------


@lru_cache
def compile_chat_template(template: str):
    """Compile a chat template in the sandbox transformers uses (trim_blocks, lstrip_blocks, loopcontrols)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=_TemplateDict())
    env.globals["namespace"] = _template_namespace()
    return env.from_string(template)


def _generation_tag():
    """`{% generation %}...{% endgeneration %}` (used for assistant masks) renders its body unchanged."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationTag


class _TemplateDict:
    """`dict(...)` in templates, without attribute access to the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _template_namespace():
    import jinja2

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore-prefixed attributes, as transformers' does."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")

    return TemplateNamespace


def plain_template_data(value: Any) -> Any:
    """What a template may see: JSON-like data; anything else (images, arrays) becomes a placeholder like '<Image>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, ...) are stripped back to the base type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if isinstance(value, dict):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_conversations(conversation) -> tuple[list[list[dict]], bool]:
    """One conversation or a batch -> (list of conversations, is_batched); keys whose value is None are dropped."""
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise InputError("cannot apply a chat template to an empty conversation")
    batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    conversations = conversation if batched else [conversation]
    out = []
    for conv in conversations:
        messages = getattr(conv, "messages", conv)
        for message in messages:
            if not isinstance(message, dict):
                raise InputError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        out.append([{k: v for k, v in m.items() if v is not None} for m in messages])
    return out, batched


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(template: str, conversations: list[list[dict]], *, add_generation_prompt: bool = False,
                         continue_final_message: bool | str = False, tools=None, documents=None,
                         **variables) -> list[str]:
    """Render each conversation exactly as transformers' render_jinja_template does."""
    if continue_final_message and add_generation_prompt:
        raise InputError("continue_final_message and add_generation_prompt cannot be used together")
    compiled = compile_chat_template(template)
    tools, documents, variables = (plain_template_data(x) for x in (tools, documents, variables))
    rendered = []
    for chat in conversations:
        chat = _alias_reasoning(plain_template_data(chat))
        final = _tag_final_message(chat, continue_final_message, template) if continue_final_message else None
        text = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
        rendered.append(_cut_at_tag(text, final) if continue_final_message else text)
    return rendered


def _tag_final_message(chat: list[dict], field: bool | str, template: str) -> str:
    """Append CONTINUE_TAG to the last message's text (in place); return that text."""
    field = field if isinstance(field, str) else "content"
    if not chat or chat[-1].get(field) is None:
        raise InputError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [field]
    if field in REASONING_FIELDS:  # reasoning is copied under several names: tag every copy
        fields = [f for f in REASONING_FIELDS if chat[-1].get(f) == chat[-1][field]]
    if not any(f in template for f in fields):
        raise InputError(f"continue_final_message: the chat template does not use the field {field!r}")
    final = chat[-1][field]
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                final, block["text"] = block["text"], block["text"] + CONTINUE_TAG
                return final
        raise InputError("continue_final_message: the final message has no text block to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + CONTINUE_TAG
    return final


def _cut_at_tag(text: str, final: str) -> str:
    tag = CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise InputError("continue_final_message: the chat template dropped part of the final message")
    loc = text.rindex(tag)
    return text[:loc] if text[loc : loc + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:loc].rstrip()


# --- loading tokenizer files -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def as_template_dict(chat_template: str | dict[str, str] | None) -> dict[str, str]:
    """One template (the default) or templates by name -> {name: template}."""
    return {"default": chat_template} if isinstance(chat_template, str) else dict(chat_template or {})


def _token_str(value) -> str | None:
    """A special-token entry as saved: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_chat_templates(path: Path, config: dict) -> dict[str, str]:
    """Chat templates by name ('default' first): chat_template.jinja and additional_chat_templates/*.jinja win over
    tokenizer_config.json's 'chat_template' (a string, or a list of {name, template})."""
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    for file in sorted(extra_dir.glob("*.jinja")) if extra_dir.is_dir() else []:
        templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    saved = config.get("chat_template")
    if isinstance(saved, str):
        return {"default": saved}
    if isinstance(saved, list):
        return {t["name"]: t["template"] for t in saved}
    return {}


def _special_tokens_config(path: Path, config: dict) -> dict:
    """Named special tokens, extra special tokens and model-specific ones (e.g. image_token), as transformers 5 reads
    them from tokenizer_config.json and (legacy) special_tokens_map.json."""
    merged = dict(config)
    legacy = path / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        for key, value in _read_json(legacy).items():
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
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
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
