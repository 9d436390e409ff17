"""Hostile requests against the server on 127.0.0.1: a schema-driven fuzz (schemathesis over the server's own
/openapi.json, bodies that fit the schema and bodies that break it) in which every answer is a success or a 4xx with an
OpenAI error body, never a 5xx, a hang or a dead server; then every numeric parameter out of its range, stop lists,
the context, the body size and image URLs, each refused with a 400 (413) naming the field.

SMOLVLM_FAST_FUZZ_EXAMPLES=2000 runs a longer fuzz (and randomly, where CI replays the same examples)."""
import json
import math
import os
import socket
from collections import Counter
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smolvlm_fast import SamplingParams  # noqa: E402
from smolvlm_fast.errors import InputError  # noqa: E402
from smolvlm_fast.serving.llm import LLM  # noqa: E402
from smolvlm_fast.serving.server.app import create_app  # noqa: E402
from smolvlm_fast.serving.server.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, Limits  # noqa: E402
from tests.server_harness import data_url, png, running, wait_until_idle  # noqa: E402

MODEL = "tiny-smolvlm"
LIMITS = Limits(max_body_bytes=256 << 10, max_images=2, max_tokens=16)  # small: each accepted request is quick
CONTEXT = 2048  # the tiny checkpoint's max_position_embeddings
EXAMPLES = int(os.environ.get("SMOLVLM_FAST_FUZZ_EXAMPLES", "0")) or None  # per generation mode; None: CI's
CI_EXAMPLES = 300


@pytest.fixture(scope="module")
def server(tiny_idefics3, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "cat.png").write_bytes(png(7))
    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=256, ignore_eos=True)
    app = create_app(llm, model_name=MODEL, allowed_local_dir=allowed, limits=LIMITS)
    try:
        with running(app) as url:
            yield SimpleNamespace(url=url, llm=llm, http=httpx.Client(base_url=url, timeout=60),
                                  schema=schemathesis.openapi.from_url(f"{url}/openapi.json"))
    finally:
        llm.shutdown()


def check_answer(response, mode: str) -> None:
    """A success (whole JSON or a whole event stream ending in [DONE]) or a 4xx with an OpenAI error body."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert {"param", "code"} <= error.keys()
        return
    assert mode == "positive" or response.request.method == "GET", "a body that breaks the schema was accepted"
    kind = response.headers.get("content-type", [""])[0]  # schemathesis keeps each header as a list
    if kind.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e[:10] for e in events), events
        for event in events[:-1]:
            json.loads(event)  # each one whole
    elif kind.startswith("application/json"):
        response.json()


def meaningful(body, data) -> None:
    """Some generated requests name the served model, carry real images, a prompt of one text or of token ids and
    a max_tokens within the limit, so that they get past those checks and run (a random string is never the
    model's name or a readable image)."""
    if not isinstance(body, dict):
        return
    if "model" in body and data.draw(st.booleans()):
        body["model"] = MODEL
    if "max_tokens" in body and data.draw(st.booleans()):
        body["max_tokens"] = data.draw(st.integers(1, LIMITS.max_tokens))
    if "prompt" in body and data.draw(st.booleans()):
        body["prompt"] = data.draw(st.one_of(st.text(min_size=1), st.lists(st.integers(0, 423), min_size=1)))
    for message in body.get("messages") or []:
        parts = message.get("content") if isinstance(message, dict) else None
        for part in parts if isinstance(parts, list) else []:
            image = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(image, dict) and data.draw(st.booleans()):
                image["url"] = data.draw(st.sampled_from([data_url(0), data_url(1, (100, 180)), "cat.png"]))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_never_a_5xx_a_hang_or_a_dead_server(server, mode):
    statuses = Counter()
    strategy = server.schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @settings(max_examples=EXAMPLES or CI_EXAMPLES, derandomize=EXAMPLES is None, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(data=st.data())
    def fuzz(data):
        case = data.draw(strategy)
        if mode == "positive":
            meaningful(case.body, data)
        response = case.call(base_url=server.url, timeout=60)  # a hang detector, not a timing
        statuses[case.path, response.status_code] += 1
        check_answer(response, mode)

    fuzz()
    print(f"fuzz ({mode}): {sum(statuses.values())} requests, by path and status: {dict(statuses)}")
    assert statuses
    assert server.http.get("/health").json() == {"status": "ok"}
    wait_until_idle(server.url)


# -- each limit, by hand

BAD_NUMBERS = [-1, 0, 1.5, 10**30, 1e300, -1e300, math.nan, math.inf, -math.inf, True, False, "1", [1], {"a": 1}, None]
GOOD = {  # field: values in its range (an integer may be written 5.0, as JSON Schema has it)
    "max_tokens": [1, 2.0, LIMITS.max_tokens], "max_completion_tokens": [1, LIMITS.max_tokens],
    "temperature": [0, 1e-300, 1e-5, 0.7, 1.5, 2], "top_p": [1e-300, 0.5, 1], "top_k": [-1, 0, 1, 10**30],
    "n": [1, 1.0], "seed": [-1, 0, 2**64 - 1], "repetition_penalty": [0.01, 1, 1.5, 100],
    "frequency_penalty": [0], "presence_penalty": [0], "logprobs": [False, 0], "top_logprobs": [0],
}
CHAT_ONLY = {"max_completion_tokens"}


def post(server, body, path="/v1/chat/completions"):
    """Raw JSON text: NaN and Infinity as Python writes them, which the json module on the other side reads."""
    return server.http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def refused(response, param: str | None, code: str | None = None, status: int = 400) -> None:
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (status, param), (response.status_code, error)
    assert error["type"] == "invalid_request_error" and error["message"]
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("field", list(GOOD))
def test_every_numeric_parameter_out_of_its_range_is_a_400_naming_it(server, field):
    paths = ["/v1/chat/completions"] + ([] if field in CHAT_ONLY else ["/v1/completions"])
    for path in paths:
        body = chat() if path == "/v1/chat/completions" else {"prompt": "Hi", **chat()}
        for value in BAD_NUMBERS:
            if value is None or any(value == g and type(value) is type(g) for g in GOOD[field]):
                continue  # the default, or in the range
            refused(post(server, {**body, field: value}, path), field)
        for value in GOOD[field]:  # sampled (temperature 1 unless it is the field), the edges of each range run
            response = post(server, {**body, "temperature": 1.0, field: value}, path)
            assert response.status_code == 200, (path, field, value, response.text)


def test_text_that_is_no_unicode_is_a_400(server):
    """JSON can carry an unpaired surrogate (\\ud800), which the tokenizer cannot take."""
    for path, body, param in [
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "Hi \ud800"}]), "messages.0.content"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
         "messages.0.content.0.text"),
        ("/v1/chat/completions", chat(stop=["\ud800"]), "stop.0"),
        ("/v1/completions", {"prompt": "Once \ud800", "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["\ud800"], "max_tokens": 2}, "prompt.0"),
    ]:
        response = server.http.post(path, content=json.dumps(body, ensure_ascii=True),
                                    headers={"content-type": "application/json"})
        refused(response, param)
        assert "surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", True), ("max_new_tokens", 2.0), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", math.nan), ("repetition_penalty", math.inf), ("top_k", False), ("seed", -1), ("seed", 1.5),
    ("stop_token_ids", ("1",)), ("stop_strings", ("",)),
])
def test_sampling_params_behind_the_border_refuse_what_would_break_sampling(field, value):
    with pytest.raises(InputError, match=f"SamplingParams: {field} must"):
        SamplingParams(**{field: value})


def test_a_temperature_too_small_to_divide_by_is_greedy():
    assert SamplingParams(temperature=1e-300, do_sample=True).greedy
    assert not SamplingParams(temperature=1e-5, do_sample=True).greedy


def test_stop_lists_are_bounded(server):
    for stop in ([""], ["x" * (MAX_STOP_CHARS + 1)], ["a"] * (MAX_STOP_STRINGS + 1), [1], 5, [["a"]]):
        response = post(server, chat(stop=stop))
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("stop"), stop
    ok = post(server, chat(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS))
    assert ok.status_code == 200, ok.text


def test_prompt_and_max_tokens_must_fit_the_context(server):
    def completion(n_prompt, max_tokens=None):
        return post(server, {"model": MODEL, "prompt": [5] * n_prompt, "max_tokens": max_tokens},
                    "/v1/completions")

    refused(completion(CONTEXT - 3, 4), "prompt", "context_length_exceeded")
    refused(completion(CONTEXT), "prompt", "context_length_exceeded")
    refused(completion(CONTEXT + 1), "prompt", "context_length_exceeded")
    assert completion(CONTEXT - 4, 4).json()["usage"]["completion_tokens"] == 4
    assert completion(CONTEXT - 1).json()["usage"]["completion_tokens"] == 1  # the room left, by default
    body = chat(messages=[{"role": "user", "content": "word " * CONTEXT}], max_completion_tokens=4)
    response = post(server, body)
    refused(response, "messages", "context_length_exceeded")
    assert "max_completion_tokens" in response.json()["error"]["message"]


def test_the_body_size_is_capped_by_its_header_and_by_the_bytes_that_come(server):
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * LIMITS.max_body_bytes}])).encode()
    refused(server.http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}),
            None, "request_too_large", 413)

    def chunks():  # no Content-Length: chunked, counted as it comes
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]
    refused(server.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}),
            None, "request_too_large", 413)
    assert post(server, chat()).status_code == 200


def test_a_body_announced_too_large_is_refused_before_it_is_read(server):
    """A client that announces 10 GB and sends a byte: answered at once (were the body awaited, this would hang)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n{")
        answer = b""
        while b"request_too_large" not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer, answer


@pytest.mark.parametrize("url, code", [
    ("http://example.com/cat.png", "remote_urls_disabled"),
    ("https://example.com/cat.png", "remote_urls_disabled"),
    ("ftp://example.com/cat.png", None),
    ("javascript:alert(1)", None),
    ("file://example.com/cat.png", None),
    ("file:///etc/passwd", "path_not_allowed"),
    ("/etc/passwd", "path_not_allowed"),
    ("//example.com/cat.png", "path_not_allowed"),
    ("missing.png", "image_not_found"),
    ("data:text/html;base64,PGI+aGk8L2I+", "invalid_image"),
    ("data:image/png,not-base64", "invalid_image"),
    ("", None), (".", None),  # the allowed directory itself
    ("cat.png\0.txt", None), ("file:///cat.png%00.txt", None), ("http://[::1/cat.png", None),
])
def test_image_urls_other_than_data_urls_are_refused_unless_allowed(server, url, code):
    body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "What is it?"}]}])
    refused(post(server, body), "messages.0.content.0.image_url", code)
    body["messages"][0]["content"][0]["image_url"]["url"] = "cat.png"  # inside the allowed directory
    assert post(server, body).status_code == 200
