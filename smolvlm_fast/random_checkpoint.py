"""init_random: a random-weight checkpoint of any model type we load, for tests and benchmarks (no model hub needed).

It writes what a trained checkpoint has: config.json, model.safetensors (every tensor of formats/layout.py), a
byte-level tokenizer whose vocabulary fills exactly `vocab_size` ids (so any generated id decodes), the chat template,
processor_config.json (images resized to the encoder's size, not split) and generation_config.json.
NumPy + tokenizers only: it runs without PyTorch.
"""
from __future__ import annotations

import itertools
import json
import math
import string
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, InputError
from .formats.layout import tensor_shapes

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>"]  # ids 256..259
# The released SmolVLM chat template: one <image> per image block of a message.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def init_random(config: dict, path: str | Path, seed: int = 0, *, std: float = 0.02, dtype: str = "float32") -> Path:
    """Write a random-weight checkpoint of `config` (a config.json dict) to the directory `path`; returns it.

    Linear weights and embeddings are N(0, std); norm weights 1 + N(0, std); biases N(0, std); cross-attention
    gates 1.0 (tanh(1) = 0.76: the images matter). image_token_id defaults to 260 and eos_token_id to 259
    (<end_of_utterance>) when the config leaves them out."""
    _check_arguments(config, seed, std, dtype)
    raw = _with_token_ids(dict(config))
    try:
        parsed = ModelConfig.from_dict(raw, source="init_random config")
    except CheckpointError as e:
        raise InputError(str(e)) from None
    vocab = parsed.text.vocab_size
    if vocab < 261:
        raise InputError(f"init_random: vocab_size must be at least 261 (bytes + special tokens), got {vocab}")
    tokenizer = _tokenizer(vocab, parsed.image_token_id if parsed.is_vlm else None)  # checked before writing
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    _write_weights(path / "model.safetensors", tensor_shapes(parsed), seed, std, np.dtype(dtype))
    _write_tokenizer(path, tokenizer, parsed.image_token_id if parsed.is_vlm else None)
    eos = list(parsed.eos_token_ids)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 258}))
    if parsed.is_vlm:
        _write_processor(path, parsed)
    return path


def _check_arguments(config, seed, std, dtype) -> None:
    if not isinstance(config, dict):
        raise InputError(f"init_random: config must be a config.json dict, got {type(config).__name__}")
    if type(seed) is not int or seed < 0:
        raise InputError(f"init_random: seed must be an integer >= 0, got {seed!r}")
    if type(std) not in (int, float) or not math.isfinite(std) or std <= 0:
        raise InputError(f"init_random: std must be a finite number > 0, got {std!r}")
    if dtype not in ("float32", "float16"):
        raise InputError(f"init_random: dtype must be 'float32' or 'float16', got {dtype!r}")


def _with_token_ids(raw: dict) -> dict:
    if raw.get("model_type") != "llama":
        raw.setdefault("image_token_id", 260)
    raw.setdefault("eos_token_id", 259)
    return raw


def _write_weights(file: Path, shapes: dict, seed: int, std: float, dtype: np.dtype) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("_gate"):
            value = np.ones(shape)
        elif "norm" in name and name.endswith(".weight"):
            value = 1 + std * rng.standard_normal(shape)
        else:
            value = std * rng.standard_normal(shape)
        tensors[name] = value.astype(dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _tokenizer(vocab_size: int, image_token_id: int | None):
    """A byte-level BPE without merges: ids 0-255 are the bytes, 256-259 the chat specials, <image> at its id, and
    every other id a multi-letter filler token (never produced by encoding, decodes to its letters)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    specials = {256 + i: tok for i, tok in enumerate(SPECIALS)}
    if image_token_id is not None:
        if image_token_id in specials or not 256 <= image_token_id < vocab_size:
            raise InputError(f"init_random: image_token_id must be in [260, vocab_size), got {image_token_id}")
        specials[image_token_id] = "<image>"
    fillers = ("".join(p) for n in itertools.count(2) for p in itertools.product(string.ascii_lowercase, repeat=n))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for i in range(256, vocab_size):
        vocab[specials[i] if i in specials else next(fillers)] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    return tok


def _write_tokenizer(path: Path, tok, image_token_id: int | None) -> None:
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 8192,
              "extra_special_tokens": {"image_token": "<image>"} if image_token_id is not None else {}}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode, inverted)."""
    code = ord(char)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def _write_processor(path: Path, config: ModelConfig) -> None:
    """Images resized to the encoder's input size and never split: one frame per image."""
    size = config.vision.image_size
    image = {"do_resize": True, "size": {"height": size, "width": size} if config.is_xattn else {"longest_edge": size},
             "max_image_size": {"longest_edge": size}, "do_image_splitting": False, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "resample": 1}
    processor = {"image_processor": image, "image_seq_len": config.image_seq_len,
                 "processor_class": "SmolVLMFastXAttnProcessor" if config.is_xattn else "Idefics3Processor"}
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2))
