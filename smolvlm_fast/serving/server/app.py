"""The OpenAI-compatible HTTP server behind `smolvlm-fast serve MODEL`.

    POST /v1/chat/completions   messages with text and image_url parts; streamed (SSE) or not
    POST /v1/completions        one text prompt (or its token ids)
    GET  /v1/models, /health, /metrics (Prometheus text format)

Every request goes through LLM.stream, so all of them are batched together by the one engine loop; a client that
goes away closes its stream, which aborts its request and frees its KV-cache blocks. Every check at the border (body
size, images, max_tokens, context) answers 400 (413 for the body) with an OpenAI error body
{"error": {"message", "type", "param", "code"}}; an unexpected exception fails its own request with a 500 and the
server goes on. Every numeric field has a range (in /openapi.json too); a bool or a string is no number, NaN and
infinity are refused. As vLLM's, return_token_ids: true adds the generated token ids to each choice (and chunk).

Images come as data: URLs (base64 PNG, JPEG, WebP or GIF); local paths and file:// URLs only inside the directory the
server was started with; http(s) URLs only when remote fetching is enabled, never from private or loopback addresses.

fastapi and uvicorn (the `server` extra, httpx too for remote images) are needed by this module only.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException

from ...config import SamplingParams
from ...engine.engine import check_request
from ...engine.sequence import Request as EngineRequest
from ...errors import InputError, SmolVLMError
from ...inputs.images import ALLOWED_FORMATS
from ..llm import LLM, RequestOutput

log = logging.getLogger("smolvlm_fast.server")

# PIL format -> data URL subtype (the formats images.py decodes; MPO is a phone's multi-picture JPEG)
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
DATA_URL_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
MAX_REDIRECTS = 3
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # one stop string: every new chunk of text is checked against the end of each


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 << 20        # one request body, base64 images included (413 past it)
    max_images: int = 8                   # image parts in one request
    max_image_bytes: int = 10 << 20       # one image file, as encoded (PNG, JPEG ...)
    max_image_pixels: int = 40_000_000    # width x height of one image, before the processor resizes it
    max_tokens: int = 4096                # max_tokens of one request; also the default when a request names none
    max_model_len: int | None = None      # prompt + max_tokens; None: the model's context (and the KV cache's size)
    remote_timeout_s: float = 10.0        # to fetch one remote image, all of it


class ApiError(Exception):
    """A request the server refuses: answered with an OpenAI error body and this status."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.param, self.code, self.type), status_code=self.status)


def error_body(message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies

class Body(BaseModel):
    # Extra fields (of newer clients) that change nothing are ignored. Strict: a bool or "5" is not a count, a
    # string is not a number; and no NaN or infinity, which would turn the logits into NaN.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def not_bool_or_text(value):
    if isinstance(value, (bool, str)):
        raise ValueError(f"Input should be a valid integer, not a {'boolean' if isinstance(value, bool) else 'string'}")
    return value


def integer(ge: int | None = None, le: int | None = None):
    """An integer field in [ge, le]. As in JSON Schema, 5.0 is the integer 5; true or "5" is no integer."""
    return Annotated[int, Field(strict=False, ge=ge, le=le), BeforeValidator(not_bool_or_text)]


def unicode_text(text: str) -> str:
    """JSON lets a string hold an unpaired surrogate (\\ud800), which is no Unicode: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds an unpaired surrogate (\\u{ord(text[e.start]):04x} at {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(unicode_text)]


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ImageUrl(Body):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[Annotated[TextPart | ImagePart, Field(discriminator="type")]], Field(min_length=1)]


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The fields both endpoints share, each with its range (the ranges are in /openapi.json too)."""
    model: Text | None = None  # when given, the served model's name
    max_tokens: integer(ge=1) | None = None                # at most Limits.max_tokens, and the context's room
    temperature: float | None = Field(None, ge=0, le=2)    # below 1e-5: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: integer(ge=-1) | None = None                    # not OpenAI's: as vLLM's (-1 or 0: no top-k filter)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # not OpenAI's: as vLLM's; bounded so that
    # the penalized logits stay finite in float32
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # OpenAI's ranges; only 0 is supported
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | integer() | None = None               # bool for chat, int for completions; not supported
    top_logprobs: integer(ge=0, le=20) | None = None
    n: integer(ge=1, le=128) = 1                           # only 1 is supported
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: integer(ge=0, le=2**64 - 1) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # not OpenAI's: as vLLM's, each choice (each chunk) with its new token ids


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: integer(ge=1) | None = None


class CompletionRequest(Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]


# Fields of the OpenAI API this server does not implement: refused unless they ask for nothing.
UNSUPPORTED = {
    "frequency_penalty": "use repetition_penalty (> 1 discourages repeated tokens)",
    "presence_penalty": "use repetition_penalty (> 1 discourages repeated tokens)",
    "logprobs": "log probabilities are not returned", "top_logprobs": "log probabilities are not returned",
    "logit_bias": "", "tools": "tool calls are not supported", "functions": "tool calls are not supported",
    "response_format": "only plain text is produced", "echo": "", "suffix": "", "best_of": "", "audio": "",
    "prediction": "",
}
FIELD_NAMES = {name for model in (TextPart, ImageUrl, ImagePart, Message, StreamOptions, ChatRequest,
                                  CompletionRequest) for name in model.model_fields}


def check_supported(body: Sampling) -> None:
    if body.n != 1:
        raise ApiError(f"n is {body.n}: this server returns one choice per request (n = 1)", param="n")
    for name, value in dict(body).items():  # declared fields and extra ones
        if name in UNSUPPORTED and not asks_nothing(name, value):
            raise ApiError(f"{name} is not supported by this server" + (f": {UNSUPPORTED[name]}"
                                                                        if UNSUPPORTED[name] else ""), param=name)


def asks_nothing(name: str, value) -> bool:
    if name == "response_format":
        return value is None or value == {"type": "text"}
    if name == "best_of":
        return value in (None, 1)
    return value in (None, False, 0, "", [], {})


# -- images

class ImageSource:
    """An image_url -> a data: URL of checked image bytes (format, bytes and pixels within the limits), by the
    server's rules for local files and remote URLs."""

    def __init__(self, limits: Limits, allowed_local_dir: str | Path | None, allow_remote_urls: bool,
                 allowed_domains: tuple[str, ...] = ()):
        """allowed_domains: remote URLs only to these hosts and their subdomains (implies remote fetching)."""
        self.limits, self.allow_remote_urls = limits, allow_remote_urls or bool(allowed_domains)
        self.allowed_domains = tuple(checked_domain(d) for d in allowed_domains)
        self.root = None if allowed_local_dir is None else Path(allowed_local_dir).resolve()
        if self.root is not None and not self.root.is_dir():
            raise InputError(f"the allowed local directory {allowed_local_dir} is not a directory")

    async def data_url(self, url: str, param: str) -> str:
        scheme = url_scheme(url, param)
        if scheme == "data":
            subtype = self.check_bytes(decode_data_url(url, self.limits.max_image_bytes, param), param)
            return f"data:image/{subtype};base64,{url.partition(',')[2]}"
        if scheme in ("http", "https"):
            if not self.allow_remote_urls:
                raise ApiError("remote image URLs are not fetched by this server (it was started without "
                               "--allow-remote-urls or --allowed-image-domains): send the image as a base64 data: "
                               "URL", param=param, code="remote_urls_disabled")
            data = await fetch_remote(url, self.limits, param, self.allowed_domains)
        elif scheme in ("file", ""):
            data = await asyncio.to_thread(self.read_local, url, param)
        else:
            raise ApiError(f"image URL scheme {scheme!r} is not supported (data:, file:, http:, https:)", param=param)
        subtype = self.check_bytes(data, param)
        return f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"

    def check_bytes(self, data: bytes, param: str) -> str:
        """The image's data URL subtype, once its format, bytes and pixels are found within the limits."""
        limits = self.limits
        if len(data) > limits.max_image_bytes:
            raise ApiError(f"an image of {len(data)} bytes is over this server's limit of {limits.max_image_bytes}",
                           param=param, code="image_too_large")
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:  # the header only; no other plugin
                kind, (width, height) = image.format, image.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ApiError(f"the image cannot be read: {e}", param=param, code="invalid_image") from None
        if kind not in IMAGE_FORMATS:
            raise ApiError(f"image format {kind} is not accepted (PNG, JPEG, WebP, GIF, BMP, TIFF)", param=param,
                           code="invalid_image")
        if width * height > limits.max_image_pixels:
            raise ApiError(f"a {width}x{height} image has more pixels than this server's limit of "
                           f"{limits.max_image_pixels}", param=param, code="image_too_large")
        return IMAGE_FORMATS[kind]

    def read_local(self, url: str, param: str) -> bytes:
        """A file inside the allowed directory (symlinks resolved first: no way out through them)."""
        if self.root is None:
            raise ApiError("local image paths are not read by this server (it was started without "
                           "--allowed-local-dir): send the image as a base64 data: URL", param=param,
                           code="local_files_disabled")
        parsed = urlparse(url)
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ApiError(f"file URL {url!r} names another host", param=param)
        path = self.root / Path(unquote(parsed.path) if parsed.scheme == "file" else url)
        if "\0" in str(path):  # %00 in a file: URL
            raise ApiError(f"image path {url!r} holds a NUL character", param=param)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ApiError(f"image path {url!r} is outside the directory this server may read", param=param,
                           code="path_not_allowed")
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise ApiError(f"image file {url!r} not found", param=param, code="image_not_found") from None
        except OSError as e:
            raise ApiError(f"cannot open image file {url!r}: {e.strerror}", param=param) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which fails on a directory
            os.close(fd)
            raise ApiError(f"image path {url!r} is not a regular file", param=param)
        with os.fdopen(fd, "rb") as f:
            return f.read(self.limits.max_image_bytes + 1)


def url_scheme(url: str, param: str) -> str:
    """The URL's scheme, once it parses and holds no NUL (which no file name can)."""
    try:
        if "\0" in url:
            raise ValueError("a NUL character")
        return urlparse(url).scheme.lower()
    except ValueError as e:
        raise ApiError(f"image URL {url[:100]!r} is invalid: {e}", param=param) from None


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    head, comma, payload = url.partition(",")
    fields = head[len("data:"):].lower().split(";")
    if not comma or fields[0] not in DATA_URL_TYPES or "base64" not in fields[1:]:
        raise ApiError("a data URL must be data:image/png|jpeg|webp|gif;base64,<data>", param=param,
                       code="invalid_image")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4096:  # base64 of max_bytes, with room for line breaks
        raise ApiError(f"an image of about {len(payload) * 3 // 4} bytes is over this server's limit of {max_bytes}",
                       param=param, code="image_too_large")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(f"the image's base64 data is invalid: {e}", param=param, code="invalid_image") from None


async def fetch_remote(url: str, limits: Limits, param: str, allowed_domains: tuple[str, ...] = ()) -> bytes:
    """GET an http(s) image within the time and size limits, connecting only to public addresses (checked at
    every redirect, and the connection pinned to the checked address) and, when allowed_domains is given, only to
    those hosts and their subdomains (checked at every redirect too)."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=limits.remote_timeout_s, trust_env=False) as client:
            return await asyncio.wait_for(_fetch(client, url, limits.max_image_bytes, param, allowed_domains),
                                          limits.remote_timeout_s)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        raise ApiError(f"fetching the image took longer than {limits.remote_timeout_s} s", param=param,
                       code="image_fetch_failed") from None
    except httpx.HTTPError as e:
        raise ApiError(f"cannot fetch the image: {type(e).__name__}: {e}", param=param,
                       code="image_fetch_failed") from None


async def _fetch(client, url: str, max_bytes: int, param: str, allowed_domains: tuple[str, ...] = ()) -> bytes:
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        target = httpx.URL(url)
        if target.scheme not in ("http", "https") or not target.host:
            raise ApiError(f"image URL {url!r} is not an http(s) URL", param=param)
        if allowed_domains and not domain_allowed(target.host, allowed_domains):
            raise ApiError(f"image host {target.host!r} is not one of this server's allowed image domains",
                           param=param, code="image_domain_not_allowed")
        address = await public_address(target.host, target.port or (443 if target.scheme == "https" else 80), param)
        request = client.build_request("GET", target.copy_with(host=address), headers={"Host": target.netloc.decode()},
                                       extensions={"sni_hostname": target.host})
        response = await client.send(request, stream=True)
        try:
            if response.is_redirect:
                url = str(target.join(response.headers.get("location", "")))
                continue
            if response.status_code != 200:
                raise ApiError(f"fetching the image answered HTTP {response.status_code}", param=param,
                               code="image_fetch_failed")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise ApiError(f"the image is over this server's limit of {max_bytes} bytes", param=param,
                                   code="image_too_large")
            return bytes(data)
        finally:
            await response.aclose()
    raise ApiError(f"fetching the image was redirected more than {MAX_REDIRECTS} times", param=param,
                   code="image_fetch_failed")


def domain_allowed(host: str, allowed_domains: tuple[str, ...]) -> bool:
    """host is one of allowed_domains or a subdomain of one (case-insensitive, internationalized names compared in
    their ASCII form; "evilexample.com" is not "example.com")."""
    host = ascii_domain(host)
    return host is not None and any(host == d or host.endswith("." + ascii_domain(d)) for d in allowed_domains)


def checked_domain(name: str) -> str:
    """An allowed image domain as given by the operator, in ASCII; a port, path, wildcard or bad name is an error."""
    domain = ascii_domain(name) if isinstance(name, str) else None
    if not domain or any(c in domain for c in ":/*@ "):
        raise InputError(f"allowed image domain {name!r} must be a host name like example.com (its subdomains are "
                         "allowed too; no scheme, port, path or wildcard)")
    return domain


def ascii_domain(name: str) -> str | None:
    """A host name in lower-case ASCII (IDNA: "bücher.de" -> "xn--bcher-kva.de"), or None when it is not one."""
    try:
        return name.strip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


async def public_address(host: str, port: int, param: str) -> str:
    """An address of host, when every address it resolves to is a public one (no SSRF into private networks)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ApiError(f"cannot resolve the image host {host!r}: {e}", param=param, code="image_fetch_failed") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global or ip.is_multicast:
            raise ApiError(f"the image host {host!r} is a private, loopback or reserved address: not fetched",
                           param=param, code="image_url_not_allowed")
    return addresses[0]


# -- metrics

class Metrics:
    """Counters of this server and gauges of the engine, in the Prometheus text format."""

    TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self):
        self.responses: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def count_response(self, path: str, status: int) -> None:
        self.responses[(path if path in self.ENDPOINTS else "other", status)] += 1

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_counts[sum(seconds > b for b in self.TTFT_BUCKETS)] += 1
        self.ttft_sum += seconds

    def render(self, llm: LLM) -> str:
        stats, engine = llm.stats, llm.engine
        allocator = engine.cache.allocator
        lines: list[str] = []

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP smolvlm_{name} {help}", f"# TYPE smolvlm_{name} {kind}"])
            lines.extend(f"smolvlm_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP responses by endpoint and status (499: the client left first).",
               [(f'{{endpoint="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.responses.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens of the requests served.", [("", self.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated for the requests served.",
               [("", self.generation_tokens)])
        cumulative = list(accumulate(self.ttft_counts))
        buckets = [*(f"{b:g}" for b in self.TTFT_BUCKETS), "+Inf"]
        metric("time_to_first_token_seconds", "histogram", "From a request's arrival to its first token.",
               [*((f'_bucket{{le="{b}"}}', c) for b, c in zip(buckets, cumulative)),
                ("_sum", self.ttft_sum), ("_count", cumulative[-1])])
        metric("num_requests_running", "gauge", "Sequences in the running batch.",
               [("", len(engine.scheduler.running))])
        metric("num_requests_waiting", "gauge", "Sequences waiting to join the batch.",
               [("", len(engine.scheduler.waiting))])
        metric("kv_cache_blocks_used", "gauge", "KV-cache blocks held by sequences.",
               [("", allocator.num_blocks - allocator.num_free)])
        metric("kv_cache_blocks_total", "gauge", "KV-cache blocks in all.", [("", allocator.num_blocks)])
        metric("prefix_cache_blocks", "gauge", "Blocks named in the prefix cache (held or reusable).",
               [("", allocator.num_cached)])
        metric("prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [("", stats.prompt_tokens)])
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
               [("", stats.cached_prompt_tokens)])
        metric("preemptions_total", "counter", "Sequences preempted for want of KV-cache blocks.",
               [("", stats.preemptions)])
        metric("images_encoded_total", "counter", "Vision encoder runs, one per image.", [("", stats.images_encoded)])
        metric("image_feature_cache_hits_total", "counter", "Images whose features came from the cache.",
               [("", stats.feature_cache_hits)])
        return "\n".join(lines) + "\n"


# -- the API

class Api:
    """The endpoints' work: OpenAI request -> prompt and SamplingParams -> LLM.stream -> OpenAI response."""

    def __init__(self, llm: LLM, model_name: str, limits: Limits, images: ImageSource):
        self.llm, self.model_name, self.limits, self.images = llm, model_name, limits, images
        self.metrics = Metrics()
        self.created = int(time.time())
        config = llm.model.config
        self.vlm = config.is_vlm
        self.context = min(config.text.max_position_embeddings, llm.engine.cache.capacity,
                           limits.max_model_len or config.text.max_position_embeddings)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "smolvlm_fast", "max_model_len": self.context}]}

    async def chat(self, body: ChatRequest, http: Request):
        start = time.perf_counter()
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.check(body, max_tokens)
        messages = await self.chat_messages(body.messages)
        request = await self.engine_request(messages, body, max_tokens, "messages")
        return await self.respond(request, body, http, start, "chat.completion")

    async def completion(self, body: CompletionRequest, http: Request):
        start = time.perf_counter()
        self.check(body, body.max_tokens)
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
        if body.model is not None and body.model != self.model_name:
            raise ApiError(f"the model {body.model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found", status=404)
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            name = max_tokens_param(body)
            raise ApiError(f"{name} is {max_tokens}, over this server's limit of {self.limits.max_tokens}",
                           param=name, code="max_tokens_too_large")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ApiError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                           f"characters each", param="stop")

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
        url_of = {id(p): url for (_, _, p), url in zip(parts, urls)}
        out = []
        for m in messages:
            role = "system" if m.role == "developer" else m.role
            blocks = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            if self.vlm:
                out.append({"role": role, "content": [{"type": "text", "text": b.text} if isinstance(b, TextPart)
                                                      else {"type": "image", "url": url_of[id(b)]} for b in blocks]})
            else:
                out.append({"role": role, "content": "\n".join(b.text for b in blocks)})
        return out

    async def engine_request(self, prompt, body: Sampling, max_tokens: int | None, param: str) -> EngineRequest:
        """The prompt tokenized (images processed) off the event loop, with room for max_tokens in the context."""
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
            check_request(self.llm.model, request, self.llm.engine.cache.capacity)
        except SmolVLMError as e:
            raise ApiError(str(e), param=param) from None
        return request

    # -- responses
    async def outputs(self, request: EngineRequest, start: float) -> AsyncIterator[RequestOutput]:
        """The request's outputs from LLM.stream, counted in the metrics; closing this aborts the request."""
        out, first = None, True
        try:
            async with aclosing(self.llm.stream(request, request_id=request.request_id)) as stream:
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
            usage = body.stream_options is not None and body.stream_options.include_usage
            return ClosingStreamingResponse(self.events(outputs, request, kind, usage, body.return_token_ids),
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


def sampling_params(body: Sampling) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return SamplingParams(max_new_tokens=1, temperature=temperature, do_sample=temperature > 0,
                          top_p=body.top_p or 1.0, top_k=max(body.top_k or 0, 0),
                          repetition_penalty=body.repetition_penalty or 1.0, stop_strings=tuple(stops), seed=body.seed)


def max_tokens_param(body: Sampling) -> str:
    """The name the client used for the completion's length (chat takes either, the newer one first)."""
    return "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"


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


# -- the app

class Border:
    """ASGI middleware at the edge: reads a request body up to the size limit (413 past it), counts responses by
    endpoint and status, and answers 500 for an exception that escaped a handler, the server going on."""

    def __init__(self, app, *, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counted_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self.read_body(scope, receive)
                if body is None:
                    return
                receive = replay(body, receive)
            await self.app(scope, receive, counted_send)
        except ApiError as e:
            await send_json(counted_send, e.status, error_body(e.message, e.param, e.code, e.type))
        except Exception:  # noqa: BLE001  one request's failure, never the server's
            log.exception("%s %s failed", scope["method"], scope["path"])
            if status is None:
                await send_json(counted_send, 500, error_body("internal server error", type="server_error"))
        finally:
            self.metrics.count_response(scope["path"], status or 499)

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when the client left; an ApiError (413) past the limit."""
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_large = ApiError(f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                             code="request_too_large", status=413)
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise too_large
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive that hands the app the body read already, then waits for the client as the server does."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again():
        return pending.pop() if pending else await receive()
    return receive_again


async def send_json(send, status: int, data: dict) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def api_error(_, exc: ApiError) -> JSONResponse:
    return exc.response()


async def http_error(_, exc: HTTPException) -> JSONResponse:
    return ApiError(str(exc.detail), status=exc.status_code).response()


NOT_AN_OBJECT = ("model_type", "model_attributes_type", "dict_type", "missing")  # pydantic's error types for a body


async def validation_error(_, exc: RequestValidationError) -> JSONResponse:
    """pydantic's errors -> a 400 naming the first field at fault (messages.0.content.1.image_url ...)."""
    errors = exc.errors()
    # the deepest error; of a union's (content: str | list of parts), the one of the branch that was not a string,
    # or the one of a check of ours (value_error) over a type's
    first = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") != "string_type",
                                       e.get("type") == "value_error")) if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                        code="invalid_json").response()
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in NOT_AN_OBJECT:
        return ApiError("the request body must be a JSON object, sent with Content-Type: application/json").response()
    loc = [str(x) for x in first.get("loc", ())[1:] if isinstance(x, int) or x in FIELD_NAMES]
    param = ".".join(x for i, x in enumerate(loc) if i == 0 or x != loc[i - 1]) or None  # union tags repeat a name
    message = first.get("msg", "invalid request")
    return ApiError(f"{param}: {message}" if param else message, param=param).response()


def create_app(llm: LLM, *, model_name: str, allowed_local_dir: str | Path | None = None,
               allow_remote_urls: bool = False, limits: Limits = Limits(),
               allowed_domains: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving llm as model_name. It uses llm.stream, so llm's engine loop starts with the first
    request; llm.shutdown() is the caller's to call."""
    if allow_remote_urls or allowed_domains:
        import httpx  # noqa: F401  fail now, not at the first remote image
    if hasattr(llm.processor, "max_image_pixels"):  # --max-image-pixels binds the processor's decoding too
        llm.processor.max_image_pixels = limits.max_image_pixels
    api = Api(llm, model_name, limits, ImageSource(limits, allowed_local_dir, allow_remote_urls, allowed_domains))
    app = FastAPI(title="smolvlm_fast", description="OpenAI-compatible SmolVLM server")
    app.state.api = api
    app.add_middleware(Border, max_body_bytes=limits.max_body_bytes, metrics=api.metrics)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return api.models()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(api.metrics.render(llm), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request) -> Any:
        return await api.chat(body, http)

    @app.post("/v1/completions")
    async def completion(body: CompletionRequest, http: Request) -> Any:
        return await api.completion(body, http)

    return app


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          allowed_local_dir: str | Path | None = None, allow_remote_urls: bool = False, limits: Limits = Limits(),
          allowed_domains: tuple[str, ...] = (), log_level: str = "info", **llm_kwargs) -> None:
    """Load model (a checkpoint or an LLM) and serve it until interrupted."""
    import uvicorn

    llm = model if isinstance(model, LLM) else LLM(model, **llm_kwargs)
    app = create_app(llm, model_name=model_name or str(model), allowed_local_dir=allowed_local_dir,
                     allow_remote_urls=allow_remote_urls, limits=limits, allowed_domains=allowed_domains)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        llm.shutdown()
