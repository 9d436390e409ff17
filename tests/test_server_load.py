"""The server under load, on 127.0.0.1 with real HTTP clients: 100 concurrent greedy requests (chat with and without
an image, completions; streamed or not; prompts of 40 to 400 tokens, 4 to 16 new tokens) of which every tenth is
cancelled mid-stream. Every other request gets exactly the tokens it gets alone, the cancelled ones give their
KV-cache blocks back, no request is lost and the server answers afterwards; the same with a KV cache too small for
all of them at once, where requests are preempted and computed again."""
import asyncio
import json
import time
from dataclasses import dataclass

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from smolvlm_fast.serving.llm import LLM  # noqa: E402
from smolvlm_fast.serving.server.app import create_app  # noqa: E402
from smolvlm_fast.serving.server.limits import Limits  # noqa: E402
from tests.server_harness import data_url, gauge, running, wait_until_idle  # noqa: E402

MODEL = "tiny-smolvlm"
N, CANCEL_EVERY = 100, 10
CANCEL_AFTER = 3     # chunks with tokens read before a cancelled request's client leaves
LONG = 400           # max_tokens of a request to be cancelled: far more than it gets before it is
HOLD_AT = 40         # tokens of a request to be cancelled at which the engine waits for its abort (see hold_cancelled)
LIMITS = Limits(max_tokens=LONG)
SENTENCE = "The quick brown fox jumps over the lazy dog. "
IMAGE_SIZES = [(30, 40), (64, 64), (100, 180)]  # one frame, one frame, tiles and the global image
SMALL_CACHE_BLOCKS = 56  # of 16 tokens: the longest request (a 400-token prompt + LONG) fits, a handful at once


@dataclass(frozen=True)
class Plan:
    index: int
    chat: bool           # /v1/chat/completions, else /v1/completions
    stream: bool
    image: int | None    # which of IMAGE_SIZES, for a chat
    repeats: int         # of SENTENCE in the prompt
    max_tokens: int
    cancel: bool

    def body(self, stream: bool | None = None) -> dict:
        stream = self.stream if stream is None else stream
        text = SENTENCE * self.repeats + f"Question {self.index % 17}?"  # shared prefixes: the prefix cache works
        if self.chat:
            parts = [{"type": "text", "text": text}]
            if self.image is not None:
                url = data_url(self.image, IMAGE_SIZES[self.image])
                parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
            prompt = {"messages": [{"role": "user", "content": parts}]}
        else:
            prompt = {"prompt": text}
        body = {"model": MODEL, **prompt, "max_tokens": self.max_tokens, "temperature": 0, "return_token_ids": True,
                "stream": stream}
        return body | ({"stream_options": {"include_usage": True}} if stream else {})

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


def plans() -> list[Plan]:
    out = []
    for i in range(N):
        cancel = i % CANCEL_EVERY == CANCEL_EVERY // 2
        chat = i % 5 != 2
        out.append(Plan(i, chat, stream=cancel or i % 2 == 0, image=i % 3 if chat and i % 4 == 0 else None,
                        repeats=1 + i % 9, max_tokens=LONG if cancel else 4 + i % 13, cancel=cancel))
    return out


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    chunks: int = 0


async def call(http: httpx.AsyncClient, plan: Plan, stream: bool | None = None) -> Result:
    """One request to its end (or, for a cancelled one, until CANCEL_AFTER chunks came and its client left)."""
    body = plan.body(stream)
    if not body["stream"]:
        response = await http.post(plan.path, json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if plan.chat else choice["text"]
        return Result(choice["token_ids"], text, choice["finish_reason"])
    result = Result([], "", None)
    async with http.stream("POST", plan.path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            for choice in event["choices"]:
                result.text += (choice["delta"].get("content") or "") if plan.chat else choice["text"]
                result.token_ids += choice.get("token_ids") or []
                result.finish_reason = choice["finish_reason"] or result.finish_reason
                result.chunks += bool(choice.get("token_ids"))
            if plan.cancel and result.chunks >= CANCEL_AFTER:
                break  # leaving the block closes the connection mid-stream
    return result


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=N + 10))


async def alone_on(url: str, plan: Plan) -> Result:
    async with client(url) as http:
        return await call(http, plan)


def served(checkpoint, **llm_kwargs):
    llm = LLM(checkpoint, backend="numpy", max_num_batched_tokens=256, ignore_eos=True, **llm_kwargs)
    return llm, create_app(llm, model_name=MODEL, limits=LIMITS)


@pytest.fixture(scope="module")
def alone(tiny_idefics3) -> dict[int, Result]:
    """Each request that is not cancelled, run alone (one after another, not streamed) on a server of its own."""
    llm, app = served(tiny_idefics3)

    async def main(url):
        async with client(url) as http:
            return {p.index: await call(http, p, stream=False) for p in plans() if not p.cancel}
    try:
        with running(app) as url:
            return asyncio.run(main(url))
    finally:
        llm.shutdown()


def record_aborts(llm: LLM) -> list[int]:
    """The output length of each sequence the engine aborts while it still runs (a finished one is not counted)."""
    aborted, abort = [], llm.engine.abort

    def recorded(seq, *args, **kwargs):
        if not seq.finished:
            aborted.append(len(seq.output_ids))
        return abort(seq, *args, **kwargs)
    llm.engine.abort = recorded
    return aborted


def hold_cancelled(llm: LLM) -> None:
    """The engine takes no step while a request to be cancelled (max_tokens LONG) runs with HOLD_AT tokens: it waits
    for the abort that its client's leaving must bring. So however far the clients lag behind the server, no
    cancelled request can end on its own; without the abort the requests stall and the test fails."""
    step = llm.engine.step

    def held():
        if any(s.request.params.max_new_tokens == LONG and len(s.output_ids) >= HOLD_AT
               for s in llm.engine.scheduler.running):
            time.sleep(0.001)
            return []
        return step()
    llm.engine.step = held


@pytest.mark.parametrize("num_blocks", [None, SMALL_CACHE_BLOCKS], ids=["roomy-cache", "preempting-cache"])
def test_concurrent_requests_get_the_tokens_they_get_alone(tiny_idefics3, alone, num_blocks):
    llm, app = served(tiny_idefics3, num_blocks=num_blocks)
    aborted = record_aborts(llm)
    hold_cancelled(llm)

    async def main(url):
        async with client(url) as http:
            return await asyncio.gather(*(call(http, p) for p in plans()))
    try:
        with running(app) as url:
            results = asyncio.run(main(url))
            wait_until_idle(url)  # cancelled requests aborted, every block back in the cache
            preemptions = gauge(url, "smolvlm_preemptions_total")
            last = plans()[1]
            after = asyncio.run(alone_on(url, last))
    finally:
        llm.shutdown()

    done = {p.index: r for p, r in zip(plans(), results) if not p.cancel}
    cancelled = [r for p, r in zip(plans(), results) if p.cancel]
    assert len(done) == N - N // CANCEL_EVERY and len(cancelled) == N // CANCEL_EVERY
    for index, want in alone.items():
        got = done[index]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, "length"), index
        assert len(got.token_ids) == plans()[index].max_tokens
    assert all(r.chunks >= CANCEL_AFTER and r.finish_reason is None for r in cancelled)
    assert len(aborted) == len(cancelled) and max(aborted) <= HOLD_AT, aborted  # stopped by the engine, not ended
    assert after.token_ids == alone[last.index].token_ids  # the server goes on
    if num_blocks is not None:
        assert preemptions > 0
