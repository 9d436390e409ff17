"""The OpenAI-compatible server, started on 127.0.0.1 in a thread over a tiny random checkpoint and called with the
real `openai` client: chat with an image (streamed and not) equal to LLM.generate, completions, models, health and
metrics; malformed requests answered 400 with an OpenAI error body while good ones complete beside them; a client
that leaves frees its sequence; an unexpected failure is one request's 500."""
import asyncio
import base64
import io
import json
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from smolvlm_fast import SamplingParams  # noqa: E402
from smolvlm_fast.serving.llm import LLM  # noqa: E402
from smolvlm_fast.serving.server.app import create_app  # noqa: E402
from smolvlm_fast.serving.server.images import fetch_remote  # noqa: E402
from smolvlm_fast.serving.server.protocol import ApiError, Limits  # noqa: E402
from tests.server_harness import running  # noqa: E402

MODEL = "tiny-smolvlm"
LIMITS = Limits(max_body_bytes=1 << 20, max_images=2, max_tokens=1024)


def picture(seed: int, size=(30, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def image_chat(url: str, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def expected(llm: LLM, url: str, max_tokens: int, question: str = "What is in the picture?"):
    """What LLM.generate answers to the same chat (greedy), the image given as LLM takes it."""
    chat = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": question}]}]
    return llm.generate(chat, SamplingParams(max_new_tokens=max_tokens))[0]


@pytest.fixture(scope="module")
def vlm(tiny_idefics3):
    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=256, ignore_eos=True)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(vlm, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    app = create_app(vlm, model_name=MODEL, allowed_local_dir=allowed, limits=LIMITS)
    with running(app) as url:
        yield SimpleNamespace(url=url, llm=vlm, allowed=allowed,
                              client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by Prometheus' own parser: {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_parser.text_string_to_metric_families(text) for s in family.samples}


def test_chat_with_an_image_equals_generate_streamed_or_not(server):
    url = data_url(png(picture(0)))
    want = expected(server.llm, url, 8)
    reply = server.client.chat.completions.create(model=MODEL, messages=image_chat(url), max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == "length" and reply.model == MODEL and reply.object == "chat.completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.num_prompt_tokens, 8)
    assert reply.usage.total_tokens == want.num_prompt_tokens + 8

    chunks = list(server.client.chat.completions.create(model=MODEL, messages=image_chat(url), max_tokens=8,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.num_prompt_tokens, 8)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its full blocks were cached


def test_completions_models_health_and_metrics(server):
    before = metrics(server.url)
    want = server.llm.generate("Once upon a time", SamplingParams(max_new_tokens=5))[0]
    reply = server.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert reply.choices[0].text == want.text and reply.usage.completion_tokens == 5
    by_ids = server.client.completions.create(model=MODEL, prompt=want.prompt_token_ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == want.text
    assert [m.id for m in server.client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}

    after = metrics(server.url)
    ok = ("smolvlm_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert after[ok] - before.get(ok, 0) == 2
    assert after["smolvlm_generation_tokens_total", ()] - before["smolvlm_generation_tokens_total", ()] == 10
    assert after["smolvlm_prompt_tokens_total", ()] - before["smolvlm_prompt_tokens_total", ()] == \
        2 * want.num_prompt_tokens
    ttft = ("smolvlm_time_to_first_token_seconds_count", ())
    assert after[ttft] - before[ttft] == 2
    allocator = server.llm.engine.cache.allocator
    assert after["smolvlm_kv_cache_blocks_total", ()] == allocator.num_blocks
    assert after["smolvlm_kv_cache_blocks_used", ()] == 0 and after["smolvlm_num_requests_running", ()] == 0
    assert after["smolvlm_prefix_cache_hit_tokens_total", ()] >= 16  # the second prompt found the first's block


def test_malformed_requests_get_400s_while_concurrent_good_ones_complete(server, tmp_path):
    image = png(picture(1))
    (server.allowed / "cat.png").write_bytes(image)
    (tmp_path / "secret.png").write_bytes(image)
    (server.allowed / "link.png").symlink_to(tmp_path / "secret.png")
    good = [(data_url(image), 6), (f"file://{server.allowed / 'cat.png'}", 7), ("cat.png", 5),
            (data_url(png(picture(2))), 9)]
    wants = [expected(server.llm, data_url(image) if "data:" not in u else u, n) for u, n in good]
    chat = image_chat(data_url(image))
    bad = [  # (body, status, param, code)
        (b"{not json", 400, None, "invalid_json"),
        ({"model": MODEL}, 400, "messages", None),
        ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role", None),
        ({"messages": image_chat("data:image/png;base64,!!!not base64!!!")}, 400,
         "messages.0.content.0.image_url", "invalid_image"),
        ({"messages": image_chat(data_url(b"this is not an image at all"))}, 400,
         "messages.0.content.0.image_url", "invalid_image"),
        ({"messages": image_chat(data_url(image)) + image_chat(data_url(image)) + image_chat(data_url(image))}, 400,
         "messages", "too_many_images"),
        ({"messages": chat, "max_tokens": LIMITS.max_tokens + 1}, 400, "max_tokens", "max_tokens_too_large"),
        ({"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 300}],
          "max_tokens": 100}, 400, "messages", "context_length_exceeded"),
        ({"messages": image_chat("https://example.com/cat.png")}, 400, "messages.0.content.0.image_url",
         "remote_urls_disabled"),
        ({"messages": image_chat(str(tmp_path / "secret.png"))}, 400, "messages.0.content.0.image_url",
         "path_not_allowed"),
        ({"messages": image_chat("../secret.png")}, 400, "messages.0.content.0.image_url", "path_not_allowed"),
        ({"messages": image_chat("link.png")}, 400, "messages.0.content.0.image_url", "path_not_allowed"),
        ({"messages": chat, "n": 2}, 400, "n", None),
        ({"messages": chat, "frequency_penalty": 0.5}, 400, "frequency_penalty", None),
        ({"messages": chat, "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"messages": image_chat(data_url(b"x" * (LIMITS.max_body_bytes + 1)))}, 413, None, "request_too_large"),
    ]

    async def good_request(client, url, n):
        return await client.chat.completions.create(model=MODEL, messages=image_chat(url), max_tokens=n,
                                                    temperature=0)

    async def bad_request(http, body):
        content = body if isinstance(body, bytes) else json.dumps({"model": MODEL, **body}).encode()
        return await http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            requests = [good_request(client, u, n) for u, n in good] + [bad_request(http, b) for b, *_ in bad]
            return await asyncio.gather(*requests)

    results = asyncio.run(main())
    for reply, want in zip(results, wants):
        assert reply.choices[0].message.content == want.text and reply.usage.completion_tokens == len(want.token_ids)
    for response, (body, status, param, code) in zip(results[len(good):], bad):
        error = response.json()["error"]
        assert (response.status_code, error["param"], error["code"]) == (status, param, code), error
        assert error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError) as refused:  # as the openai client sees it
        server.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=LIMITS.max_tokens + 1)
    assert refused.value.code == "max_tokens_too_large" and refused.value.param == "max_tokens"


@contextmanager
def slow_steps(llm: LLM, monkeypatch):
    """Every engine step takes a few milliseconds more, so that a long request is still running when its client
    leaves (what is checked is that it was stopped early, never a time)."""
    step = llm.engine.step

    def slow():
        time.sleep(0.005)
        return step()
    monkeypatch.setattr(llm.engine, "step", slow)
    yield
    monkeypatch.undo()


def wait_until_idle(llm: LLM) -> None:
    allocator = llm.engine.cache.allocator
    for _ in range(1000):
        if not llm.engine.has_unfinished() and allocator.num_free == allocator.num_blocks:
            return
        time.sleep(0.01)
    raise AssertionError("the request was not stopped: its blocks are still held")


def test_a_client_that_disconnects_frees_its_sequence(server, monkeypatch):
    body = {"model": MODEL, "messages": image_chat(data_url(png(picture(3)))), "max_tokens": 1000, "stream": True}
    generated = ("smolvlm_generation_tokens_total", ())
    before = metrics(server.url)
    with slow_steps(server.llm, monkeypatch):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            events = (line for line in response.iter_lines() if line.startswith("data:"))
            for _ in range(6):
                next(events)
            running = metrics(server.url)
            assert running["smolvlm_num_requests_running", ()] == 1
            assert running["smolvlm_kv_cache_blocks_used", ()] > 0
        wait_until_idle(server.llm)  # the stream was closed mid-way: its request was aborted, its blocks freed
        streamed = metrics(server.url)
        assert 0 < streamed[generated] - before[generated] < 1000

        # Not streamed: a client that gives up waiting leaves too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        wait_until_idle(server.llm)
    after = metrics(server.url)
    assert after[generated] - streamed[generated] < 1000
    gone = ("smolvlm_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "499")))
    assert after[gone] - before.get(gone, 0) == 1


def test_an_unexpected_failure_is_one_requests_500(server, monkeypatch):
    make_request = server.llm.make_request

    def failing(prompt, *args, **kwargs):
        if prompt == "boom":
            raise RuntimeError("something unexpected")
        return make_request(prompt, *args, **kwargs)
    monkeypatch.setattr(server.llm, "make_request", failing)
    with pytest.raises(openai.InternalServerError) as failed:
        server.client.completions.create(model=MODEL, prompt="boom", max_tokens=3)
    assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"
    assert server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).usage.completion_tokens == 3


def test_remote_images_are_never_fetched_from_private_addresses():
    for url in ("http://127.0.0.1:9/cat.png", "http://localhost/cat.png", "http://[::1]/cat.png",
                "http://10.1.2.3/cat.png", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(ApiError) as refused:
            asyncio.run(fetch_remote(url, Limits(), "image_url"))
        assert refused.value.code == "image_url_not_allowed", url


def test_allowed_image_domains_match_the_hosts_and_their_subdomains_only():
    from smolvlm_fast.serving.server.images import domain_allowed

    allowed = ("example.com", "cdn.example.org")
    for host in ("example.com", "img.Example.COM", "example.com.", "a.b.cdn.example.org"):
        assert domain_allowed(host, allowed), host
    for host in ("evilexample.com", "example.com.evil.org", "example.org", "com", ""):
        assert not domain_allowed(host, allowed), host


def test_a_remote_image_is_fetched_within_the_limits(tmp_path, monkeypatch):
    """The fetch itself, from a local HTTP server standing in for a public one (the address check let through)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from smolvlm_fast.serving.server import images as server_module

    image = png(picture(5))
    (tmp_path / "cat.png").write_bytes(image)
    (tmp_path / "notes.txt").write_text("not an image")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as http_server:
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        base = f"http://localhost:{http_server.server_address[1]}"

        async def public(host, port, param):
            return "127.0.0.1"
        monkeypatch.setattr(server_module, "public_address", public)

        def fetch(path, limits=Limits(), domains=()):
            source = server_module.ImageSource(limits, None, allow_remote_urls=not domains, allowed_domains=domains)
            return asyncio.run(source.data_url(f"{base}/{path}", "image_url"))

        assert fetch("cat.png") == data_url(image)
        assert fetch("cat.png", domains=("LocalHost",)) == data_url(image)  # an allowed domain alone enables fetching
        for domains in (("example.com",), ("host",), ("calhost",)):
            with pytest.raises(ApiError) as refused:
                fetch("cat.png", domains=domains)
            assert refused.value.code == "image_domain_not_allowed", domains
        for path, limits, code in [("cat.png", Limits(max_image_bytes=100), "image_too_large"),
                                   ("missing.png", Limits(), "image_fetch_failed"),
                                   ("notes.txt", Limits(), "invalid_image")]:
            with pytest.raises(ApiError) as refused:
                fetch(path, limits)
            assert refused.value.code == code, path
        http_server.shutdown()


def test_a_text_model_on_the_torch_backend(tiny_llama):
    llm = LLM(tiny_llama, backend="torch", ignore_eos=True)
    with running(create_app(llm, model_name="tiny-llama")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
        want = llm.generate(messages, SamplingParams(max_new_tokens=6))[0]
        reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == want.text
        with pytest.raises(openai.BadRequestError, match="text-only"):
            client.chat.completions.create(model="tiny-llama", messages=image_chat(data_url(png(picture(4)))))
    llm.shutdown()


def test_the_serve_command_passes_its_flags(monkeypatch, tmp_path):
    from smolvlm_fast import cli
    from smolvlm_fast.serving.server import app as server_module

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda model, **kwargs: seen.update(model=model, **kwargs))
    assert cli.main(["serve", "some/model", "--port", "9000", "--allowed-local-dir", str(tmp_path),
                     "--max-images", "3", "--remote-timeout", "2.5", "--backend", "numpy"]) == 0
    assert seen["model"] == "some/model" and seen["port"] == 9000 and seen["host"] == "127.0.0.1"
    assert seen["limits"] == Limits(max_images=3, remote_timeout_s=2.5) and seen["backend"] == "numpy"
    assert seen["allowed_local_dir"] == str(tmp_path) and seen["allow_remote_urls"] is False
    assert seen["allowed_domains"] == ()
    assert cli.main(["serve", "m", "--allowed-image-domains", "example.com, cdn.example.org"]) == 0
    assert seen["allowed_domains"] == ("example.com", "cdn.example.org")
