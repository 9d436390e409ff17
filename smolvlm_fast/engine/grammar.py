"""Structured outputs: a request's response format (SamplingParams.response_format / json_schema) enforced while it
decodes, by llguidance (github.com/guidance-ai/llguidance, a Rust grammar engine with no dependencies of its own).

Why llguidance and not xgrammar: bench/bench_structured.py measured both on this project's tokenizer (SmolLM2's
49,152 tokens; results in bench/results/bench_structured.jsonl, a 2-core Xeon VM). Both compile all six test schemas
and accept their instances. llguidance compiles in under 1 ms (it builds lazily) and masks a token in 19-80 us
(medians); xgrammar compiles in 1.4-15 ms and masks in 2-13 us. Either is small next to a decode step (~7 ms here),
and the engine's whole cost of a schema was 6% of tokens/s at batch 1 and 12% at batch 4. But xgrammar needs torch
and transformers installed, and the PyTorch-free path (numpy backend) must have structured outputs too.

How a step uses it (Engine._accept): every constrained sequence that samples in the step gets its allowed-token
bitmask from one batched call (llguidance's executor computes the rows on its threads, without the GIL); the
disallowed logits become -inf before repetition penalty, temperature, top-k/top-p and the draw, so that both backends
(whose logits arrive here as NumPy rows) sample only tokens that keep the output valid. The sampled token then
advances the sequence's matcher. The output ends ("stop") when the grammar can take nothing more, or with one of
the request's stop tokens, which are allowed exactly where the grammar may end.

JSON is laid out with ", " and ": " and no other whitespace: flexible whitespace lets a small model pad its output
with newlines until max_new_tokens.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ..errors import InputError

# the JSON layout every schema compiles with (a schema's own "x-guidance" options override it)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILED_CACHE = 64  # grammars kept per engine, by schema text


class Grammars:
    """The structured-output state of one engine: the llguidance tokenizer (built on first use, ~0.5 s), the
    compiled grammars by schema, and a matcher per constrained sequence (held by the Sequence itself)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None):
        """tokenizer: ours (inputs/tokenizer.Tokenizer) or a transformers fast tokenizer: llguidance reads its
        `tokenizers` backend. vocab_size: the logits' width (the model's vocabulary, which may be padded past the
        tokenizer's). eos_token_id: the token llguidance marks where the grammar may end."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_id = eos_token_id if eos_token_id is not None else 0
        self._ll_tokenizer = None
        self._executor = None
        self._compiled: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles on its threads while the engine's thread makes matchers

    # -- compiling (at the border: Engine.check)
    def compile(self, schema: str) -> str:
        """The grammar of a schema (cached). InputError when llguidance cannot compile it for this tokenizer."""
        with self._lock:
            if schema in self._compiled:
                self._compiled.move_to_end(schema)
                return self._compiled[schema]
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e)
        if error:
            raise InputError(f"the JSON schema cannot be used for structured output: {error.strip()[:500]}")
        with self._lock:
            self._compiled[schema] = grammar
            if len(self._compiled) > COMPILED_CACHE:
                self._compiled.popitem(last=False)
        return grammar

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._new_ll_tokenizer()
        return self._ll_tokenizer

    def _new_ll_tokenizer(self):
        import llguidance

        backend = getattr(self.tokenizer, "backend", None) or getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise InputError("structured output needs a tokenizer built on the `tokenizers` library "
                             f"(got {type(self.tokenizer).__name__})")
        try:
            return llguidance.LLTokenizer(_copy_backend(backend).to_str(), n_vocab=self.vocab_size,
                                          eos_token=self.eos_token_id)
        except ValueError as e:  # a tokenizer with more tokens than the model's vocabulary, say
            raise InputError(f"structured output: llguidance cannot read this tokenizer: {e}") from None

    def matcher(self, schema: str):
        """A new matcher at the start of the schema's grammar (one per sequence)."""
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer, self.compile(schema), log_level=0)

    # -- one step (Engine._accept)
    def mask(self, matchers: list, logits: np.ndarray, stop_ids: list[tuple[int, ...]]) -> None:
        """logits [B, V] float32, in place: row i keeps only what matchers[i] allows next (rows whose matcher is
        None are left alone). Where the grammar may end, the row's stop tokens are allowed too."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = np.full((len(rows), -(-self.vocab_size // 32)), -1, dtype=np.int32)
        self._fill(bitmask, [matchers[i] for i in rows])
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab_size].astype(bool)
        width = logits.shape[1]
        for k, i in enumerate(rows):
            keep = allowed[k, :width]
            if keep[self.eos_token_id] and stop_ids[i]:
                keep[[t for t in stop_ids[i] if 0 <= t < width]] = True
            logits[i, ~keep] = -np.inf

    def _fill(self, bitmask: np.ndarray, matchers: list) -> None:
        import llguidance.numpy as llnp

        if len(matchers) == 1:
            llnp.fill_next_token_bitmask(matchers[0], bitmask, 0)
            return
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        llnp.fill_next_token_bitmask_par(self._executor, [(m, k) for k, m in enumerate(matchers)], bitmask)


def advance(matcher, token: int) -> str | None:
    """Feed the sampled token to the sequence's matcher. Returns "stop" when the grammar takes nothing more, "error"
    when the matcher refused it (cannot happen after mask(), save for a llguidance fault), else None."""
    if not matcher.consume_token(token):
        return "error"
    return "stop" if matcher.is_stopped() else None


def _copy_backend(backend):
    """A copy of a `tokenizers.Tokenizer` without padding or truncation, which would change what llguidance reads
    as the vocabulary's token sequences."""
    import tokenizers

    copy = tokenizers.Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy
