"""What the server's fuzz and load tests share: a real uvicorn serving an app on 127.0.0.1 in a thread, small test
images as data: URLs, and the engine's KV-cache use as /metrics reports it."""
from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import uvicorn
from PIL import Image


@contextmanager
def running(app, startup_timeout_s: float = 60):
    """uvicorn serving app on a free port of 127.0.0.1 in a thread; yields the base URL once /health answers."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it Nagle's algorithm holds
    # each response's body back until the client's delayed ACK of its headers, 40 ms a request on a kept connection
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not answers(url):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server at {url} did not start")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def png(seed: int, size: tuple[int, int] = (30, 40)) -> bytes:
    """A random RGB picture (height, width) as a PNG file."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def data_url(seed: int, size: tuple[int, int] = (30, 40)) -> str:
    return f"data:image/png;base64,{base64.b64encode(png(seed, size)).decode()}"


def gauge(url: str, name: str) -> float:
    """One unlabelled sample of /metrics, e.g. smolvlm_kv_cache_blocks_used."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def wait_until_idle(url: str, timeout_s: float = 60) -> None:
    """Until no sequence runs or waits and no KV-cache block is held (a generous hang detector, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = ("smolvlm_num_requests_running", "smolvlm_num_requests_waiting", "smolvlm_kv_cache_blocks_used")
        if all(gauge(url, name) == 0 for name in names):
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine is not idle after {timeout_s} s: a request was lost or its blocks leaked")
