"""The OpenAI-compatible HTTP server behind `smolvlm-fast serve [MODEL]`: the app and its border.

    POST /v1/chat/completions   messages with text and image_url parts; streamed (SSE) or not
    POST /v1/completions        one text prompt (or its token ids)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text format)

Every request goes through LLM.stream, so all of them are batched together by the one engine loop; a client that
goes away closes its stream, which aborts its request and frees its KV-cache blocks. Every check at the border (body
size, images, max_tokens, context) answers 400 (413 for the body) with an OpenAI error body
{"error": {"message", "type", "param", "code"}}; an unexpected exception fails its own request with a 500 and the
server goes on. Every numeric field has a range (in /openapi.json too); a bool or a string is no number, NaN and
infinity are refused. As vLLM's, return_token_ids: true adds the generated token ids to each choice (and chunk).

The pieces: protocol.py (bodies, limits, error shapes), images.py (where images may come from), api.py (the
endpoints' work), metrics.py; this module wires them into a FastAPI app. fastapi and uvicorn (the `server` extra,
httpx too for remote images) are needed by the server only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from ...formats.hub import default_model_path
from ..llm import LLM
from .api import Api
from .images import ImageSource
from .limits import Limits
from .metrics import Metrics
from .protocol import ApiError, ChatRequest, CompletionRequest, api_error, error_body, http_error, validation_error

log = logging.getLogger("smolvlm_fast.server")


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


def create_app(llm: LLM, *, model_name: str, allowed_local_dir: str | Path | None = None,
               allow_remote_urls: bool = False, limits: Limits = Limits(),
               allowed_domains: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving llm as model_name. It uses llm.stream, so llm's engine loop starts with the first
    request; llm.shutdown() is the caller's to call."""
    if allow_remote_urls or allowed_domains:
        import httpx  # noqa: F401  fail now, not at the first remote image
    llm.max_image_pixels = limits.max_image_pixels  # --max-image-pixels binds the processor's decoding too
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

    @app.get("/v1/models/{model_id:path}")  # :path, as a hub id holds a slash
    async def model(model_id: str) -> dict:
        return api.model(model_id)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(api.metrics.render(llm.stats), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request) -> Any:
        return await api.chat(body, http)

    @app.post("/v1/completions")
    async def completion(body: CompletionRequest, http: Request) -> Any:
        return await api.completion(body, http)

    return app


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          allowed_local_dir: str | Path | None = None, allow_remote_urls: bool = False, limits: Limits = Limits(),
          allowed_domains: tuple[str, ...] = (), log_level: str = "info", **llm_kwargs) -> None:
    """Load model (a checkpoint, an LLM, or None: the default model) and serve it until interrupted."""
    import uvicorn

    llm, name = load_served(model, model_name, **llm_kwargs)
    app = create_app(llm, model_name=name, allowed_local_dir=allowed_local_dir,
                     allow_remote_urls=allow_remote_urls, limits=limits, allowed_domains=allowed_domains)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        llm.shutdown()


def load_served(model=None, model_name: str | None = None, **llm_kwargs) -> tuple[LLM, str]:
    """(the LLM, the name clients send for it). None is the default model, as `smolvlm-fast generate` has it."""
    if model is None:
        model = default_model_path()
    llm = model if isinstance(model, LLM) else LLM(model, **llm_kwargs)
    return llm, model_name or served_model_name(model)


def served_model_name(model) -> str:
    """A short name for a checkpoint: a file's stem (SmolLM2-135M-Instruct.Q4_1 for its .gguf), a directory's name,
    a hub id as given; never an absolute path, which would show in /v1/models and in every error message."""
    if isinstance(model, LLM):
        return "smolvlm-fast"  # an LLM built by the caller names no checkpoint
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return str(model)
