"""Turning generated token ids into text as they arrive."""
from __future__ import annotations

import sys


class IncrementalDecoder:
    """Decodes a growing list of token ids and hands out only the new, complete text.

    Text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the next token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        new, self.text = (text[len(self.text):] if text.startswith(self.text) else ""), text
        return new


class TextStreamer:
    """Prints generated text as it is produced; the `put`/`end` protocol of transformers' streamers.

    `model.generate(..., streamer=TextStreamer(tokenizer))` works as in transformers (the prompt is skipped).
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, file=None, **decode_kwargs):
        self.decoder = IncrementalDecoder(tokenizer, decode_kwargs.get("skip_special_tokens", True))
        self.skip_prompt, self.file = skip_prompt, file or sys.stdout
        self._seen_prompt = False

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if self.skip_prompt and not self._seen_prompt:
            self._seen_prompt = True
            return
        for token_id in ids:
            self.on_text(self.decoder.push(token_id))

    def end(self) -> None:
        self.on_text(self.decoder.flush(), end=True)

    def on_text(self, text: str, end: bool = False) -> None:
        print(text, end="\n" if end else "", file=self.file, flush=True)
