"""The OpenAI server as a Ray Serve application: `smolvlm-fast serve --ray` and build_app.

Two deployments. Engine: N replicas, each holding one LLM and the single-process server's own FastAPI app
(create_app), which it runs in-process for every request forwarded to it, so the routes, checks, errors and
streaming are the server's. Ingress: a light front (no CPU reserved) that takes the HTTP request from Serve's proxy,
computes its affinity key from the body (router.affinity_key) and forwards it to an Engine replica through a
handle routed by router.AffinityRouter. The proxy hands its deployment no body, so a router keyed on the body needs
this hop. Every response carries `x-smolvlm-replica` (the Engine replica that answered); /health and /metrics are
that replica's own. A replica that dies under a request fails it with a 503 (or an error event in a stream), never a
hang, and Serve starts a new one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..serving.server.limits import Limits
from ..serving.server.protocol import error_body
from .router import affinity_key

log = logging.getLogger("smolvlm_fast.ray")
REPLICA_HEADER = "x-smolvlm-replica"
ROUTER = "smolvlm_fast.ray.router.AffinityRouter"
RETRIES = 1  # a request whose replica died before answering is sent once more


@serve.deployment
class Engine:
    """One LLM and the server's FastAPI app over it; forward() runs one HTTP request through the app."""

    def __init__(self, model, llm_options: dict, model_name: str | None, limits: Limits, server_options: dict,
                 threads: int):
        from ..serving.ray_caption import size_threads
        from ..serving.server.app import create_app, load_served

        size_threads(threads)  # to the CPUs Ray reserved for this replica, not every core of the node
        self.llm, name = load_served(model, model_name, **llm_options)
        self.app = create_app(self.llm, model_name=name, limits=limits, **server_options)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes, affinity=None):
        """Yields {"status", "headers"} and then the body's chunks, as the app sends them. affinity is for the
        router only. Closing this generator (the client left) ends the app's request, which aborts generation."""
        messages: asyncio.Queue = asyncio.Queue()
        done = asyncio.Event()
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if pending:
                return pending.pop()
            await done.wait()  # the server's disconnect watch: it fires when this request is over or dropped
            return {"type": "http.disconnect"}

        async def run():
            try:
                await self.app(asgi_scope(method, path, query, headers), receive, messages.put)
            finally:
                await messages.put(None)

        task = asyncio.ensure_future(run())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": [
                        *((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])),
                        (REPLICA_HEADER, self.replica)]}
                elif message.get("body"):
                    yield message["body"]
            await task
        finally:
            done.set()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose engine thread died is replaced."""
        loop = self.llm._loop
        if loop is not None and not loop._thread.is_alive():
            raise RuntimeError("the engine loop thread is dead")

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


def asgi_scope(method: str, path: str, query: bytes, headers: list) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": None, "server": None}


@serve.deployment
class Ingress:
    """Forwards each HTTP request to an Engine replica chosen by its affinity key."""

    def __init__(self, engine, max_body_bytes: int):
        self.engine, self.max_body_bytes = engine.options(stream=True), max_body_bytes

    async def __call__(self, request: Request) -> Response:
        body = await self.read_body(request)
        if body is None:
            return Response(json.dumps(error_body(f"the request body is over this server's limit of "
                                                  f"{self.max_body_bytes} bytes", code="request_too_large")),
                            status_code=413, media_type="application/json")
        key = affinity_key(request.url.path, body) if request.method == "POST" else None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
        call = (request.method, request.url.path, request.url.query.encode(), headers, body)
        stream, streaming = None, False
        try:
            stream, head = await self.start(call, key)
            if streaming := dict(head["headers"]).get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(events(stream), status_code=head["status"], headers=dict(head["headers"]))
            chunks = [chunk async for chunk in stream]  # whole, so that a replica lost here is still a clean 503
            return Response(b"".join(chunks), status_code=head["status"], headers=dict(head["headers"]))
        except Exception as e:  # noqa: BLE001  the replica died or failed: one clear error, the server goes on
            log.warning("%s %s: the engine replica failed: %s", request.method, request.url.path, e)
            return replica_lost(e)
        finally:
            if stream is not None and not streaming:  # done, failed, or the client left (a cancel): end it there
                stream.cancel()

    async def read_body(self, request: Request) -> bytes | None:
        """The body, or None past the limit: checked here too, as this hop holds the whole body in memory."""
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
        return b"".join(chunks)

    async def start(self, call: tuple, key: str | None):
        """(the stream, its head) from a replica. A replica lost before it answered has sent nothing, so the
        request goes once more to another (the router has dropped the dead one by then)."""
        for attempt in range(RETRIES + 1):
            stream = self.engine.forward.remote(*call, affinity=key)
            try:
                return stream, await stream.__anext__()
            except (RayActorError, ActorUnavailableError):
                stream.cancel()
                if attempt == RETRIES:
                    raise
                log.warning("an engine replica was lost before answering: the request goes to another")


async def events(stream):
    """A streamed response's chunks; a replica lost in the middle ends the stream with an OpenAI error event."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:  # noqa: BLE001  the headers are sent: the error goes in the stream
        yield f"data: {json.dumps(lost_body(e))}\n\ndata: [DONE]\n\n".encode()
    finally:
        stream.cancel()  # the client left (or the stream ended): the replica's request ends too


def lost_body(e: Exception) -> dict:
    return error_body(f"the engine replica serving this request failed ({type(e).__name__}); retry it",
                      code="replica_unavailable", type="server_error")


def replica_lost(e: Exception) -> Response:
    return Response(json.dumps(lost_body(e)), status_code=503, media_type="application/json")


def build_app(model, num_replicas: int = 2, *, model_name: str | None = None, limits: Limits = Limits(),
              cpus_per_replica: float = 1, gpus_per_replica: float = 0, max_ongoing_requests: int = 32,
              ingress_replicas: int = 1, allowed_local_dir: str | None = None, allow_remote_urls: bool = False,
              allowed_domains: tuple[str, ...] = (), **llm_options) -> serve.Application:
    """The Serve application: num_replicas Engine replicas of model (each its own LLM(model, **llm_options)),
    reserving cpus_per_replica CPUs (its compute threads) and gpus_per_replica GPUs each, behind the Ingress. Run it
    with serve.run(app, route_prefix="/"). model is loaded on every replica's node: a path every node sees, or a
    hub id."""
    server_options = dict(allowed_local_dir=allowed_local_dir, allow_remote_urls=allow_remote_urls,
                          allowed_domains=tuple(allowed_domains))
    engine = Engine.options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
        health_check_period_s=5, graceful_shutdown_timeout_s=5,
    ).bind(str(model) if isinstance(model, os.PathLike) else model, llm_options, model_name, limits,
           server_options, max(1, int(cpus_per_replica)))
    return Ingress.options(num_replicas=ingress_replicas, max_ongoing_requests=1024,
                           ray_actor_options={"num_cpus": 0}).bind(engine, limits.max_body_bytes)
