"""What a new user met with the real `openai` client, each kept as a test: `serve` without a model serves the default
one under a short name (never an absolute path), explicit nulls are the defaults, GET /v1/models/{id} answers,
seed -1 is no seed, an unreadable image is said so in words, and the documented refusals and defaults hold."""
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from smolvlm_fast import SamplingParams  # noqa: E402
from smolvlm_fast.serving.server import app as server_app  # noqa: E402
from smolvlm_fast.serving.server.app import create_app, load_served, served_model_name  # noqa: E402
from smolvlm_fast.serving.server.limits import Limits  # noqa: E402
from tests.server_harness import data_url, running  # noqa: E402
from tests.test_readme import python_block  # noqa: E402

LIMITS = Limits(max_tokens=8)  # small, so that a request without max_tokens is quick


def client_for(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def server(tiny_idefics3):
    llm, name = load_served(tiny_idefics3, backend="numpy", max_num_batched_tokens=256, ignore_eos=True)
    try:
        with running(create_app(llm, model_name=name, limits=LIMITS)) as url:
            yield SimpleNamespace(url=url, llm=llm, name=name, client=client_for(url))
    finally:
        llm.shutdown()


def chat(text: str = "Hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy(server, messages, n: int) -> str:
    return server.llm.generate(messages, SamplingParams(max_new_tokens=n))[0].text


# -- the model's name, and serve without a model

def test_a_model_is_named_by_its_file_stem_or_directory_never_its_path(tmp_path, server, tiny_idefics3):
    gguf = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert served_model_name(gguf) == "SmolLM2-135M-Instruct.Q4_1"
    assert served_model_name(str(tmp_path / "models") + "/") == "models"
    assert served_model_name("HuggingFaceTB/SmolVLM-256M-Instruct") == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert server.name == Path(tiny_idefics3).name
    assert [m.id for m in server.client.models.list()] == [server.name]
    with pytest.raises(openai.NotFoundError) as missing:
        server.client.chat.completions.create(model="gpt-4o", messages=chat(), max_tokens=1)
    assert str(Path(tiny_idefics3).parent) not in missing.value.message  # the name, not where it lives


def test_serve_without_a_model_serves_the_default_one(monkeypatch, tiny_llama):
    from smolvlm_fast import cli

    seen = {}
    monkeypatch.setattr(server_app, "serve", lambda model, **kwargs: seen.update(model=model, **kwargs))
    assert cli.main(["serve"]) == 0
    assert seen["model"] is None and seen["model_name"] is None and seen["limits"] == Limits()
    assert cli.main(["serve", "--served-model-name", "mine"]) == 0
    assert seen["model_name"] == "mine"

    monkeypatch.setattr(server_app, "default_model_path", lambda: Path(tiny_llama))  # as generate's default
    llm, name = load_served(None, backend="numpy")
    try:
        assert name == Path(tiny_llama).name and llm.model.config.text.vocab_size > 0
        assert load_served(llm, "named")[1] == "named"
    finally:
        llm.shutdown()


def test_the_serve_limit_flags_are_the_fields_of_limits():
    from smolvlm_fast import cli

    flags = ["--max-body-bytes", "1", "--max-images", "2", "--max-image-bytes", "3", "--max-image-pixels", "4",
             "--max-tokens", "5", "--max-model-len", "6", "--remote-timeout", "0.5"]
    args = cli.build_parser().parse_args(["serve", *flags])
    assert (args.max_body_bytes, args.max_images, args.max_image_bytes, args.max_image_pixels, args.max_tokens,
            args.max_model_len, args.remote_timeout_s) == (1, 2, 3, 4, 5, 6, 0.5)
    defaults = cli.build_parser().parse_args(["serve"])
    assert Limits(**{name: getattr(defaults, name) for name in Limits.__dataclass_fields__}) == Limits()


# -- GET /v1/models/{id}

def test_models_retrieve(server):
    model = server.client.models.retrieve(server.name)
    assert model.id == server.name and model.object == "model" and model.owned_by == "smolvlm_fast"
    with pytest.raises(openai.NotFoundError) as missing:
        server.client.models.retrieve("no-such-model")
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    assert missing.value.body["param"] == "model" and missing.value.body["type"] == "invalid_request_error"


def test_models_retrieve_a_name_with_a_slash(tiny_llama):
    from smolvlm_fast.serving.llm import LLM

    llm = LLM(tiny_llama, backend="numpy")
    try:
        with running(create_app(llm, model_name="org/tiny-llama")) as url:
            assert client_for(url).models.retrieve("org/tiny-llama").id == "org/tiny-llama"
            assert httpx.get(f"{url}/v1/models/org/tiny-llama").json()["id"] == "org/tiny-llama"
    finally:
        llm.shutdown()


# -- nulls and seed -1

def test_explicit_nulls_are_the_defaults(server):
    want = greedy(server, chat(), 3)
    reply = server.client.chat.completions.create(model=server.name, messages=chat(), max_tokens=3, temperature=0,
                                                  n=None, stream=None)
    assert reply.choices[0].message.content == want and len(reply.choices) == 1
    chunks = list(server.client.chat.completions.create(model=server.name, messages=chat(), max_tokens=3,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": None}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert all(c.usage is None for c in chunks)  # null: no usage chunk, as false
    raw = {"model": server.name, "messages": chat(), "max_tokens": 3, "temperature": 0, "n": None, "stream": None,
           "stream_options": {"include_usage": None}, "seed": None}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(raw),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == want


def test_seed_minus_one_is_no_seed(server):
    want = greedy(server, chat(), 3)
    reply = server.client.chat.completions.create(model=server.name, messages=chat(), max_tokens=3, temperature=0,
                                                  seed=-1)
    assert reply.choices[0].message.content == want
    sampled = server.client.completions.create(model=server.name, prompt="Once", max_tokens=3, seed=-1)
    assert sampled.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as refused:
        server.client.chat.completions.create(model=server.name, messages=chat(), max_tokens=3, seed=-2)
    assert refused.value.param == "seed"


# -- an unreadable image

def test_an_unreadable_image_is_said_so_in_words(server):
    not_an_image = data_url(0).split(",")[0] + ",bm90IGFuIGltYWdlIGF0IGFsbA=="  # base64 of "not an image at all"
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": not_an_image}},
                                             {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(openai.BadRequestError) as refused:
        server.client.chat.completions.create(model=server.name, messages=messages, max_tokens=2)
    message = refused.value.body["message"]
    assert refused.value.code == "invalid_image" and refused.value.param == "messages.0.content.0.image_url"
    assert "not a readable image" in message and "<_io" not in message and " at 0x" not in message, message


# -- the documented refusals and defaults

@pytest.mark.parametrize("field, value", [("echo", True), ("suffix", "The end."), ("best_of", 2)])
def test_echo_suffix_and_best_of_are_refused(server, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        server.client.completions.create(model=server.name, prompt="Once", max_tokens=2, **{field: value})
    assert refused.value.param == field and "not supported" in refused.value.body["message"]


def test_a_list_of_prompts_is_refused_and_a_list_of_one_is_one_prompt(server):
    with pytest.raises(openai.BadRequestError) as refused:
        server.client.completions.create(model=server.name, prompt=["Once", "Twice"], max_tokens=2)
    assert refused.value.param == "prompt" and "one per request" in refused.value.body["message"]
    one = server.client.completions.create(model=server.name, prompt=["Once"], max_tokens=2, temperature=0)
    assert one.choices[0].text == server.client.completions.create(model=server.name, prompt="Once", max_tokens=2,
                                                                   temperature=0).choices[0].text


def test_without_max_tokens_a_completion_runs_to_the_servers_max_tokens(server):
    assert Limits().max_tokens == 4096  # the README's number
    reply = server.client.completions.create(model=server.name, prompt="Once", temperature=0)
    assert reply.usage.completion_tokens == LIMITS.max_tokens and reply.choices[0].finish_reason == "length"


# -- the README's example, on the default model

@pytest.mark.slow
def test_the_readme_serve_example_on_the_default_model(smollm2_gguf, capsys):
    llm, name = load_served(None, backend="numpy")
    try:
        with running(create_app(llm, model_name=name)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
            reply = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": "What is a pixel?"}])
            assert reply.choices[0].message.content and reply.usage.completion_tokens <= 8
            # the README's structured-output request, with its schema from the README's LLM example
            scope = {"client": client}
            exec(python_block("json_schema=capital").split("llm = LLM()")[0], scope)
            exec(textwrap.dedent(python_block("response_format={")), scope)
        assert "Paris" in capsys.readouterr().out
    finally:
        llm.shutdown()
