"""The transformers-shaped front door: AutoModelForVision2Seq & co. and the model object they return."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, SamplingParams
from .engine import Request, check_requests, generate as run_generation, new_cache, prefill
from .errors import CheckpointError, InputError
from .model_torch import SmolVLM, build_model, image_features_per_row
from .weights.hub import resolve_model
from .weights.safetensors import iter_safetensors

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]

    def __getitem__(self, key):
        return getattr(self, key)


def parse_dtype(dtype, checkpoint_dtype: str | None = None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(checkpoint_dtype or "", None)
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported (use one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def default_device_and_dtype(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def checkpoint_location(path, gguf_file=None) -> Path:
    """The local checkpoint directory, or the .gguf file to read."""
    root = resolve_model(path)
    if gguf_file is not None:
        root = (root if root.is_dir() else root.parent) / gguf_file
        if not root.exists():
            raise CheckpointError(f"{root}: GGUF file not found")
    return root


class SmolVLMForConditionalGeneration:
    """What `AutoModelForVision2Seq.from_pretrained` returns: transformers' calling conventions over our model."""

    def __init__(self, model: SmolVLM, generation_config: dict | None = None, tokenizer=None, block_size: int = 16):
        self.model, self.block_size, self.tokenizer = model, block_size, tokenizer
        self.generation_config = generation_config or {}

    # -- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, device=None, dtype=None, torch_dtype=None,
                        backend: str = "torch", gguf_file=None, block_size: int = 16, **_ignored):
        if backend != "torch":
            raise InputError(f"backend {backend!r} is not available yet (only 'torch')")
        location = checkpoint_location(pretrained_model_name_or_path, gguf_file)
        if location.suffix == ".gguf":
            return cls._from_gguf(location, device, dtype or torch_dtype, block_size)
        config_path = location / "config.json"
        config = ModelConfig.from_file(config_path)
        raw = json.loads(config_path.read_text())
        device, dtype = default_device_and_dtype(device, parse_dtype(dtype or torch_dtype, raw.get("torch_dtype", raw.get("dtype"))))
        model = build_model(config, iter_safetensors(location), str(location), device, dtype)
        return cls(model, _read_generation_config(location), block_size=block_size)

    @classmethod
    def _from_gguf(cls, path: Path, device, dtype, block_size):
        from .weights.gguf import load_gguf

        checkpoint = load_gguf(path)
        config = ModelConfig.from_dict(checkpoint.config, source=str(path))
        device, dtype = default_device_and_dtype(device, parse_dtype(dtype))
        model = build_model(config, checkpoint.tensors.items(), str(path), device, dtype)
        generation = {k: checkpoint.config[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id") if k in checkpoint.config}
        return cls(model, generation, tokenizer=checkpoint.tokenizer, block_size=block_size)

    # -- transformers conventions
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def eval(self):
        return self

    def to(self, device=None, dtype=None):
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.model.to(device=device, dtype=dtype)
        self.model.text.cos_sin = torch.empty(0, device=self.model.device)
        return self

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, **_ignored):
        return self.forward(input_ids, attention_mask, pixel_values, pixel_attention_mask)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None) -> ModelOutput:
        """Logits for every position of a (padded) batch; padding positions get zeros."""
        requests, keep = self._requests(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                        SamplingParams(max_new_tokens=0))
        check_requests(self.model, requests)
        cache, kv = new_cache(self.model, [len(r.prompt_ids) for r in requests], self.block_size)
        hidden, _ = prefill(self.model, cache, kv, requests, list(range(len(requests))))
        logits = torch.zeros(*keep.shape, self.config.text.vocab_size, dtype=hidden.dtype, device=hidden.device)
        logits[keep] = self.model.compute_logits(hidden)
        return ModelOutput(logits=logits)

    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                 streamer=None, tokenizer=None, **generation_kwargs) -> torch.Tensor:
        """Prompt + new ids per row, as transformers returns them (finished rows padded with pad_token_id)."""
        params = self._sampling_params(generation_kwargs)
        requests, _ = self._requests(input_ids, attention_mask, pixel_values, pixel_attention_mask, params)
        if streamer is not None:
            if len(requests) != 1:
                raise InputError("streaming needs a batch of one prompt")
            streamer.put(input_ids.cpu())
            requests[0].on_token = lambda token: streamer.put(torch.tensor([token]))
        tokenizer = tokenizer or self.tokenizer
        decode = tokenizer.decode if tokenizer is not None else None
        if params.stop_strings and decode is None:
            raise InputError("stop_strings need the tokenizer: pass tokenizer=... to generate()")
        seqs = run_generation(self.model, requests, decode=decode, block_size=self.block_size)
        if streamer is not None:
            streamer.end()
        return self._pad_outputs(input_ids, [s.output_ids for s in seqs])

    # -- helpers
    def _requests(self, input_ids, attention_mask, pixel_values, pixel_attention_mask, params):
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if keep.shape != input_ids.shape:
            raise InputError(f"attention_mask {tuple(keep.shape)} does not match input_ids {tuple(input_ids.shape)}")
        vocab = self.config.text.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise InputError(f"input_ids must be in [0, {vocab}), got values in [{int(input_ids.min())}, {int(input_ids.max())}]")
        features = [None] * input_ids.shape[0]
        if pixel_values is not None:
            if not self.config.is_vlm:
                raise InputError("this is a text-only model; it cannot take images (use a SmolVLM checkpoint)")
            features = image_features_per_row(self.model, torch.as_tensor(pixel_values), pixel_attention_mask)
        requests = [Request(ids[m].tolist(), params, f) for ids, m, f in zip(input_ids, keep, features)]
        return requests, keep

    def _sampling_params(self, kw) -> SamplingParams:
        g = {**self.generation_config, **{k: v for k, v in kw.items() if v is not None}}
        unknown = set(kw) - {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                             "eos_token_id", "pad_token_id", "stop_strings", "seed", "max_length", "num_beams",
                             "use_cache", "generation_config", "return_dict_in_generate"}
        if unknown:
            raise InputError(f"generate() does not support {', '.join(sorted(unknown))}")
        if g.get("num_beams", 1) != 1:
            raise InputError("beam search is not supported (num_beams must be 1)")
        eos = g.get("eos_token_id", self.config.eos_token_ids)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,) if eos is not None else ()
        stops = g.get("stop_strings") or ()
        return SamplingParams(
            max_new_tokens=int(g.get("max_new_tokens", 256)), do_sample=bool(g.get("do_sample", False)),
            temperature=float(g.get("temperature", 1.0)), top_k=int(g.get("top_k", 50)),
            top_p=float(g.get("top_p", 1.0)), repetition_penalty=float(g.get("repetition_penalty", 1.0)),
            stop_token_ids=eos, stop_strings=(stops,) if isinstance(stops, str) else tuple(stops), seed=g.get("seed"))

    def _pad_outputs(self, input_ids, outputs: list[list[int]]) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        pad = self.generation_config.get("pad_token_id")
        pad = (pad[0] if isinstance(pad, list) else pad) if pad is not None else (self.config.eos_token_ids or (0,))[0]
        width = max(len(o) for o in outputs)
        new = torch.full((len(outputs), width), pad, dtype=input_ids.dtype)
        for row, out in enumerate(outputs):
            new[row, :len(out)] = torch.tensor(out, dtype=input_ids.dtype)
        return torch.cat([input_ids.cpu(), new], dim=1)


def _read_generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    keep = ("eos_token_id", "pad_token_id", "bos_token_id", "do_sample", "temperature", "top_k", "top_p",
            "repetition_penalty", "max_new_tokens")
    return {k: raw[k] for k in keep if raw.get(k) is not None}


class AutoTokenizer:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path=None, *, gguf_file=None, **_ignored):
        from .tokenizer import Tokenizer

        location = checkpoint_location(pretrained_model_name_or_path, gguf_file)
        if location.suffix == ".gguf":
            from .weights.gguf import load_gguf_tokenizer
            return load_gguf_tokenizer(location)
        return Tokenizer.from_pretrained(location)


class AutoProcessor:
    """A SmolVLM Processor where the checkpoint has one; otherwise (text-only models) the tokenizer."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path=None, *, gguf_file=None, **kwargs):
        from .processor import Processor

        location = checkpoint_location(pretrained_model_name_or_path, gguf_file)
        if location.is_dir() and any((location / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
            return Processor.from_pretrained(location, **kwargs)
        return AutoTokenizer.from_pretrained(location)


AutoModelForVision2Seq = AutoModelForImageTextToText = AutoModelForCausalLM = SmolVLMForConditionalGeneration
