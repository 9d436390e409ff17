"""Structured outputs through the server: response_format json_object / json_schema (with the real openai client and
streamed), answered as LLM.generate answers; a schema that cannot compile or a malformed response_format is a 400
naming response_format, and the server goes on serving."""
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
httpx = pytest.importorskip("httpx")

from smolvlm_fast import SamplingParams  # noqa: E402
from smolvlm_fast.serving.llm import LLM  # noqa: E402
from smolvlm_fast.serving.server.app import create_app  # noqa: E402
from tests.server_harness import running  # noqa: E402
from tests.structured_schemas import FINITE, INVALID, MAX_FINITE_TOKENS, PERSON  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama):
    llm = LLM(tiny_llama, backend="numpy")
    with running(create_app(llm, model_name=MODEL)) as url:
        yield SimpleNamespace(url=url, llm=llm)
    llm.shutdown()


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def chat(server, response_format, content="Answer in JSON.", **fields):
    body = {"model": MODEL, "max_tokens": MAX_FINITE_TOKENS, "temperature": 0, "response_format": response_format,
            "messages": [{"role": "user", "content": content}], **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


@pytest.mark.parametrize("name, schema, _", FINITE, ids=[n for n, _, _ in FINITE])
def test_json_schema_answers_as_llm_generate(server, name, schema, _):
    reply = chat(server, schema_format(schema))
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    chat_prompt = [{"role": "user", "content": "Answer in JSON."}]
    expected = server.llm.generate(chat_prompt, SamplingParams(max_new_tokens=MAX_FINITE_TOKENS, json_schema=schema))
    assert choice["message"]["content"] == expected[0].text


def test_json_object_streamed_and_completions(server):
    reply = chat(server, {"type": "json_object"}, stream=True, seed=3, temperature=1.0,
                 max_tokens=64)  # sampled: an open object may not close in 64 tokens
    assert reply.status_code == 200
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                   for line in reply.text.splitlines() if line.startswith("data: {") and '"choices": [{' in line)
    assert text.startswith("{")
    body = {"model": MODEL, "prompt": "JSON:", "max_tokens": MAX_FINITE_TOKENS, "temperature": 0,
            "response_format": schema_format(PERSON)}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    jsonschema.validate(json.loads(reply.json()["choices"][0]["text"]), PERSON)


def test_text_format_changes_nothing(server):
    plain = chat(server, None, max_tokens=6).json()["choices"][0]["message"]["content"]
    assert chat(server, {"type": "text"}, max_tokens=6).json()["choices"][0]["message"]["content"] == plain


@pytest.mark.parametrize("response_format", [schema_format(s) for s in INVALID] + [
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "yaml"},
    "json_object",
    {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}},
], ids=str)
def test_bad_response_formats_are_400s(server, response_format):
    reply = chat(server, response_format, max_tokens=4)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].startswith("response_format")
    assert chat(server, {"type": "json_object"}, max_tokens=4).status_code == 200  # still serving


def test_openai_client_parses_the_answer(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    schema = FINITE[1][1]
    reply = client.chat.completions.create(model=MODEL, max_tokens=MAX_FINITE_TOKENS, temperature=0,
                                           messages=[{"role": "user", "content": "A person, as JSON."}],
                                           response_format=schema_format(schema))
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


# -- fuzzed schemas: whatever a client sends as a schema, the answer is a 200 or a 400 naming response_format, and
# the server goes on serving; an answer of 200 parses as JSON that validates, unless max_tokens cut it ("length").

def schemas_strategy():
    from hypothesis import strategies as st

    numbers = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=False, allow_infinity=False),
                        st.sampled_from([0, -1, 2**63]))
    counts = st.one_of(st.integers(-3, 6), st.sampled_from([10**9, 2**64]))
    text = st.text(max_size=12)
    leaf = st.fixed_dictionaries({}, optional={
        "type": st.one_of(st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array",
                                           "no-such-type"]), st.lists(st.sampled_from(["string", "null"]))),
        "minimum": numbers, "maximum": numbers, "exclusiveMinimum": numbers, "multipleOf": numbers,
        "minLength": counts, "maxLength": counts, "pattern": st.one_of(text, st.sampled_from(
            ["^[a-z]+$", "(a|aa)*b", "(unclosed", "\\d{2,}", "[", "x{3,1}"])),
        "format": st.sampled_from(["date", "email", "uuid", "bogus"]), "enum": st.lists(st.one_of(text, numbers)),
        "const": st.one_of(text, numbers, st.none()), "$ref": st.sampled_from(["#", "#/$defs/a", "#/nope", "x.json"]),
    })

    def extend(children):
        return st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["object", "array"]),
            "properties": st.dictionaries(text, children, max_size=3), "required": st.lists(text, max_size=3),
            "additionalProperties": st.one_of(st.booleans(), children), "items": children,
            "minItems": counts, "maxItems": counts, "anyOf": st.lists(children, max_size=3),
            "oneOf": st.lists(children, max_size=2), "allOf": st.lists(children, max_size=2), "not": children,
            "$defs": st.dictionaries(st.just("a"), children, max_size=1),
        })
    return st.recursive(leaf, extend, max_leaves=8)


def test_fuzzed_schemas_are_answered_or_refused(server):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(schemas_strategy())
    def one(schema):
        reply = chat(server, schema_format(schema), max_tokens=8)
        assert reply.status_code in (200, 400), (schema, reply.status_code, reply.text[:300])
        if reply.status_code == 400:
            assert reply.json()["error"]["param"].startswith("response_format"), reply.text
            return
        choice = reply.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            json.loads(choice["message"]["content"])

    one()
    assert chat(server, {"type": "json_object"}, max_tokens=4).status_code == 200  # still serving
