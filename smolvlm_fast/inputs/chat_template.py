"""Chat templates rendered exactly as transformers renders them: the sandboxed Jinja environment, the data a
template may see, conversations normalized, `continue_final_message`, and the template files of a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


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


# --- template files -------------------------------------------------------------------------------------------


def as_template_dict(chat_template: str | dict[str, str] | None) -> dict[str, str]:
    """One template (the default) or templates by name -> {name: template}."""
    return {"default": chat_template} if isinstance(chat_template, str) else dict(chat_template or {})



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
