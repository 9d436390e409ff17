"""Structured outputs (engine/grammar.py, response_format.py): SamplingParams' response_format / json_schema, checked
at the border, enforced in the sampling step of both backends and batched across sequences.

Random-weight models prefer random tokens, so with the FINITE schemas (every string, array and number capped) every
output they may produce ends within MAX_FINITE_TOKENS: each must finish "stop" and validate, whatever the seed. The
real SmolLM2 weights are asked for the OPEN schemas as well, greedy.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from smolvlm_fast import LLM, SamplingParams  # noqa: E402
from smolvlm_fast.engine.grammar import Grammars  # noqa: E402
from smolvlm_fast.errors import InputError  # noqa: E402
from smolvlm_fast.response_format import ANY_OBJECT, schema_text  # noqa: E402
from tests.structured_schemas import FINITE, INVALID, MAX_FINITE_TOKENS, OPEN, PERSON, TAGS  # noqa: E402


def valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# -- the response format, at the border


@pytest.mark.parametrize("response_format, expected", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, ANY_OBJECT),
    ({"type": "json_schema", "json_schema": {"name": "t", "schema": TAGS, "strict": True}}, json.dumps(TAGS)),
])
def test_response_format_forms(response_format, expected):
    assert SamplingParams(response_format=response_format).schema == expected


def test_json_schema_as_dict_or_text_keeps_property_order():
    person = SamplingParams(json_schema=PERSON).schema
    assert person == SamplingParams(json_schema=json.dumps(PERSON)).schema
    assert list(json.loads(person)["properties"]) == ["name", "age", "role", "email"]


@pytest.mark.parametrize("kwargs, message", [
    ({"response_format": {"type": "xml"}}, "response_format must be"),
    ({"response_format": "json_object"}, "response_format must be"),
    ({"response_format": {"type": "json_schema"}}, "needs \"json_schema\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs \"json_schema\""),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": [1, 2]}, "must be a JSON Schema object"),
    ({"json_schema": {"type": "object"}, "response_format": {"type": "json_object"}}, "not both"),
    ({"json_schema": {"a": float("nan")}}, None),  # NaN is written as NaN: the compiler refuses it at the check
])
def test_malformed_response_formats_are_input_errors(kwargs, message):
    if message is None:
        SamplingParams(**kwargs)
        return
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("schema", INVALID + [{"a": float("nan")}], ids=str)
def test_a_schema_that_cannot_compile_fails_its_request_alone(tiny_llama, schema):
    llm = LLM(tiny_llama, backend="numpy")
    with pytest.raises(InputError, match="cannot be used for structured output"):
        llm.check(llm.make_request("hi", SamplingParams(json_schema=schema)))
    fails_alone(llm, schema, "structured output")


def fails_alone(llm, schema, error: str) -> None:
    """A request with the schema ends in an error with that text; its unconstrained neighbour runs to its end."""
    bad, good = llm.generate(["a", "b"], [SamplingParams(json_schema=schema, max_new_tokens=5),
                                          SamplingParams(max_new_tokens=5)])
    assert bad.finish_reason == "error" and error in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 5


def test_without_a_tokenizer_structured_output_is_refused(tiny_llama):
    from smolvlm_fast.engine.engine import Engine
    from smolvlm_fast.engine.sequence import Request

    llm = LLM(tiny_llama, backend="numpy")
    engine = Engine(llm.model, num_blocks=8)
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        engine.check(Request([1, 2, 3], SamplingParams(response_format={"type": "json_object"}, max_new_tokens=8)))


# -- the mask


def test_mask_keeps_exactly_the_tokens_the_grammar_takes(tiny_llama, rng):
    """Every kept token advances a matcher, every dropped one is refused; stop tokens only where the JSON may end."""
    llm = LLM(tiny_llama, backend="numpy")
    grammars = llm.engine.grammars
    schema = schema_text(None, PERSON)
    vocab = llm.model.config.text.vocab_size
    stop = llm.eos_token_ids
    prefix = '{"name": "Ada", "age": 3'
    for text, may_end in [("", False), (prefix, False), (json.dumps(FINITE[1][2]), True)]:
        matcher = grammars.matcher(schema)
        assert matcher.consume_tokens(llm.tokenizer.encode(text, add_special_tokens=False))
        logits = rng.standard_normal((2, vocab)).astype(np.float32)
        grammars.mask([None, matcher], logits, [(), stop])
        assert np.isfinite(logits[0]).all()  # the unconstrained row is left alone
        kept = np.flatnonzero(np.isfinite(logits[1]))
        assert set(stop) <= set(kept) if may_end else not set(stop) & set(kept)
        sample = rng.choice(vocab, 200, replace=False)
        for token in sample:
            if token in stop:
                continue
            probe = matcher.deep_copy()
            assert probe.consume_token(int(token)) == (token in kept), (text, int(token))


def test_constrained_greedy_takes_the_best_allowed_token(tiny_llama):
    """The grammar changes the output of a model that left alone writes no JSON (else the test could not fail)."""
    llm = LLM(tiny_llama, backend="numpy", ignore_eos=True)
    free = llm.generate("hi", SamplingParams(max_new_tokens=8))[0].text
    constrained = llm.generate("hi", SamplingParams(max_new_tokens=MAX_FINITE_TOKENS, json_schema=PERSON))[0]
    assert not free.startswith("{")
    assert constrained.finish_reason == "stop"
    valid(constrained.text, PERSON)


# -- whole outputs on random weights: both backends, a batch of schemas, greedy and sampled


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_output_of_a_batch_validates(tiny_llama, backend, seed):
    llm = LLM(tiny_llama, backend=backend)
    prompts, params, schemas = [], [], []
    for i, (name, schema, _) in enumerate(FINITE * 2):
        sampled = i >= len(FINITE)
        prompts.append(f"Write a {name} as JSON.")
        params.append(SamplingParams(max_new_tokens=MAX_FINITE_TOKENS, json_schema=schema, do_sample=sampled,
                                     temperature=1.3, top_p=0.95, repetition_penalty=1.1, seed=seed + i))
        schemas.append(schema)
    params.append(SamplingParams(max_new_tokens=6))  # an unconstrained neighbour in the same steps
    outputs = llm.generate(prompts + ["hello"], params)
    for out, schema in zip(outputs, schemas):
        assert out.finish_reason == "stop", (out.text, seed)
        valid(out.text, schema)
    assert outputs[-1].finish_reason in ("length", "stop") and outputs[-1].error is None


def test_json_object_on_a_vlm_with_an_image(tiny_smolvlm, small_rgb, seed):
    llm = LLM(tiny_smolvlm, backend="numpy")
    chat = [{"role": "user", "content": [{"type": "image", "image": small_rgb}, {"type": "text", "text": "JSON"}]}]
    out = llm.generate(chat, SamplingParams(max_new_tokens=MAX_FINITE_TOKENS, json_schema=FINITE[2][1],
                                            do_sample=True, seed=seed))[0]
    assert out.finish_reason == "stop", (out.text, seed)
    valid(out.text, FINITE[2][1])


def test_outputs_survive_preemption(tiny_llama, seed):
    """A KV cache too small for the batch preempts sequences mid-output; their matchers stay where they were."""
    llm = LLM(tiny_llama, backend="numpy", num_blocks=24, block_size=16, max_num_batched_tokens=64)
    params = [SamplingParams(max_new_tokens=200, json_schema=TAGS, do_sample=True, seed=seed + i) for i in range(6)]
    outputs = llm.generate([f"tags {i}" for i in range(6)], params)
    assert llm.stats.preemptions > 0
    for out in outputs:
        if out.finish_reason == "stop":
            valid(out.text, TAGS)
        else:  # a prefix that ran out of max_new_tokens; never an error
            assert out.finish_reason == "length" and out.error is None and out.text.startswith('{"caption": "')


def test_a_matcher_in_error_fails_its_sequence_alone(tiny_llama, monkeypatch):
    llm = LLM(tiny_llama, backend="numpy")
    real = llm.engine.grammars.matcher

    class Broken:
        def __init__(self, matcher):
            self.matcher = matcher

        def __getattr__(self, name):
            return getattr(self.matcher, name)

        def is_error(self):
            return True

        def get_error(self):
            return "parser too complex"

    monkeypatch.setattr(llm.engine.grammars, "matcher", lambda schema: Broken(real(schema)))
    fails_alone(llm, TAGS, "parser too complex")


def test_grammars_cache_compiled_schemas(tiny_llama):
    llm = LLM(tiny_llama, backend="numpy")
    grammars: Grammars = llm.engine.grammars
    schema = schema_text(None, TAGS)
    assert grammars.compile(schema) is grammars.compile(schema)


# -- the real model


@pytest.mark.parametrize("name, schema, example", FINITE + OPEN, ids=[n for n, _, _ in FINITE + OPEN])
def test_real_smollm2_outputs_validate(smollm2_gguf, name, schema, example):
    llm = _real_llm(smollm2_gguf)
    chat = [{"role": "user", "content": f"Give one example of a {name} as JSON, like {json.dumps(example)}"}]
    out = llm.generate(chat, SamplingParams(max_new_tokens=300, json_schema=schema, repetition_penalty=1.2))[0]
    assert out.finish_reason == "stop", out.text
    valid(out.text, schema)


_REAL = {}


def _real_llm(path):
    if path not in _REAL:
        _REAL[path] = LLM(str(path), backend="numpy")
    return _REAL[path]
