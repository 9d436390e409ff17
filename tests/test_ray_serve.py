"""`smolvlm-fast serve --ray`: the server on a local Ray Serve (2 CPUs, 2 Engine replicas of the tiny random-weight
VLM), through the real openai client: the same greedy answers as the single-process server, requests spread over
both replicas while one image stays on one, each replica's own /health and /metrics, and one replica killed under
load: every request completes or gets a clear error (none hangs), the other replica goes on answering, and Serve
brings the count back to 2. Needs Ray Serve (pip install 'smolvlm_fast[ray]'): skipped without it."""
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from smolvlm_fast.serving.server.app import create_app, load_served  # noqa: E402
from smolvlm_fast.serving.server.limits import Limits  # noqa: E402
from tests.server_harness import data_url, running  # noqa: E402

LONG = 1800  # tokens of a request that is still streaming when its replica is killed
LIMITS = Limits(max_tokens=LONG, max_body_bytes=1 << 20)
OPTIONS = dict(backend="numpy", max_num_batched_tokens=256, ignore_eos=True)  # the local LLM's and each replica's
APP = "smolvlm"
HEADER = "x-smolvlm-replica"
TIMEOUT_S = 60  # a generous hang detector, not a timing


def client_for(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local(tiny_idefics3):
    llm, name = load_served(tiny_idefics3, **OPTIONS)
    try:
        with running(create_app(llm, model_name=name, limits=LIMITS)) as url:
            yield client_for(url)
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_idefics3):
    from smolvlm_fast.ray import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(tiny_idefics3, 2, limits=LIMITS, cpus_per_replica=1, **OPTIONS), name=APP,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(client, text: str, image: str | None = None, n: int = 4, **kwargs):
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return client.chat.completions.with_raw_response.create(
        model=None, messages=[{"role": "user", "content": content}], max_tokens=n, temperature=0, **kwargs)


def replica_of(raw) -> str:
    return raw.headers[HEADER]


def test_the_same_greedy_answers_as_the_single_process_server(cluster, local):
    remote = client_for(cluster)
    for text, image in (("Describe this.", data_url(1)), ("Hi there", None)):
        assert chat(remote, text, image, 8).parse().choices[0].message.content == \
            chat(local, text, image, 8).parse().choices[0].message.content
    for client in (remote, local):
        assert client.models.list().data[0].id
    completions = [c.completions.create(model=None, prompt="Once upon", max_tokens=6, temperature=0).choices[0].text
                   for c in (remote, local)]
    assert completions[0] == completions[1]
    streamed = ["".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
        model=None, messages=[{"role": "user", "content": "Stream it"}], max_tokens=8, temperature=0, stream=True)
        if chunk.choices) for c in (remote, local)]
    assert streamed[0] == streamed[1] and streamed[0]


def test_requests_spread_over_both_replicas_and_an_image_keeps_its_own(cluster):
    client = client_for(cluster)
    with ThreadPoolExecutor(4) as pool:
        seen = set(pool.map(lambda i: replica_of(chat(client, f"prompt number {i}", n=1)), range(16)))
        assert len(seen) == 2  # 16 keys on 2 replicas: all on one is a 2**-15 chance
        image = data_url(7)
        homes = set(pool.map(lambda i: replica_of(chat(client, f"question {i}", image, n=1)), range(6)))
    assert len(homes) == 1
    for path in ("/health", "/metrics"):  # each answered by one replica, about itself
        answer = httpx.get(cluster + path, timeout=TIMEOUT_S)
        assert answer.status_code == 200 and answer.headers[HEADER] in seen
    assert "smolvlm_num_requests_running" in httpx.get(cluster + "/metrics", timeout=TIMEOUT_S).text
    big = httpx.post(cluster + "/v1/chat/completions", content=b"x" * (2 << 20), timeout=TIMEOUT_S)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"  # refused at the front


def stream_outcome(url: str, i: int, started: dict) -> tuple[str, str]:
    """(replica, outcome) of one long streamed chat: 'ok' (it finished), 'error event' (the stream's clear error) or
    'status N'. started[i] is its replica once the stream is under way."""
    body = {"messages": [{"role": "user", "content": f"long story {i}"}], "max_tokens": LONG, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
        replica, events, buffer = r.headers.get(HEADER, ""), [], b""
        for data in r.iter_bytes():  # events split on blank lines only: a random model's text holds U+2028 & co.
            *done, buffer = (buffer + data).split(b"\n\n")
            events += [json.loads(e[6:]) for e in done if e.startswith(b"data: ") and e != b"data: [DONE]"]
            if events:
                started.setdefault(i, replica)
    if r.status_code != 200:
        return replica, f"status {r.status_code}"
    if events and "error" in events[-1]:
        return replica, "error event"
    return replica, "ok" if events and events[-1]["choices"][0]["finish_reason"] else "cut short"


def engine_replicas() -> list[tuple[str, str]]:
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{APP}#Engine#" in a["name"]]


def running_replicas() -> int:
    return serve.status().applications[APP].deployments["Engine"].replica_states.get("RUNNING", 0)


def test_a_killed_replica_is_replaced_and_no_request_hangs(cluster):
    client, started = client_for(cluster), {}
    with ThreadPoolExecutor(8) as pool:
        work = [pool.submit(stream_outcome, cluster, i, started) for i in range(6)]
        deadline = time.monotonic() + TIMEOUT_S
        while len(set(started.values())) < 2:  # both replicas are streaming
            assert time.monotonic() < deadline and not any(w.done() for w in work), started
            time.sleep(0.01)
        victim = next(iter(started.values()))
        name, namespace = next(a for a in engine_replicas() if a[0].endswith("#" + victim))
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        after = [pool.submit(lambda i: replica_of(chat(client, f"after {i}", n=1)), i) for i in range(4)]
        results = [w.result(timeout=TIMEOUT_S) for w in work]  # a TimeoutError here is a hung request
        answered = {w.result(timeout=TIMEOUT_S) for w in after}  # the survivor answers while Serve replaces
    # the victim's streams end with an error event; one it had not answered is sent again, or gets a 503
    assert all(r == "ok" if replica not in (victim, "") else r in ("ok", "error event", "status 503")
               for replica, r in results), results
    assert "error event" in {r for replica, r in results if replica == victim}, results  # it died under load
    assert answered and victim not in answered
    deadline = time.monotonic() + TIMEOUT_S
    while not (running_replicas() == 2 and len(engine_replicas()) == 2):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)


def test_the_affinity_key_is_the_image_or_the_prompt_prefix():
    from smolvlm_fast.ray.router import PREFIX_CHARS, affinity_key, rank

    def key(text, image=None, path="/v1/chat/completions"):
        content = [{"type": "text", "text": text}] + ([{"type": "image_url", "image_url": {"url": image}}] * bool(image))
        return affinity_key(path, json.dumps({"messages": [{"role": "user", "content": content[::-1]}]}).encode())

    assert key("what is it?", data_url(1)) == key("and its colour?", data_url(1)) != key("what is it?", data_url(2))
    shared = "s" * PREFIX_CHARS
    assert key(shared + "one") == key(shared + "two") != key("one")
    completion = affinity_key("/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode())
    assert completion and completion != affinity_key("/v1/completions", b'{"prompt": [1, 2]}')
    assert affinity_key("/v1/chat/completions", b"not json") is None
    assert rank("k", ["a", "b", "c"])[0] == rank("k", ["c", "a", "b"])[0]  # the order of the replicas is no input
    assert rank("k", ["a", "b"]) == [r for r in rank("k", ["a", "b", "c"]) if r != "c"]  # only c's keys move


def test_serve_ray_takes_the_server_flags(monkeypatch):
    from smolvlm_fast import cli
    from smolvlm_fast.ray import cli as ray_cli

    seen = {}
    monkeypatch.setattr(ray_cli, "run", lambda args, limits, options: seen.update(args=args, limits=limits,
                                                                                   options=options) or 0)
    assert cli.main(["serve", "m", "--ray", "--replicas", "3", "--ray-address", "auto", "--max-tokens", "9",
                     "--backend", "numpy"]) == 0
    assert (seen["args"].replicas, seen["args"].ray_address, seen["limits"].max_tokens) == (3, "auto", 9)
    assert seen["options"]["backend"] == "numpy"
