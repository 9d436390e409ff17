"""The endpoints' work: an OpenAI request -> a prompt and SamplingParams -> LLM.stream -> an OpenAI response
(one JSON body, or server-sent events). The body's own checks (protocol.py) come first, then the images' (images.py),
then LLM.check for everything the model decides (vocabulary, context, KV cache, images)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...engine.sequence import Request as EngineRequest
from ...errors import SmolVLMError
from ..llm import LLM, RequestOutput
from .images import ImageSource
from .limits import Limits
from .metrics import Metrics
from .protocol import (MAX_STOP_CHARS, MAX_STOP_STRINGS, ApiError, ChatRequest, CompletionRequest, ImagePart, Message,
                       VideoPart,
                       Sampling, TextPart, check_supported, error_body, max_tokens_param, sampling_params,
                       stop_strings)

log = logging.getLogger("smolvlm_fast.server")


class Api:
    """The endpoints' work: OpenAI request -> prompt and SamplingParams -> LLM.stream -> OpenAI response."""

    def __init__(self, llm: LLM, model_name: str, limits: Limits, images: ImageSource):
        self.llm, self.model_name, self.limits, self.images = llm, model_name, limits, images
        self.metrics = Metrics()
        self.created = int(time.time())
        config = llm.model.config
        self.vlm = config.is_vlm
        # the longest prompt + completion: the model's context, the KV cache's, and --max-model-len's
        self.context = min(config.text.max_position_embeddings, llm.capacity,
                           limits.max_model_len or config.text.max_position_embeddings)

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: the served model's card, or OpenAI's 404 for any other id."""
        self.check_model(model_id)
        return self.model_card()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "smolvlm_fast",
                "max_model_len": self.context}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found", status=404)

    async def chat(self, body: ChatRequest, http: Request):
        start = time.perf_counter()
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.check(body, max_tokens)
        await self.check_response_format(body)
        messages = await self.chat_messages(body.messages)
        request = await self.engine_request(messages, body, max_tokens, "messages")
        return await self.respond(request, body, http, start, "chat.completion")

    async def completion(self, body: CompletionRequest, http: Request):
        start = time.perf_counter()
        self.check(body, body.max_tokens)
        await self.check_response_format(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(f"prompt holds {len(prompt)} prompts: this server takes one per request", param="prompt")
            prompt = prompt[0]
        prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
        request = await self.engine_request(prompt, body, body.max_tokens, "prompt")
        return await self.respond(request, body, http, start, "text_completion")

    # -- border checks
    def check(self, body: Sampling, max_tokens: int | None) -> None:
        check_supported(body)
        self.check_model(body.model)
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            name = max_tokens_param(body)
            raise ApiError(f"{name} is {max_tokens}, over this server's limit of {self.limits.max_tokens}",
                           param=name, code="max_tokens_too_large")
        stops = stop_strings(body)
        if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ApiError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                           f"characters each", param="stop")

    async def check_response_format(self, body: Sampling) -> None:
        """A 400 for a response_format that cannot be enforced: malformed, or a schema the grammar compiler refuses
        (compiled off the event loop: the first one builds the tokenizer's tables, ~0.5 s)."""
        if body.response_format is None:
            return
        try:
            await asyncio.to_thread(self.llm.check_response_format, sampling_params(body))
        except SmolVLMError as e:
            raise ApiError(str(e), param="response_format", code="invalid_response_format") from None

    async def chat_messages(self, messages: list[Message]) -> list[dict]:
        """OpenAI messages -> the chat form LLM takes (content blocks for a VLM's template, a string for a text
        model's), each image_url checked and made a data: URL."""
        parts = [(i, j, p) for i, m in enumerate(messages) if isinstance(m.content, list)
                 for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
        if parts and not self.vlm:
            i, j, _ = parts[0]
            raise ApiError("this is a text-only model: it cannot take images", param=f"messages.{i}.content.{j}")
        if len(parts) > self.limits.max_images:
            raise ApiError(f"the request has {len(parts)} images, over this server's limit of "
                           f"{self.limits.max_images}", param="messages", code="too_many_images")
        urls = await asyncio.gather(*(self.images.data_url(p.image_url.url, f"messages.{i}.content.{j}.image_url")
                                      for i, j, p in parts))
        url_of = {id(p): url for (_, _, p), url in zip(parts, urls)} | await self.video_urls(messages)
        out = []
        for m in messages:
            role = "system" if m.role == "developer" else m.role
            blocks = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            if self.vlm:
                out.append({"role": role, "content": [
                    {"type": "text", "text": b.text} if isinstance(b, TextPart) else
                    {"type": "video", "url": url_of[id(b)]} if isinstance(b, VideoPart) else
                    image_block(url_of[id(b)], b) for b in blocks]})
            else:
                out.append({"role": role, "content": "\n".join(b.text for b in blocks)})
        return out

    async def video_urls(self, messages: list[Message]) -> dict[int, str]:
        """id(part) -> the data: URL of each video_url part, checked (videos only for a model that takes them)."""
        parts = [(i, j, p) for i, m in enumerate(messages) if isinstance(m.content, list)
                 for j, p in enumerate(m.content) if isinstance(p, VideoPart)]
        processor = self.llm.processor
        if parts and getattr(processor, "video_config", None) is None:
            i, j, _ = parts[0]
            raise ApiError("this model takes no video (it has no video settings: a SmolVLM2 checkpoint does)",
                           param=f"messages.{i}.content.{j}", code="video_not_supported")
        if parts and len(parts) > processor.max_videos:
            raise ApiError(f"the request has {len(parts)} videos, over the limit of {processor.max_videos}",
                           param="messages", code="too_many_videos")
        urls = await asyncio.gather(*(self.images.video_data_url(p.video_url.url, f"messages.{i}.content.{j}.video_url")
                                      for i, j, p in parts))
        return {id(p): url for (_, _, p), url in zip(parts, urls)}

    async def engine_request(self, prompt, body: Sampling, max_tokens: int | None, param: str) -> EngineRequest:
        """The prompt tokenized (images processed) off the event loop, with room for max_tokens in the context
        (by default as many tokens as Limits.max_tokens and the context allow), then checked by LLM.check."""
        try:
            request = await asyncio.to_thread(self.llm.make_request, prompt, sampling_params(body))
        except (SmolVLMError, jinja2.TemplateError) as e:
            raise ApiError(str(e), param=param) from None
        n = len(request.prompt_ids)
        room = self.context - n
        if max_tokens is None and room < 1 or max_tokens is not None and max_tokens > room:
            wanted = f"{n} in the prompt" + ("" if max_tokens is None else f" + {max_tokens} for the completion")
            raise ApiError(f"this model's maximum context length is {self.context} tokens, but the request needs "
                           f"{wanted}: shorten the prompt or lower {max_tokens_param(body)}", param=param,
                           code="context_length_exceeded")
        max_new = min(self.limits.max_tokens, room) if max_tokens is None else max_tokens
        request = replace(request, params=replace(request.params, max_new_tokens=max_new))
        try:
            self.llm.check(request)
        except SmolVLMError as e:
            raise ApiError(str(e), param=param) from None
        return request

    # -- responses
    async def outputs(self, request: EngineRequest, start: float) -> AsyncIterator[RequestOutput]:
        """The request's outputs from LLM.stream, counted in the metrics; closing this aborts the request."""
        out, first = None, True
        try:
            async with aclosing(self.llm.stream(request, request_id=request.request_id, checked=True)) as stream:
                async for out in stream:
                    if first and out.token_ids:
                        self.metrics.observe_ttft(time.perf_counter() - start)
                        first = False
                    yield out
                    # Outputs queued already come without a pause: let the event loop run between them, or a
                    # client that left is noticed (and its request aborted) only once the queue runs dry.
                    await asyncio.sleep(0)
        finally:
            self.metrics.prompt_tokens += len(request.prompt_ids)
            self.metrics.generation_tokens += len(out.token_ids) if out is not None else 0

    async def respond(self, request: EngineRequest, body: Sampling, http: Request, start: float, kind: str):
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        request = replace(request, request_id=f"{prefix}-{uuid.uuid4().hex}")
        outputs = self.outputs(request, start)
        if body.stream:
            return ClosingStreamingResponse(self.events(outputs, request, kind, body.usage_in_stream,
                                                        bool(body.return_token_ids)),
                                            media_type="text/event-stream")
        out = await last_output(outputs, http)
        if out is None:
            return JSONResponse(error_body("the client closed the connection"), status_code=499)
        if out.finish_reason not in ("stop", "length"):
            raise ApiError(f"generation failed: {out.error or out.finish_reason}", status=500, type="server_error")
        choice = ({"message": {"role": "assistant", "content": out.text}} if kind == "chat.completion"
                  else {"text": out.text})
        ids = {"token_ids": out.token_ids} if body.return_token_ids else {}
        return {"id": request.request_id, "object": kind, "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": out.finish_reason, **ids}],
                "usage": usage_of(out), **({"prompt_token_ids": out.prompt_token_ids} if ids else {})}

    async def events(self, outputs: AsyncIterator[RequestOutput], request: EngineRequest, kind: str,
                     include_usage: bool, return_token_ids: bool = False) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of new text, one with the finish reason, the usage if asked."""
        created, chat = int(time.time()), kind == "chat.completion"
        head = {"id": request.request_id, "object": f"{kind}.chunk" if chat else kind, "created": created,
                "model": self.model_name}
        sent_ids = 0

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            nonlocal sent_ids
            delta = {"role": "assistant", "content": text} if role else {} if text is None else {"content": text}
            choice = {"delta": delta} if chat else {"text": text or ""}
            if return_token_ids and out is not None:  # the ids since the last chunk (special tokens have no text)
                choice["token_ids"], sent_ids = out.token_ids[sent_ids:], len(out.token_ids)
            return sse({**head, "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}]})

        texts, out = TextDeltas(request.params.stop_strings), None
        try:
            if chat:
                yield chunk("", role=True)
            async with aclosing(outputs) as stream:
                async for out in stream:
                    if text := texts.delta(out):
                        yield chunk(text)
            if out is None or out.finish_reason not in ("stop", "length"):
                yield sse(error_body(f"generation failed: {out.error if out else 'no output'}", type="server_error"))
            else:
                yield chunk(None, out.finish_reason)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage_of(out)})
        except Exception as e:  # noqa: BLE001  the headers are sent: the error goes in the stream
            log.exception("request %s failed while streaming", request.request_id)
            yield sse(error_body(f"{type(e).__name__}: {e}", type="server_error"))
        yield "data: [DONE]\n\n"


class TextDeltas:
    """The new text of each cumulative output. Text that could still become a stop string (which is cut from the
    final text), or that ends in an unfinished UTF-8 character, is held back until it settles."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.sent = stops, ""

    def delta(self, out: RequestOutput) -> str:
        text = out.text if out.finished else out.text[:len(out.text) - self.unsettled(out.text)]
        if not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def unsettled(self, text: str) -> int:
        partial_char = len(text) - len(text.rstrip("\ufffd"))
        partial_stop = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return max(partial_char, partial_stop)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body iterator however the response ends (a client gone included), so that the request is
    aborted at once rather than when the iterator is collected."""

    async def stream_response(self, send) -> None:
        async with aclosing(self.body_iterator):
            await super().stream_response(send)


def usage_of(out: RequestOutput) -> dict:
    completion = len(out.token_ids)
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": completion,
            "total_tokens": out.num_prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def last_output(outputs: AsyncIterator[RequestOutput], http: Request) -> RequestOutput | None:
    """Run a request to its end; None when the client left first (its request is then aborted)."""
    async def last():
        out = None
        async for out in outputs:
            pass
        return out

    async with aclosing(outputs):
        work, gone = asyncio.ensure_future(last()), asyncio.ensure_future(disconnected(http))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        return None if work.cancelled() else work.result()


async def disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def image_block(url: str, part: ImagePart) -> dict:
    """An image_url part as the chat block LLM takes, its detail (the image's token budget) kept."""
    detail = part.image_url.detail
    return {"type": "image", "url": url, **({"detail": detail} if detail is not None else {})}
