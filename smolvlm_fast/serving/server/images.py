"""Where a request's images come from, by the server's rules: data: URLs (base64 PNG, JPEG, WebP or GIF); local
paths and file:// URLs only inside the directory the server was started with; http(s) URLs only when remote fetching
is enabled, never from private or loopback addresses (checked at every redirect, the connection pinned to the
checked address), and only from the allowed domains when those are given. Each image is checked (format, bytes,
pixels) from its header before the processor decodes it. httpx is imported only to fetch a remote image.

A video_url (a SmolVLM2 model's video) comes by the same rules, as a data:video/... URL or a file; its bytes are
bounded by max_body_bytes (a video can be no larger than a request could carry) and its container (MP4/MOV,
Matroska/WebM, AVI) is checked from its first bytes here; the processor checks the rest as it decodes, off the event
loop, and a bad video is the request's 400."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import binascii
import io
import ipaddress
import os
import socket
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ...errors import InputError
from ...inputs.images import ALLOWED_FORMATS
from ...inputs.video import container_of
from .limits import Limits
from .protocol import ApiError

# PIL format -> data URL subtype (the formats inputs/images.py decodes; MPO is a phone's multi-picture JPEG)
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                 "TIFF": "tiff"}
DATA_URL_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}
VIDEO_URL_TYPES = {"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/avi", "video/x-msvideo"}
MAX_REDIRECTS = 3


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

    async def video_data_url(self, url: str, param: str) -> str:
        """A video_url -> a data:video/mp4 URL of its bytes (the demuxer is chosen from the bytes, not the type),
        by the rules of data_url with max_body_bytes for the size."""
        video_limits = dataclasses.replace(self.limits, max_image_bytes=self.limits.max_body_bytes)
        scheme = url_scheme(url, param)
        if scheme == "data":
            data = decode_data_url(url, video_limits.max_image_bytes, param, VIDEO_URL_TYPES)
        elif scheme in ("http", "https"):
            if not self.allow_remote_urls:
                raise ApiError("remote video URLs are not fetched by this server (it was started without "
                               "--allow-remote-urls or --allowed-image-domains): send the video as a base64 data: "
                               "URL", param=param, code="remote_urls_disabled")
            data = await fetch_remote(url, video_limits, param, self.allowed_domains)
        elif scheme in ("file", ""):
            data = await asyncio.to_thread(self.read_local, url, param, video_limits.max_image_bytes)
        else:
            raise ApiError(f"video URL scheme {scheme!r} is not supported (data:, file:, http:, https:)", param=param)
        if len(data) > video_limits.max_image_bytes:
            raise ApiError(f"a video of {len(data)} bytes is over this server's limit of {video_limits.max_image_bytes}",
                           param=param, code="video_too_large")
        try:
            container_of(data[:16], "the video")
        except InputError as e:
            raise ApiError(f"{param}: {e}", param=param, code="invalid_video") from None
        return f"data:video/mp4;base64,{base64.b64encode(data).decode()}"

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
            raise ApiError(f"{param}: not a readable image ({why_unreadable(e)})", param=param,
                           code="invalid_image") from None
        if kind not in IMAGE_FORMATS:
            raise ApiError(f"image format {kind} is not accepted (PNG, JPEG, WebP, GIF, BMP, TIFF)", param=param,
                           code="invalid_image")
        if width * height > limits.max_image_pixels:
            raise ApiError(f"a {width}x{height} image has more pixels than this server's limit of "
                           f"{limits.max_image_pixels}", param=param, code="image_too_large")
        return IMAGE_FORMATS[kind]

    def read_local(self, url: str, param: str, max_bytes: int | None = None) -> bytes:
        """A file inside the allowed directory (symlinks resolved first: no way out through them), at most
        max_bytes + 1 of it (default max_image_bytes: one more than the limit, so that the caller sees it over)."""
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
            return f.read((self.limits.max_image_bytes if max_bytes is None else max_bytes) + 1)


def why_unreadable(error: Exception) -> str:
    """Pillow's reason, without the repr of the in-memory file it names (cannot identify image file <_io.BytesIO
    object at 0x...>), which tells a client nothing."""
    if isinstance(error, UnidentifiedImageError):
        return "no PNG, JPEG, WebP, GIF, BMP or TIFF header: another format, or not an image"
    if isinstance(error, Image.DecompressionBombError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def url_scheme(url: str, param: str) -> str:
    """The URL's scheme, once it parses and holds no NUL (which no file name can)."""
    try:
        if "\0" in url:
            raise ValueError("a NUL character")
        return urlparse(url).scheme.lower()
    except ValueError as e:
        raise ApiError(f"image URL {url[:100]!r} is invalid: {e}", param=param) from None


def decode_data_url(url: str, max_bytes: int, param: str, types: set[str] = DATA_URL_TYPES) -> bytes:
    head, comma, payload = url.partition(",")
    fields = head[len("data:"):].lower().split(";")
    if not comma or fields[0] not in types or "base64" not in fields[1:]:
        kinds = "image/png|jpeg|webp|gif" if types is DATA_URL_TYPES else "video/mp4|quicktime|webm|x-matroska|avi"
        raise ApiError(f"a data URL must be data:{kinds};base64,<data>", param=param,
                       code="invalid_image" if types is DATA_URL_TYPES else "invalid_video")
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
