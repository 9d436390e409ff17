"""The web demo behind `smolvlm-fast demo [MODEL]`: a Gradio page to upload or paste an image (a video, for a model
that takes them), ask about it and watch the answer stream in, with the model, the backend, the time to first token
and the decode rate under it.

Every visitor's question goes through the one LLM's stream(), so the requests of several users are batched together
by its engine loop (continuous batching), never a model per user; Gradio's queue lets `concurrency` of them run at
once. Uploads are checked at the border as the server checks image_url parts: bytes over --max-image-bytes, a file
that is no JPEG/PNG/WebP/GIF/BMP/TIFF, or pixels over --max-image-pixels are an error shown in the page (gr.Error),
and the app goes on serving. gradio (the `demo` extra) is needed by this module only.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import gradio as gr

from ..config import SamplingParams
from ..errors import InputError, SmolVLMError
from ..inputs.images import load_image
from .llm import LLM, RequestOutput
from .prompts import is_processor

VIDEO_TYPES = [".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"]


@dataclass(frozen=True)
class DemoLimits:
    """What one question may bring; the image defaults are the server's (serving/server/limits.py)."""
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 40_000_000
    max_video_bytes: int = 32 << 20
    max_new_tokens: int = 1024  # the slider's top


def image_input(**kwargs) -> gr.Image:
    """gr.Image whose handler gets the uploaded file's path unopened (gr.Image itself opens it with every Pillow
    plugin), so that the package's reader, with its formats and pixel cap, is the only one to decode user bytes. Set
    on the instance: a gr.Image subclass would make Gradio write a .pyi stub next to this module at import."""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = upload_path
    return image


def upload_path(payload) -> str | None:
    if payload is None:
        return None
    return payload.path or payload.url  # a webcam or pasted frame may come as a data: URL


class Demo:
    """The page's handlers, over one LLM shared by every user."""

    def __init__(self, llm: LLM, model_name: str, limits: DemoLimits = DemoLimits()):
        self.llm, self.model_name, self.limits = llm, model_name, limits
        llm.max_image_pixels = limits.max_image_pixels  # binds the processor's decoding of video frames too

    @property
    def takes_images(self) -> bool:
        return is_processor(self.llm.processor)

    @property
    def takes_video(self) -> bool:
        return getattr(self.llm.processor, "video_config", None) is not None

    def chat(self, image: str | None, video: str | None, question: str) -> list[dict]:
        """The one-message chat for the page's inputs; a gr.Error for an input the model cannot take."""
        if not (question or "").strip():
            raise gr.Error("Type a question first.")
        if (image or video) and not self.takes_images:
            raise gr.Error(f"{self.model_name} is a text-only model: it cannot look at images or videos.")
        if video and not self.takes_video:
            raise gr.Error(f"{self.model_name} takes no video (a SmolVLM2 Video-Instruct checkpoint does).")
        if not self.takes_images:  # a text-only model's chat template takes the content as a string
            return [{"role": "user", "content": question}]
        content = []
        if video:
            content.append({"type": "video", "path": checked_file(video, self.limits.max_video_bytes, "video")})
        if image:
            content.append({"type": "image", "image": self.checked_image(image)})
        return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]

    def checked_image(self, source: str):
        """The upload decoded (RGB array) by the package's safe reader, within the byte and pixel limits."""
        if source.startswith("data:"):
            if len(source) * 3 // 4 > self.limits.max_image_bytes:
                raise gr.Error(too_large("image", self.limits.max_image_bytes))
        else:
            checked_file(source, self.limits.max_image_bytes, "image")
        try:
            return load_image(source, max_pixels=self.limits.max_image_pixels)
        except InputError as e:
            raise gr.Error(f"Not a usable image: {without_path(str(e), source)}") from None

    def params(self, max_new_tokens, temperature) -> SamplingParams:
        tokens = max(1, min(int(max_new_tokens), self.limits.max_new_tokens))
        return SamplingParams(max_new_tokens=tokens, temperature=max(0.0, float(temperature)))

    async def answer(self, image, video, question, max_new_tokens, temperature):
        """Yield (answer so far, stats line) after every new token; a bad input raises gr.Error before any."""
        clock = Clock()  # the time to first token includes the image's decoding and preprocessing, as the user waits
        request = await asyncio.to_thread(self.request, image, video, question, max_new_tokens, temperature)
        out = None
        async for out in self.llm.stream(request, checked=True):
            clock.tick(len(out.token_ids))
            yield out.text, self.stats_line(clock, out)
        if out is not None and out.error:
            raise gr.Error(f"The request failed: {out.error}")

    def request(self, image, video, question, max_new_tokens, temperature):
        """The checked engine request (run off the event loop, which serves every user); a gr.Error for a bad one."""
        chat = self.chat(image, video, question)
        try:
            request = self.llm.make_request(chat, self.params(max_new_tokens, temperature))
            self.llm.check(request)
        except SmolVLMError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001  a video decoder's own error: this question's, not the app's
            raise gr.Error(f"{type(e).__name__}: {e}") from None
        return request

    def stats_line(self, clock: Clock, out: RequestOutput) -> str:
        ttft = f"{clock.ttft_ms:.0f} ms" if clock.ttft_ms is not None else "…"
        rate = f"{clock.rate:.1f} tokens/s" if clock.rate is not None else "… tokens/s"
        state = f"finished ({out.finish_reason})" if out.finished else "streaming"
        return (f"model: {self.model_name} · backend: {self.llm.backend.name} ({self.llm.precision}) · "
                f"time to first token: {ttft} · {rate} · {len(out.token_ids)} tokens · {state}")


class Clock:
    """Time to first token (from the request's start) and the decode rate after it, as `generate --verbose`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def tick(self, tokens: int) -> None:
        now = time.perf_counter()
        if tokens and self.first is None:
            self.first = now
        if tokens > self.tokens:
            self.last, self.tokens = now, tokens

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1000

    @property
    def rate(self) -> float | None:
        if self.tokens < 2 or self.last == self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)


def checked_file(path: str, max_bytes: int, kind: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise gr.Error(f"Cannot read the {kind}: {e.strerror or e}") from None
    if size > max_bytes:
        raise gr.Error(too_large(kind, max_bytes, size))
    return path


def too_large(kind: str, max_bytes: int, size: int | None = None) -> str:
    got = f" ({size:,} bytes)" if size is not None else ""
    return f"The {kind} is too large{got}: this demo takes at most {max_bytes:,} bytes."


def without_path(message: str, path: str) -> str:
    """The reader's message without Gradio's temporary path, which means nothing to the user."""
    return message.replace(f"image file {path}", "the upload").replace(path, "the upload")


def build_demo(llm: LLM, model_name: str, limits: DemoLimits = DemoLimits(), concurrency: int = 16) -> gr.Blocks:
    """The page; several users' questions run at once (up to concurrency) through llm's one engine."""
    demo = Demo(llm, model_name, limits)
    with gr.Blocks(title=f"smolvlm-fast: {model_name}", analytics_enabled=False) as blocks:
        gr.Markdown(f"## smolvlm-fast · {model_name}\n{model_note(demo)}")
        with gr.Row():
            with gr.Column():
                image = image_input(label="Image (upload or paste)", sources=["upload", "clipboard"],
                                    visible=demo.takes_images, elem_id="image")
                video = gr.File(label="Video", file_types=VIDEO_TYPES, type="filepath", visible=demo.takes_video,
                                elem_id="video")
                question = gr.Textbox(label="Question", placeholder="What is in the picture?", elem_id="question")
                with gr.Row():
                    tokens = gr.Slider(1, limits.max_new_tokens, value=min(256, limits.max_new_tokens), step=1,
                                       label="Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                            elem_id="temperature")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=12, interactive=False, elem_id="answer")
                stats = gr.Markdown(f"model: {model_name} · backend: {llm.backend.name} ({llm.precision})",
                                    elem_id="stats")
        inputs = [image, video, question, tokens, temperature]
        for event in (ask.click, question.submit):
            event(demo.answer, inputs, [answer, stats], concurrency_id="llm")
    blocks.queue(default_concurrency_limit=concurrency)
    return blocks


def model_note(demo: Demo) -> str:
    if not demo.takes_images:
        return ("This is a text-only model: ask a question (no image input). Pass a SmolVLM checkpoint to ask about "
                "images.")
    return "Upload or paste an image" + (" or a video" if demo.takes_video else "") + ", then ask about it."


def run(args) -> int:
    """`smolvlm-fast demo`: load the model as `serve` does and serve the page until interrupted."""
    from ..formats.hub import default_model_path
    from ..inputs.image_budget import ImageBudget
    from .server.app import served_model_name  # the server's short name: never an absolute path in the page

    model = args.model if args.model is not None else default_model_path()
    llm = LLM(model, backend=args.backend, device=args.device, dtype=args.dtype, quantize=args.quantize,
              **ImageBudget.of_flags(args).llm_options())
    limits = DemoLimits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                        max_video_bytes=args.max_video_bytes)
    blocks = build_demo(llm, served_model_name(model), limits, concurrency=args.concurrency)
    try:
        blocks.launch(server_name=args.host, server_port=args.port, share=False, show_error=True,
                      max_file_size=max(limits.max_image_bytes, limits.max_video_bytes) + 1024)
    finally:
        llm.shutdown()
    return 0
