"""The vLLM-style front door: `LLM(model).generate(prompts, SamplingParams(...))` and `async for out in
llm.stream(prompt)`, over the continuous-batching Engine.

    llm = LLM("HuggingFaceTB/SmolVLM-256M-Instruct")   # on the CPU: the NumPy + C++ backend (engine/backend.py)
    chat = [{"role": "user", "content": [{"type": "image", "url": "cat.jpg"}, {"type": "text", "text": "What is it?"}]}]
    print(llm.generate([chat, "Once upon a time"], SamplingParams(max_new_tokens=64))[0].text)

A prompt is a string, a list of token ids, a chat (a list of {"role", "content"} messages, images in the content
blocks), a dict {"prompt": text with <image> markers, "images": [...]} or {"prompt_token_ids": [...]}, or an
engine.Request (serving/prompts.py turns each into token ids and images). A plain string is tokenized as it is,
not chat-templated: an instruct model answers best when it gets a chat message list, which goes through the
checkpoint's chat template. A bad prompt fails alone: its output carries the error, the others complete.

Steps run in the calling thread for generate(); stream() starts a background thread that runs steps while any
request is in flight, so that requests can be added and aborted from the asyncio event loop at any time.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..config import SamplingParams
from ..engine.backend import backend_of
from ..engine.engine import Engine, EngineStats
from ..engine.memory import choose_num_blocks
from ..engine.sequence import ImageInput, Request, Sequence
from ..errors import InputError, SmolVLMError
from ..inputs.image_budget import ImageBudget
from ..ops import use_kernels
from .prompts import as_prompt_list, is_processor, with_video
from .prompts import encode as encode_prompt


@dataclass
class LLMStats(EngineStats):
    """The engine's stats and what the model computes with."""
    backend: str = ""    # "numpy" or "torch"
    precision: str = ""  # "float32", "bfloat16" (or, on torch, "float16")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]          # generated so far
    text: str                     # their text (special tokens skipped; cut before a stop string)
    finished: bool
    finish_reason: str | None     # "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_cached_tokens: int        # prompt tokens taken from the prefix cache
    error: str | None = None


class LLM:
    """A model, its tokenizer or processor, and an Engine with a paged KV cache and prefix caching.

    Prompts: see the module's docstring. A plain string prompt is not chat-templated (a chat message list is)."""

    def __init__(self, model=None, *, backend: str | None = None, device=None, dtype=None, quantize: str | None = None,
                 tokenizer=None, max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 num_blocks: int | None = None, kv_cache_bytes: int | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, feature_cache_bytes: int = 256 << 20, ignore_eos: bool = False,
                 kernels: str | None = None, cuda_graphs: bool | None = None, image_detail: str = "auto",
                 max_image_tiles: int | None = None, upscale_images: bool | None = None):
        """model: a checkpoint (path or hub name, loaded as AutoModelForVision2Seq loads it, backend and dtype
        chosen as it chooses them; None: the default model), an AutoModelForVision2Seq model, or a bare models.smolvlm_torch / models.smolvlm_numpy model (pass tokenizer=
        for text). num_blocks: KV-cache blocks of block_size tokens; by default as many as kv_cache_bytes hold, and
        kv_cache_bytes by default a fraction of the memory free where the model runs (engine/memory.py), at most
        enough for max_num_seqs sequences of the model's whole context; the size chosen is logged. ignore_eos:
        stop only at max_new_tokens, stop token ids and stop strings, not at the checkpoint's end-of-sequence
        tokens. kernels: the order the ops try their implementations in ("cuda,triton,reference", a subset or one
        name): one process-wide setting (ops.use_kernels), so the engine's thread gets it too; None leaves it as it
        is (SMOLVLM_FAST_KERNELS's, else the default). cuda_graphs: replay decode steps from CUDA graphs (the torch
        backend on a GPU; off by default until measured there); None: SMOLVLM_FAST_CUDA_GRAPHS=1 turns them on.
        image_detail ("auto": as transformers, "low": one global view, "high": split), max_image_tiles (a cap on
        the tile grid) and upscale_images (False: no upscaling of small images): the images' token budget
        (inputs/image_budget.py) where a prompt sets none of its own (its detail, max_image_tiles, upscale)."""
        self.image_budget = ImageBudget(image_detail, max_image_tiles, upscale_images)  # checked before the load
        if kernels is not None:
            use_kernels(kernels, "LLM(kernels=...)")
        self.model, self.processor, generation = load(model, backend, device, dtype, quantize, tokenizer)
        self.backend = backend_of(self.model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        config = self.model.config
        eos = generation.get("eos_token_id", list(config.eos_token_ids))
        self.eos_token_ids = () if ignore_eos else tuple(eos if isinstance(eos, (list, tuple)) else [eos])
        num_blocks = choose_num_blocks(self.model, self.backend, block_size, max_num_seqs, num_blocks, kv_cache_bytes)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        self.engine = Engine(self.model, num_blocks=num_blocks, block_size=block_size,
                             max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                             enable_prefix_caching=enable_prefix_caching, feature_cache_bytes=feature_cache_bytes,
                             decode=decode, cuda_graphs=cuda_graphs, tokenizer=self.tokenizer)
        self._lock = threading.Lock()  # one thread steps the engine at a time
        self._loop: EngineLoop | None = None
        self._ids = itertools.count()

    @property
    def stats(self) -> LLMStats:
        """Counters since the start, gauges (running, waiting, kv_blocks_*) as of now, the backend and precision."""
        stats = self.engine.stats
        return LLMStats(**{f.name: getattr(stats, f.name) for f in fields(stats)}, backend=self.backend.name,
                        precision=self.precision)

    @property
    def precision(self) -> str:
        """"float32" or "bfloat16" (or, on the torch backend, "float16"): what the products take."""
        from ..auto import model_precision
        return model_precision(self.model)

    def __repr__(self) -> str:
        return (f"LLM(model_type={self.model.config.model_type!r}, backend={self.backend.name!r}, "
                f"precision={self.precision!r}, capacity={self.capacity} tokens)")

    @property
    def capacity(self) -> int:
        """Tokens the whole KV cache holds (a request's prompt + max_new_tokens must fit in it)."""
        return self.engine.capacity

    def check(self, request: Request) -> None:
        """Raise InputError when the request can never run: its prompt out of the vocabulary, too long for the
        context or the KV cache, or images it cannot take. The same check the engine makes when it is added."""
        self.engine.check(request)

    def check_response_format(self, params: SamplingParams) -> None:
        """InputError when the params' response_format / json_schema cannot be enforced (its schema does not compile
        for this tokenizer): Engine.check's own check, alone."""
        self.engine.check_response_format(params)

    @property
    def max_image_pixels(self) -> int | None:
        """The processor's cap on one image file's pixels, width x height before resizing (None for a text-only
        model, which takes no images)."""
        from ..inputs.images import MAX_IMAGE_PIXELS

        if not is_processor(self.processor):
            return None
        return self.processor.max_image_pixels or MAX_IMAGE_PIXELS  # the processor's None: the default cap

    @max_image_pixels.setter
    def max_image_pixels(self, value: int | None) -> None:
        if is_processor(self.processor):  # a text-only model decodes no images: nothing to bind
            self.processor.max_image_pixels = value

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.engine.reset_prefix_cache()

    # -- batch API
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 video=None) -> list[RequestOutput]:
        """One output per prompt, in order; a prompt that is invalid gets an output with its error. video: a file
        path, frames or an inputs.video.Video, asked about by the one question in prompts (a user message with the
        video, then the question, through the chat template)."""
        prompts = as_prompt_list(prompts if video is None else with_video(prompts, video))
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        requests = [self._try_request(p, sp) for p, sp in zip(prompts, params)]
        if self._loop is not None:
            return self._generate_in_loop(requests)
        with self._lock, self.backend.inference():
            seqs = [self._try_add(r) for r in requests]
            while self.engine.has_unfinished():
                self._step()
        return [self._output(s) if isinstance(s, Sequence) else s for s in seqs]

    def _try_request(self, prompt, params):
        try:
            return self.make_request(prompt, params)
        except SmolVLMError as e:
            return self._error_output(str(e))
        except Exception as e:  # noqa: BLE001  a chat template or an image that fails on this prompt alone
            return self._error_output(f"{type(e).__name__}: {e}")

    def _try_add(self, request, checked: bool = False) -> Sequence | RequestOutput:
        if isinstance(request, RequestOutput):
            return request
        try:
            return self.engine.add_request(request, checked=checked)
        except SmolVLMError as e:
            return self._error_output(str(e), request)
        except Exception as e:  # noqa: BLE001 -- one request's unexpected failure must not stop the engine loop
            return self._error_output(f"{type(e).__name__}: {e}", request)

    def _step(self) -> list[Sequence]:
        try:
            return self.engine.step()
        except Exception as e:  # noqa: BLE001  a failed step fails its requests, never the engine or the others
            return self.engine.fail_last_step(f"{type(e).__name__}: {e}")

    def _generate_in_loop(self, requests) -> list[RequestOutput]:
        outputs: list[RequestOutput | None] = [r if isinstance(r, RequestOutput) else None for r in requests]
        pending = [i for i, o in enumerate(outputs) if o is None]
        done = threading.Semaphore(0)

        def on_output(i):
            def put(out: RequestOutput):
                if out.finished:
                    outputs[i] = out
                    done.release()
            return put

        for i in pending:
            self._loop.submit(requests[i], on_output(i))
        for _ in pending:
            done.acquire()
        return outputs

    # -- streaming API
    async def stream(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                     checked: bool = False) -> AsyncIterator[RequestOutput]:
        """The request's output after every new token (cumulative), the last one with finished=True. An invalid
        prompt raises InputError here (checked=True: the caller has just run LLM.check on this request, as the
        server does before it answers); leaving the loop early (a client gone) aborts the request."""
        request = self.make_request(prompt, params, request_id)
        if not checked:
            self.check(request)  # the only check: the engine takes it as checked
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._engine_loop().submit(request, lambda out: loop.call_soon_threadsafe(events.put_nowait, out), checked=True)
        finished = False
        try:
            while not finished:
                out = await events.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a streamed request; its blocks go back to the cache and its stream ends with finish_reason abort."""
        if self._loop is not None:
            self._loop.abort(request_id)

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def _engine_loop(self) -> EngineLoop:
        with self._lock:
            if self._loop is None:
                self._loop = EngineLoop(self)
            return self._loop

    # -- prompts
    def make_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """A prompt in any accepted form -> an engine Request with the checkpoint's stop tokens added."""
        if isinstance(prompt, Request):
            request = prompt if params is None else replace(prompt, params=params)
        else:
            ids, images = self.encode(prompt)
            request = Request(ids, params or SamplingParams(), images=images)
        stops = tuple(dict.fromkeys(request.params.stop_token_ids + self.eos_token_ids))
        return replace(request, params=replace(request.params, stop_token_ids=stops),
                       request_id=request_id or request.request_id or f"req-{next(self._ids)}")

    def encode(self, prompt) -> tuple[list[int], list[ImageInput]]:
        """(prompt token ids, images) of a string, token ids, chat messages or a prompt dict (serving/prompts.py)."""
        return encode_prompt(prompt, self.processor, self.image_budget)

    # -- outputs
    def _output(self, seq: Sequence) -> RequestOutput:
        request = seq.request
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=list(request.prompt_ids), token_ids=list(seq.output_ids),
            text=self._text(seq), finished=seq.finished, finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens or 0, error=seq.error)

    def _text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        if seq.finish_reason == "stop":
            cut = [text.find(s) for s in seq.request.params.stop_strings if s in text]
            text = text[:min(cut)] if cut else text
        return text

    def _error_output(self, error: str, request: Request | None = None) -> RequestOutput:
        ids = list(request.prompt_ids) if request is not None else []
        request_id = request.request_id if request is not None else f"req-{next(self._ids)}"
        return RequestOutput(request_id, ids, [], "", True, "error", len(ids), 0, error)


class EngineLoop:
    """Runs the LLM's engine in a background thread; requests are added and aborted from any thread through an
    inbox that the thread reads between steps, so that only it touches the engine."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._listeners: dict[Sequence, Callable[[RequestOutput], None]] = {}
        self._by_id: dict[str, Sequence] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="smolvlm-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_output: Callable[[RequestOutput], None], checked: bool = False) -> None:
        self._inbox.put(lambda: self._add(request, on_output, checked))

    def abort(self, request_id: str) -> None:
        self._inbox.put(lambda: self._abort(request_id))

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(lambda: None)
        self._thread.join()

    def _run(self) -> None:
        with self.llm.backend.inference():
            while not self._stopped:
                self._drain(block=not self.llm.engine.has_unfinished())
                if self.llm.engine.has_unfinished():
                    with self.llm._lock:
                        updated = self.llm._step()
                    self._notify(updated)

    def _drain(self, block: bool) -> None:
        try:
            self._inbox.get(block=block)()
            while True:
                self._inbox.get_nowait()()
        except queue.Empty:
            pass

    def _add(self, request: Request, on_output, checked: bool) -> None:
        with self.llm._lock:
            seq = self.llm._try_add(request, checked)
        if isinstance(seq, RequestOutput):
            on_output(seq)
            return
        self._listeners[seq], self._by_id[request.request_id] = on_output, seq
        if seq.finished:  # max_new_tokens 0
            self._notify([seq])

    def _abort(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None and not seq.finished:
            with self.llm._lock:
                self.llm.engine.abort(seq)
            self._notify([seq])

    def _notify(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            listener = self._listeners.get(seq)
            if listener is None:
                continue
            try:
                listener(self.llm._output(seq))
            except Exception:  # noqa: BLE001  the caller is gone (its event loop closed): stop its request
                with self.llm._lock:
                    self.llm.engine.abort(seq)
            if seq.finished:
                del self._listeners[seq]
                del self._by_id[seq.request.request_id]


# -- loading and helpers

def load(model, backend, device, dtype, quantize, tokenizer):
    """(model, processor or tokenizer or None, generation config) from a path, an auto model or a bare model."""
    from ..auto import AutoProcessor, SmolVLMForConditionalGeneration, checkpoint_location

    if model is None:
        from ..formats.hub import default_model_path
        model = default_model_path()  # as `smolvlm-fast generate` and `serve` do without --model
    if isinstance(model, (str, Path)):
        auto = SmolVLMForConditionalGeneration.from_pretrained(model, backend=backend, device=device, dtype=dtype,
                                                               quantize=quantize)
        processor = tokenizer or auto.tokenizer
        location = checkpoint_location(model)
        if processor is None and (location.is_file() or (location / "tokenizer.json").exists()):
            processor = AutoProcessor.from_pretrained(model)  # without tokenizer files: token ids only
        return auto.model, processor, auto.generation_config
    if isinstance(model, SmolVLMForConditionalGeneration):
        return model.model, tokenizer or model.tokenizer, model.generation_config
    members = ("config", "backend", "forward", "allocate_kv_cache", "compute_logits")
    if not all(hasattr(model, name) for name in members):
        raise InputError(f"LLM takes a checkpoint path, an AutoModelForVision2Seq model or a smolvlm_fast model, "
                         f"got {type(model).__name__}")
    return model, tokenizer, {}
