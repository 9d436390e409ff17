"""The transformers-shaped front door: AutoModelForVision2Seq & co. and the model object they return.

Two backends run the same generation loop: "torch" (models/smolvlm_torch, CPU or CUDA) and "numpy"
(models/smolvlm_numpy, NumPy + the C++ extension, no PyTorch needed), fixed at load time; which one a caller who
names none gets is engine/backend.choose_backend's choice (on the CPU: numpy), and what differs between them is
in engine/backend.py. The model hands back what transformers would: torch tensors for torch inputs, NumPy
arrays for NumPy inputs, on either backend.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, SamplingParams
from .engine.backend import as_numpy, backend_named, backend_of, choose_backend
from .engine.checks import check_requests
from .engine.engine import generate as run_generation
from .engine.engine import new_cache, prefill
from .engine.sequence import Request
from .errors import CheckpointError, InputError, SmolVLMError
from .formats.hub import resolve_model
from .ops import use_kernels

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
GENERATE_KWARGS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
                   "pad_token_id", "stop_strings", "seed", "max_length", "num_beams", "use_cache", "generation_config",
                   "return_dict_in_generate", "json_schema", "response_format"}  # the last two: ours (structured output)


@dataclass
class ModelOutput:
    logits: object  # [B, S, vocab], a torch tensor or a NumPy array as the backend computes

    def __getitem__(self, key):
        return getattr(self, key)


def dtype_name(dtype, checkpoint_dtype: str | None = None) -> str | None:
    """'float32' | 'float16' | 'bfloat16' | None for a torch dtype, a string, or 'auto' (checkpoint_dtype's
    name, None where that is unknown)."""
    if dtype is None:
        return None
    if not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        return DTYPE_NAMES.get(checkpoint_dtype or "")
    if dtype not in DTYPE_NAMES:
        raise InputError(f"dtype {dtype!r} is not supported (use one of {', '.join(DTYPE_NAMES)})")
    return DTYPE_NAMES[dtype]


SAFETENSORS_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def checkpoint_dtype(location: Path) -> str | None:
    """The dtype transformers 5's default (dtype="auto") loads a checkpoint directory in: config.json's dtype
    (torch_dtype in older files), else the first floating-point tensor's in its (first) safetensors file; None
    for a GGUF file or where neither says."""
    if not (location.is_dir() and (location / "config.json").exists()):
        return None
    raw = ModelConfig.read_json(location / "config.json")
    named = raw.get("dtype", raw.get("torch_dtype"))
    if isinstance(named, str) and named in DTYPE_NAMES:
        return DTYPE_NAMES[named]
    from .formats.safetensors import check_safetensors, checkpoint_files

    entries = check_safetensors(checkpoint_files(location)[0])
    return next((SAFETENSORS_FLOATS[d] for d, *_ in entries.values() if d in SAFETENSORS_FLOATS), None)


def numpy_precision(location: Path, dtype: str | None) -> str:
    """What the numpy backend computes in for dtype (None: transformers 5's default, the checkpoint's dtype):
    "float32" or "bfloat16" (bf16 products, float32 accumulation). A float16 checkpoint computes in float32
    there (float16 has no CPU products here; widening it is exact); GGUF files compute in float32."""
    if dtype == "float16":
        raise InputError("dtype float16 does not run on the CPU (backend 'numpy'): use dtype='bfloat16' (bf16 "
                         "products, float32 accumulation) or 'float32'")
    if location.suffix == ".gguf":
        if dtype not in (None, "float32"):
            raise InputError(f"a GGUF file computes in float32 on backend 'numpy', not {dtype} (its quantized "
                             "weights stay as they are)")
        return "float32"
    if dtype is not None:
        return dtype
    return "bfloat16" if checkpoint_dtype(location) == "bfloat16" else "float32"


def checkpoint_location(path, gguf_file=None) -> Path:
    """The local checkpoint directory, or the .gguf file to read."""
    root = resolve_model(path, gguf_file=gguf_file)  # a hub id: fetch the named GGUF too
    if gguf_file is not None:
        if Path(gguf_file).suffix.lower() != ".gguf":
            raise CheckpointError(f"{gguf_file}: gguf_file must be a .gguf file (only GGUF and safetensors load)")
        root = (root if root.is_dir() else root.parent) / gguf_file
        if not root.exists():
            raise CheckpointError(f"{root}: GGUF file not found")
    return root


def load_torch_model(location: Path, device, dtype: str | None, quantize: str | None = None,
                     quantize_options: dict | None = None):
    """(model, generation config, tokenizer or None) on the torch backend. quantize="int4" swaps the decoder's
    Linear layers for Int4Linear after loading (GGUF Q4_0 / Q4_1 weights go in as they are); quantize_options
    (vision, lm_head) extend it to the vision encoder and the output projection."""
    import torch

    from .engine.threads import size_torch_threads
    from .formats.safetensors import iter_safetensors
    from .models.loader import build_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        check_cuda(torch, device)
    else:
        size_torch_threads()  # at most the CPUs this process may run on (engine/threads.py)
    dtype = getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    options = quantize_options or {}
    if location.suffix == ".gguf" and quantize == "int4":
        from .formats.gguf import load_gguf_tokenizer
        from .models.int4_linear import load_gguf_int4
        model = load_gguf_int4(location, device, dtype, **options)
        return model, {"eos_token_id": list(model.config.eos_token_ids)}, load_gguf_tokenizer(location)
    if location.suffix == ".gguf":
        from .formats.gguf import load_gguf
        checkpoint = load_gguf(location)
        config = ModelConfig.from_dict(checkpoint.config, source=str(location))
        model = build_model(config, checkpoint.tensors.items(), str(location), device, dtype)
        return model, _gguf_generation_config(checkpoint.config), checkpoint.tokenizer
    config = ModelConfig.from_file(location / "config.json")
    model = build_model(config, iter_safetensors(location), str(location), device, dtype)
    if quantize == "int4":
        from .models.int4_linear import quantize_model
        quantize_model(model, **options)
    return model, _read_generation_config(location), None


def check_cuda(torch, device) -> None:
    """A clear error at load, naming what is missing, where a CUDA device was asked for and cannot be had."""
    if torch.version.cuda is None:
        raise SmolVLMError(f"device {str(device)!r} needs CUDA, but this torch ({torch.__version__}) was built without "
                           "it: install a CUDA build of torch, or use device='cpu'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SmolVLMError(f"device {str(device)!r}: torch has CUDA {torch.version.cuda} but sees no GPU (a driver "
                           "missing, or CUDA_VISIBLE_DEVICES hides them); use device='cpu'")
    if device.index is not None and device.index >= count:
        raise SmolVLMError(f"device {str(device)!r}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})")


def load_numpy_model(location: Path, device, dtype: str | None, quantize: str | None):
    """(model, generation config, tokenizer or None) on the NumPy + C++ backend (CPU; precision from dtype,
    numpy_precision). torch, where imported, gets at most as many threads as the C++ pool (engine/threads.py)."""
    from .engine.threads import size_torch_threads
    from .models.smolvlm_numpy import NumpyModel

    if str(device if device is not None else "cpu") != "cpu":
        raise InputError(f"backend 'numpy' runs on the CPU only, not on device {str(device)!r}")
    model = NumpyModel.from_checkpoint(location, quantize=quantize, precision=numpy_precision(location, dtype))
    size_torch_threads()
    if location.suffix == ".gguf":
        from .formats.gguf import load_gguf_tokenizer
        generation = {"eos_token_id": list(model.config.eos_token_ids)}
        return model, generation, load_gguf_tokenizer(location)
    return model, _read_generation_config(location), None


class SmolVLMForConditionalGeneration:
    """What `AutoModelForVision2Seq.from_pretrained` returns: transformers' calling conventions over our model."""

    def __init__(self, model, backend: str | None = None, generation_config: dict | None = None, tokenizer=None,
                 block_size: int = 16):
        self.model, self.block_size, self.tokenizer = model, block_size, tokenizer
        self._backend = backend_named(backend) if backend is not None else backend_of(model)
        self.generation_config = generation_config or {}

    # -- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, device=None, dtype=None, torch_dtype=None,
                        backend: str | None = None, gguf_file=None, quantize: str | None = None,
                        quantize_vision: bool = False, quantize_lm_head: bool = False,
                        block_size: int = 16, kernels: str | None = None, **_ignored):
        """backend: None picks one (engine/backend.choose_backend): on the CPU (device "cpu", or None with no
        CUDA GPU) "numpy", the NumPy + C++ path, whether or not torch is installed (where smolvlm_fast._cpu lacks
        its fused decoder step: torch if installed); on CUDA "torch"; and "torch" whenever quantize_vision or
        quantize_lm_head is given, options only it has. A backend named always wins.
        dtype (or torch_dtype): "auto" is the checkpoint's dtype. On "numpy" None is that too (transformers 5's
        default): a bf16 checkpoint computes in bfloat16, a float32 (or float16) one and GGUF files in float32;
        dtype="bfloat16" or "float32" sets it, "float16" is an error there. On "torch" None means bfloat16 on
        CUDA and float32 on the CPU.
        quantize="int4": the decoder's linear layers in int4 (group 64, or 32 where 64 does not divide K; GGUF
        Q4_0 / Q4_1 weights as they are). quantize_vision / quantize_lm_head (torch backend) add the vision encoder
        with the connector, and the output projection.
        kernels: the order the ops try their implementations in, "cuda,triton,reference", a subset or one name
        (ops.use_kernels: it is one setting for the whole process, every thread and model; None leaves it as it is,
        by default SMOLVLM_FAST_KERNELS's or that one)."""
        if kernels is not None:
            use_kernels(kernels, "from_pretrained(kernels=...)")
        backend = choose_backend(backend, device, torch_only_options=quantize_vision or quantize_lm_head)
        if quantize not in (None, "int4"):
            raise InputError(f"quantize must be None or 'int4', got {quantize!r}")
        if (quantize_vision or quantize_lm_head) and (quantize is None or backend == "numpy"):
            raise InputError("quantize_vision and quantize_lm_head need quantize='int4' and backend='torch'")
        location = checkpoint_location(pretrained_model_name_or_path, gguf_file)
        requested = dtype if dtype is not None else torch_dtype
        if backend == "numpy":
            loaded = load_numpy_model(location, device, dtype_name(requested, None), quantize)  # "auto": None
            return cls(*_with_backend(loaded, "numpy"), block_size=block_size)
        dtype = dtype_name(requested, checkpoint_dtype(location) if requested == "auto" else None)
        options = {"vision": quantize_vision, "lm_head": quantize_lm_head}
        return cls(*_with_backend(load_torch_model(location, device, dtype, quantize, options), "torch"),
                   block_size=block_size)

    # -- transformers conventions
    @property
    def backend(self) -> str:
        """"torch" or "numpy"."""
        return self._backend.name

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        """The dtype it computes in. On "numpy": torch.float32 / torch.bfloat16 where torch is imported (what a
        transformers caller compares with), else np.float32 (NumPy has no bfloat16: see precision)."""
        torch = sys.modules.get("torch")
        if self.backend == "numpy" and torch is not None and hasattr(torch, self.precision):
            return getattr(torch, self.precision)
        return self.model.dtype

    @property
    def precision(self) -> str:
        """"float32", "bfloat16" or (torch backend) "float16": the products' input precision."""
        return model_precision(self.model)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_type={self.config.model_type!r}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, precision={self.precision!r})")

    def eval(self):
        return self

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, **_ignored):
        return self.forward(input_ids, attention_mask, pixel_values, pixel_attention_mask)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None) -> ModelOutput:
        """Logits for every position of a (padded) batch; padding positions get zeros."""
        with self._backend.inference():
            requests, keep = self._requests(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                            SamplingParams(max_new_tokens=0))
            check_requests(self.model, requests)
            cache, kv = new_cache(self.model, [len(r.prompt_ids) for r in requests], self.block_size)
            hidden, _ = prefill(self.model, cache, kv, requests, list(range(len(requests))))
            rows = self.model.compute_logits(hidden)  # [T, V]
            return ModelOutput(logits=self._backend.from_numpy(self._backend.scatter_rows(rows, keep), like=input_ids))

    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                 streamer=None, tokenizer=None, **generation_kwargs):
        """Prompt + new ids per row, as transformers returns them (finished rows padded with pad_token_id)."""
        params = self._sampling_params(generation_kwargs)
        with self._backend.inference():
            requests, _ = self._requests(input_ids, attention_mask, pixel_values, pixel_attention_mask, params)
            prompt = self._backend.from_numpy(_ids_as_numpy(input_ids), like=input_ids)
            if streamer is not None:
                if len(requests) != 1:
                    raise InputError("streaming needs a batch of one prompt")
                streamer.put(prompt)
                requests[0].on_token = lambda token: streamer.put(self._backend.from_numpy(np.array([token]),
                                                                                           like=input_ids))
            tokenizer = tokenizer or self.tokenizer
            decode = tokenizer.decode if tokenizer is not None else None
            if (params.stop_strings or params.schema) and decode is None:
                raise InputError("stop_strings and json_schema need the tokenizer: pass tokenizer=... to generate()")
            seqs = run_generation(self.model, requests, decode=decode, block_size=self.block_size, tokenizer=tokenizer)
        if streamer is not None:
            streamer.end()
        out = self._pad_outputs(_ids_as_numpy(input_ids), [s.output_ids for s in seqs])  # [B, S + new] int64
        return self._backend.from_numpy(out, like=input_ids)

    # -- helpers
    def _requests(self, input_ids, attention_mask, pixel_values, pixel_attention_mask, params):
        ids = _ids_as_numpy(input_ids)
        keep = np.ones(ids.shape, dtype=bool) if attention_mask is None else _ids_as_numpy(attention_mask).astype(bool)
        if keep.shape != ids.shape:
            raise InputError(f"attention_mask {keep.shape} does not match input_ids {ids.shape}")
        vocab = self.config.text.vocab_size
        if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
            raise InputError(f"input_ids must be non-empty and in [0, {vocab}), got shape {ids.shape}"
                             + (f" and values in [{ids.min()}, {ids.max()}]" if ids.size else ""))
        features = [None] * ids.shape[0]
        if pixel_values is not None:
            if not self.config.is_vlm:
                raise InputError("this is a text-only model; it cannot take images (use a SmolVLM checkpoint)")
            pixel_values = self._backend.model_input(pixel_values, np.float32)
            if pixel_attention_mask is not None:
                pixel_attention_mask = self._backend.model_input(pixel_attention_mask, bool)
            features = self.model.image_features_per_row(pixel_values, pixel_attention_mask)
        requests = [Request(row[m].tolist(), params, f) for row, m, f in zip(ids, keep, features)]
        return requests, keep

    def _sampling_params(self, kw) -> SamplingParams:
        unknown = set(kw) - GENERATE_KWARGS
        if unknown:
            raise InputError(f"generate() does not support {', '.join(sorted(unknown))}")
        g = {**self.generation_config, **{k: v for k, v in kw.items() if v is not None}}
        if g.get("num_beams", 1) != 1:
            raise InputError("beam search is not supported (num_beams must be 1)")
        eos = g.get("eos_token_id", self.config.eos_token_ids)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,) if eos is not None else ()
        stops = g.get("stop_strings") or ()
        return SamplingParams(
            max_new_tokens=int(g.get("max_new_tokens", 256)), do_sample=bool(g.get("do_sample", False)),
            temperature=float(g.get("temperature", 1.0)), top_k=int(g.get("top_k", 50)),
            top_p=float(g.get("top_p", 1.0)), repetition_penalty=float(g.get("repetition_penalty", 1.0)),
            stop_token_ids=eos, stop_strings=(stops,) if isinstance(stops, str) else tuple(stops), seed=g.get("seed"),
            json_schema=g.get("json_schema"), response_format=g.get("response_format"))

    def _pad_outputs(self, ids: np.ndarray, outputs: list[list[int]]) -> np.ndarray:
        pad = self.generation_config.get("pad_token_id")
        pad = (pad[0] if isinstance(pad, list) else pad) if pad is not None else (self.config.eos_token_ids or (0,))[0]
        new = np.full((len(outputs), max(len(o) for o in outputs)), pad, dtype=np.int64)
        for row, out in enumerate(outputs):
            new[row, :len(out)] = out
        return np.concatenate([ids.astype(np.int64), new], axis=1)


def model_precision(model) -> str:
    """A smolvlm_fast model's compute precision: the numpy model's precision, the torch model's dtype."""
    return getattr(model, "precision", None) or str(model.dtype).removeprefix("torch.")


def _with_backend(loaded, backend):
    model, generation, tokenizer = loaded
    return model, backend, generation, tokenizer


def _ids_as_numpy(x) -> np.ndarray:
    """input_ids / attention_mask (tensor, array or nested list) as a 2-D int64 array."""
    ids = as_numpy(x, np.int64)
    return ids[None] if ids.ndim == 1 else ids


def _gguf_generation_config(config: dict) -> dict:
    return {k: config[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if k in config}


def _read_generation_config(model_dir: Path) -> dict:
    """generation_config.json's defaults; SmolVLM's chat turns end with <end_of_utterance>, so it always stops too."""
    path = model_dir / "generation_config.json"
    raw = ModelConfig.read_json(path) if path.exists() else {}
    keep = ("eos_token_id", "pad_token_id", "bos_token_id", "do_sample", "temperature", "top_k", "top_p",
            "repetition_penalty", "max_new_tokens")
    generation = {k: raw[k] for k in keep if raw.get(k) is not None}
    end_of_utterance = _added_token_id(model_dir, "<end_of_utterance>")
    if end_of_utterance is not None:
        eos = generation.get("eos_token_id", [])
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        generation["eos_token_id"] = eos + [end_of_utterance] * (end_of_utterance not in eos)
    return generation


def _added_token_id(model_dir: Path, token: str) -> int | None:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    added = ModelConfig.read_json(path).get("added_tokens") or []
    return next((int(t["id"]) for t in added if isinstance(t, dict) and t.get("content") == token), None)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path=None, *, gguf_file=None, **_ignored):
        from .inputs.tokenizer import Tokenizer

        location = checkpoint_location(pretrained_model_name_or_path, gguf_file)
        if location.suffix == ".gguf":
            from .formats.gguf import load_gguf_tokenizer
            return load_gguf_tokenizer(location)
        return Tokenizer.from_pretrained(location)


class AutoProcessor:
    """A SmolVLM Processor where the checkpoint has one; otherwise (text-only models) the tokenizer."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path=None, *, gguf_file=None, **kwargs):
        from .inputs.processor import Processor

        location = checkpoint_location(pretrained_model_name_or_path, gguf_file)
        if location.is_dir() and any((location / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
            return Processor.from_pretrained(location, **kwargs)
        return AutoTokenizer.from_pretrained(location)


AutoModelForVision2Seq = AutoModelForImageTextToText = AutoModelForCausalLM = SmolVLMForConditionalGeneration
