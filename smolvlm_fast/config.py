"""Model configuration: frozen dataclasses read from a Hugging Face config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

VLM_MODEL_TYPES = ("idefics3", "smolvlm")
TEXT_MODEL_TYPES = ("llama",)
XATTN_MODEL_TYPE = "smolvlm_fast_xattn"  # the factorized variant (docs/xattn.md)
PATCH_STEMS = ("conv", "grouped", "dwsep")
TEXT_ARCHITECTURES = ("llama", "phi")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    patch_stem: str = "conv"  # "conv", "grouped" (groups) or "dwsep" (depthwise P x P, then pointwise C -> D)
    groups: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    architecture: str = "llama"  # or "phi": parallel attention + MLP under one LayerNorm, biased projections
    partial_rotary_factor: float = 1.0
    layer_norm_eps: float = 1e-5  # the Phi blocks' LayerNorms

    @property
    def rotary_dim(self) -> int:
        """The leading features of each q/k head that RoPE turns (all of them for Llama)."""
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "idefics3", "smolvlm" or "llama"
    text: TextConfig
    vision: VisionConfig | None = None
    scale_factor: int = 1
    image_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    cross_attention_layers: tuple[int, ...] = ()  # decoder layers followed by a gated cross-attention layer

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    @property
    def text_prefix(self) -> str:
        """The checkpoint's name prefix of the decoder's tensors (a VLM nests its text model)."""
        return "model.text_model." if self.is_vlm else "model."

    @property
    def is_xattn(self) -> bool:
        """Images reach the text through cross-attention layers instead of spliced <image> tokens."""
        return self.model_type == XATTN_MODEL_TYPE

    def check_image_size(self, height: int, width: int) -> None:
        """The factorized variant's encoder takes image_size square images only (its processor resizes to that)."""
        size = self.vision.image_size
        if self.is_xattn and (height, width) != (size, size):
            from .errors import InputError
            raise InputError(f"this model's vision encoder takes {size}x{size} images, got {height}x{width} "
                             "(its processor resizes images to that size)")

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile: (image_size / patch)^2 / scale_factor^2."""
        assert self.vision is not None
        return self.vision.patches_per_side**2 // self.scale_factor**2

    @staticmethod
    def read_json(path: str | Path) -> dict:
        """A JSON object from a checkpoint file, or a CheckpointError naming the file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return raw

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(cls.read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        model_type = raw.get("model_type")
        if model_type in VLM_MODEL_TYPES:
            text_raw = raw.get("text_config") or {}
            vision_raw = raw.get("vision_config") or {}
            text = _text_config(text_raw, f"{source} (text_config)", raw.get("tie_word_embeddings", False), 1e-5)
            vision = _vision_config(vision_raw, source)
            return cls(
                model_type=model_type, text=text, vision=vision,
                scale_factor=int(raw.get("scale_factor", 2)),
                image_token_id=int(raw.get("image_token_id", 128257)),
                eos_token_ids=_eos_ids(text_raw.get("eos_token_id", raw.get("eos_token_id"))),
            )
        if model_type == XATTN_MODEL_TYPE:
            return _xattn_config(raw, source)
        if model_type in TEXT_MODEL_TYPES:
            return cls(model_type=model_type, text=_text_config(raw, source, False, 1e-6),
                       eos_token_ids=_eos_ids(raw.get("eos_token_id")))
        supported = ", ".join(VLM_MODEL_TYPES + TEXT_MODEL_TYPES + (XATTN_MODEL_TYPE,))
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r} (supported: {supported})")


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _require(raw: dict, key: str, source: str, default=None):
    if key in raw and raw[key] is not None:
        return raw[key]
    if default is not None:
        return default
    raise CheckpointError(f"{source}: missing field {key!r}")


def _rope_theta(raw: dict) -> float:
    """transformers 5 writes rope_parameters; older config.json files write rope_theta / rope_scaling."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", None):
        raise CheckpointError(f"config: rope type {rope_type!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _text_config(raw: dict, src: str, tie_default: bool, eps_default: float, **extra) -> TextConfig:
    hidden = int(_require(raw, "hidden_size", src, 4096))
    heads = int(_require(raw, "num_attention_heads", src, 32))
    phi = extra.get("architecture") == "phi"
    act = raw.get("hidden_act", "gelu_new" if phi else "silu")
    allowed = ("gelu_new", "gelu_pytorch_tanh") if phi else ("silu",)  # Phi's gelu_new is the tanh approximation
    if act not in allowed:
        raise CheckpointError(f"{src}: hidden_act {act!r} is not supported (only {' or '.join(allowed)})")
    return TextConfig(
        vocab_size=int(_require(raw, "vocab_size", src, 32000)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", src, 11008)),
        num_hidden_layers=int(_require(raw, "num_hidden_layers", src, 32)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", eps_default)),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", tie_default)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        hidden_act=act,
        **extra,
    )


def _xattn_config(raw: dict, source: str) -> ModelConfig:
    """The factorized variant's config.json (docs/xattn.md), every field checked."""
    text_raw, vision_raw = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise CheckpointError(f"{source}: {XATTN_MODEL_TYPE} needs text_config and vision_config objects")
    _check_positive_ints(text_raw, source, "text_config", ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"))
    _check_positive_ints(vision_raw, source, "vision_config", ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "image_size", "patch_size", "num_channels", "groups"))
    arch = text_raw.get("architecture", "llama")
    if arch not in TEXT_ARCHITECTURES:
        raise CheckpointError(f"{source}: text_config.architecture {arch!r} is not one of {TEXT_ARCHITECTURES}")
    text = _text_config(text_raw, f"{source} (text_config)", raw.get("tie_word_embeddings", False), 1e-5,
                        architecture=arch,
                        partial_rotary_factor=_finite(text_raw, "partial_rotary_factor", 1.0, source),
                        layer_norm_eps=_finite(text_raw, "layer_norm_eps", 1e-5, source))
    if not 0 < text.rotary_dim <= text.head_dim or text.rotary_dim % 2:
        raise CheckpointError(f"{source}: partial_rotary_factor {text.partial_rotary_factor} gives rotary_dim "
                              f"{text.rotary_dim}; it must be even and in (0, head_dim={text.head_dim}]")
    if text.num_attention_heads % text.num_key_value_heads:
        raise CheckpointError(f"{source}: text_config.num_key_value_heads {text.num_key_value_heads} must divide "
                              f"num_attention_heads {text.num_attention_heads}")
    vision = _vision_config(vision_raw, source)
    _check_stem(vision, source)
    scale = raw.get("scale_factor", 1)
    if type(scale) is not int or scale < 1 or vision.patches_per_side % scale:
        raise CheckpointError(f"{source}: scale_factor must be a positive integer dividing the "
                              f"{vision.patches_per_side} patches a side, got {scale!r}")
    image_token_id = _require(raw, "image_token_id", source)
    if type(image_token_id) is not int or not 0 <= image_token_id < text.vocab_size:
        raise CheckpointError(f"{source}: image_token_id must be a token id in [0, {text.vocab_size}), "
                              f"got {image_token_id!r}")
    layers = _require(raw, "cross_attention_layers", source)  # required: [] (images have no effect) must be said
    if (not isinstance(layers, list) or not all(type(i) is int for i in layers)
            or layers != sorted(set(layers)) or any(not 0 <= i < text.num_hidden_layers for i in layers)):
        raise CheckpointError(f"{source}: cross_attention_layers must be ascending distinct decoder layer indices "
                              f"in [0, {text.num_hidden_layers}), got {layers!r}")
    return ModelConfig(model_type=XATTN_MODEL_TYPE, text=text, vision=vision, scale_factor=scale,
                       image_token_id=image_token_id,
                       eos_token_ids=_eos_ids(raw.get("eos_token_id", text_raw.get("eos_token_id"))),
                       cross_attention_layers=tuple(layers))


def _check_positive_ints(raw: dict, source: str, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in raw and (type(raw[key]) is not int or raw[key] < 1):
            raise CheckpointError(f"{source}: {where}.{key} must be a positive integer, got {raw[key]!r}")


def _finite(raw: dict, key: str, default: float, source: str) -> float:
    value = raw.get(key, default)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {key} must be a finite number, got {value!r}")
    return float(value)


def _check_stem(v: VisionConfig, source: str) -> None:
    if v.patch_stem not in PATCH_STEMS:
        raise CheckpointError(f"{source}: vision_config.patch_stem {v.patch_stem!r} is not one of {PATCH_STEMS}")
    if v.hidden_act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"{source}: vision_config.hidden_act {v.hidden_act!r} is not supported "
                              "(only gelu_pytorch_tanh)")
    groups = v.groups if v.patch_stem == "grouped" else 1
    if v.num_channels % groups or v.hidden_size % groups:
        raise CheckpointError(f"{source}: vision_config.groups {v.groups} must divide num_channels "
                              f"{v.num_channels} and hidden_size {v.hidden_size}")
    if v.image_size % v.patch_size:
        raise CheckpointError(f"{source}: vision_config.image_size {v.image_size} is not a multiple of "
                              f"patch_size {v.patch_size}")
    if v.hidden_size % v.num_attention_heads:
        raise CheckpointError(f"{source}: vision_config.num_attention_heads {v.num_attention_heads} must divide "
                              f"hidden_size {v.hidden_size}")


def _vision_config(raw: dict, source: str) -> VisionConfig:
    def as_int(key, default):
        value = raw.get(key, default)
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    return VisionConfig(
        hidden_size=as_int("hidden_size", 1152),
        intermediate_size=as_int("intermediate_size", 3072),
        num_hidden_layers=as_int("num_hidden_layers", 12),
        num_attention_heads=as_int("num_attention_heads", 16),
        image_size=as_int("image_size", 224),
        patch_size=as_int("patch_size", 32),
        num_channels=as_int("num_channels", 3),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-6)),
        hidden_act=raw.get("hidden_act", "gelu_pytorch_tanh"),
        patch_stem=raw.get("patch_stem", "conv"),
        groups=as_int("groups", 1),
    )


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 (below 1e-5, or do_sample False) means greedy."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0              # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    # structured output (engine/grammar.py): OpenAI's {"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}}}, or the JSON Schema itself as json_schema (a dict or JSON text)
    response_format: dict | None = None
    json_schema: dict | str | None = None

    def __post_init__(self):
        import math
        from numbers import Integral, Real

        from .errors import InputError

        def integer(x) -> bool:  # a bool is an int to Python, never a count here
            return isinstance(x, Integral) and not isinstance(x, bool)

        def number(x) -> bool:  # inf and NaN would turn the logits into NaN
            return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)

        checks = [
            (integer(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens must be an integer >= 0"),
            (number(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (integer(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (number(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be a finite number > 0"),
            (self.seed is None or integer(self.seed) and self.seed >= 0, "seed must be None or an integer >= 0"),
            (all(integer(t) for t in self.stop_token_ids), "stop_token_ids must be integers"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"SamplingParams: {message} (got {self})")
        self.schema  # noqa: B018  -- InputError now for a malformed response_format / json_schema

    @property
    def schema(self) -> str | None:
        """The JSON Schema (JSON text) the output must satisfy, or None for free text."""
        from .response_format import schema_text
        return schema_text(self.response_format, self.json_schema)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's cut-off) logits / temperature overflows float32 and sampling would draw from NaNs.
        return not self.do_sample or self.temperature < 1e-5
