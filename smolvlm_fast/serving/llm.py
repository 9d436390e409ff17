"""The vLLM-style front door: `LLM(model).generate(prompts, SamplingParams(...))` and `async for out in
llm.stream(prompt)`, over the continuous-batching Engine.

    llm = LLM("HuggingFaceTB/SmolVLM-256M-Instruct", backend="numpy")
    chat = [{"role": "user", "content": [{"type": "image", "url": "cat.jpg"}, {"type": "text", "text": "What is it?"}]}]
    print(llm.generate([chat, "Once upon a time"], SamplingParams(max_new_tokens=64))[0].text)

A prompt is a string, a list of token ids, a chat (a list of {"role", "content"} messages, images in the content
blocks), a dict {"prompt": text with <image> markers, "images": [...]} or {"prompt_token_ids": [...]}, or an
engine.Request. A bad prompt fails alone: its output carries the error, the others complete.

Steps run in the calling thread for generate(); stream() starts a background thread that runs steps while any
request is in flight, so that requests can be added and aborted from the asyncio event loop at any time.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import SamplingParams
from ..engine.engine import Engine, EngineStats, check_request
from ..engine.sequence import ImageInput, Request, Sequence
from ..errors import InputError, SmolVLMError


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
    """A model, its tokenizer or processor, and an Engine with a paged KV cache and prefix caching."""

    def __init__(self, model, *, backend: str | None = None, device=None, dtype=None, quantize: str | None = None,
                 tokenizer=None, max_num_batched_tokens: int = 512, max_num_seqs: int = 64,
                 num_blocks: int | None = None, kv_cache_bytes: int = 1 << 30, block_size: int = 16,
                 enable_prefix_caching: bool = True, feature_cache_bytes: int = 256 << 20, ignore_eos: bool = False):
        """model: a checkpoint (path or hub name, loaded as AutoModelForVision2Seq loads it), an
        AutoModelForVision2Seq model, or a bare model_torch / model_numpy model (pass tokenizer= for text).
        num_blocks: KV-cache blocks of block_size tokens; by default as many as kv_cache_bytes hold, at most enough
        for max_num_seqs sequences of the model's whole context. ignore_eos: stop only at max_new_tokens, stop
        token ids and stop strings, not at the checkpoint's end-of-sequence tokens."""
        self.model, self.processor, generation = load(model, backend, device, dtype, quantize, tokenizer)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        config = self.model.config
        eos = generation.get("eos_token_id", list(config.eos_token_ids))
        self.eos_token_ids = () if ignore_eos else tuple(eos if isinstance(eos, (list, tuple)) else [eos])
        if num_blocks is None:
            num_blocks = default_num_blocks(self.model, block_size, kv_cache_bytes, max_num_seqs)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        self.engine = Engine(self.model, num_blocks=num_blocks, block_size=block_size,
                             max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                             enable_prefix_caching=enable_prefix_caching, feature_cache_bytes=feature_cache_bytes,
                             decode=decode)
        self._lock = threading.Lock()  # one thread steps the engine at a time
        self._loop: EngineLoop | None = None
        self._ids = itertools.count()

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.engine.reset_prefix_cache()

    # -- batch API
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order; a prompt that is invalid gets an output with its error."""
        prompts = as_prompt_list(prompts)
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        requests = [self._try_request(p, sp) for p, sp in zip(prompts, params)]
        if self._loop is not None:
            return self._generate_in_loop(requests)
        with self._lock, self._inference():
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

    def _try_add(self, request) -> Sequence | RequestOutput:
        if isinstance(request, RequestOutput):
            return request
        try:
            return self.engine.add_request(request)
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
    async def stream(self, prompt, params: SamplingParams | None = None, *,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's output after every new token (cumulative), the last one with finished=True. An invalid
        prompt raises InputError here; leaving the loop early (a client gone) aborts the request."""
        request = self.make_request(prompt, params, request_id)
        check_request(self.model, request, self.engine.cache.capacity)
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._engine_loop().submit(request, lambda out: loop.call_soon_threadsafe(events.put_nowait, out))
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
        """(prompt token ids, images) of a string, token ids, chat messages or a prompt dict."""
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return [int(t) for t in prompt["prompt_token_ids"]], []
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.encode_text(prompt["prompt"], list(prompt.get("images") or []))
        if isinstance(prompt, str):
            return self.encode_text(prompt, [])
        if is_chat(prompt):
            return self.encode_chat(prompt)
        if isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            return [int(t) for t in prompt], []
        raise InputError(f"a prompt must be a string, token ids, chat messages or a dict, got {type(prompt).__name__}")

    def encode_chat(self, messages) -> tuple[list[int], list[ImageInput]]:
        from ..inputs.processor import conversation_images, image_url_blocks_as_images

        if self.processor is None:
            raise InputError("chat prompts need a tokenizer: pass tokenizer= to LLM")
        messages = image_url_blocks_as_images(messages)
        images = conversation_images(messages)[0]
        self._check_can_take(images)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode_text(text, images)

    def encode_text(self, text: str, images: list) -> tuple[list[int], list[ImageInput]]:
        """Text with one <image> marker per image -> token ids (each marker expanded as the processor does) and
        one ImageInput per image, its frames and a hash of its pixels."""
        from ..inputs.processor import Processor, check_image_counts, expand_image_tokens

        if self.tokenizer is None:
            raise InputError("text prompts need a tokenizer: pass tokenizer= to LLM, or pass token ids")
        if not isinstance(text, str):
            raise InputError(f"a prompt's text must be a string, got {type(text).__name__}")
        self._check_can_take(images)
        inputs, expansions = [], []
        if isinstance(self.processor, Processor):
            check_image_counts([text], [images] if images else None, self.processor.image_token,
                               self.processor.max_images)
            for image in images:
                image_input, expansion = self._process_image(image)
                inputs.append(image_input)
                expansions.append(expansion)
            text = expand_image_tokens(text, self.processor.image_token, expansions)
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))), inputs

    def _check_can_take(self, images: list) -> None:
        from ..inputs.processor import Processor

        if images and not isinstance(self.processor, Processor):
            raise InputError("this is a text-only model (no image processor); it cannot take images")

    def _process_image(self, image) -> tuple[ImageInput, str]:
        """One image -> (its frames as an ImageInput, the text its <image> marker expands to)."""
        pixel_values, pixel_mask, grids = self.processor.process_images([[image]])  # [1, n, C, m, m], [1, n, m, m]
        pixels = pixel_values[0]
        digest = hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=32).digest()
        rows, cols = grids[0][0]
        expansion = self.processor.image_text(rows, cols)
        return ImageInput(pixels, pixel_mask[0], content_hash=digest), expansion

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

    def _inference(self):
        """torch.inference_mode() for the torch backend (per thread), nothing for NumPy."""
        if not hasattr(self.model, "parameters"):
            return nullcontext()
        import torch
        return torch.inference_mode()


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

    def submit(self, request: Request, on_output: Callable[[RequestOutput], None]) -> None:
        self._inbox.put(lambda: self._add(request, on_output))

    def abort(self, request_id: str) -> None:
        self._inbox.put(lambda: self._abort(request_id))

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(lambda: None)
        self._thread.join()

    def _run(self) -> None:
        with self.llm._inference():
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

    def _add(self, request: Request, on_output) -> None:
        with self.llm._lock:
            seq = self.llm._try_add(request)
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
    if not all(hasattr(model, name) for name in ("config", "forward", "allocate_kv_cache", "compute_logits")):
        raise InputError(f"LLM takes a checkpoint path, an AutoModelForVision2Seq model or a smolvlm_fast model, "
                         f"got {type(model).__name__}")
    return model, tokenizer, {}


def default_num_blocks(model, block_size: int, kv_cache_bytes: int, max_num_seqs: int) -> int:
    """As many blocks as kv_cache_bytes hold (K and V, every layer), but no more than max_num_seqs whole contexts."""
    t = model.config.text
    itemsize = 4 if not hasattr(model, "parameters") else next(model.parameters()).element_size()
    block_bytes = 2 * t.num_hidden_layers * block_size * t.num_key_value_heads * t.head_dim * itemsize
    most = max_num_seqs * -(-t.max_position_embeddings // block_size)
    return max(1, min(kv_cache_bytes // block_bytes, most))


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) and "role" in m
                                                                      for m in prompt)


def as_prompt_list(prompts) -> list:
    """One prompt (a string, a dict, a Request, token ids or one chat) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict, Request)) or is_chat(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        return [prompts]
    return list(prompts)
