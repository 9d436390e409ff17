"""Model configuration: frozen dataclasses read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

VLM_MODEL_TYPES = ("idefics3", "smolvlm")
TEXT_MODEL_TYPES = ("llama",)


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


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "idefics3", "smolvlm" or "llama"
    text: TextConfig
    vision: VisionConfig | None = None
    scale_factor: int = 1
    image_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

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
        if model_type in TEXT_MODEL_TYPES:
            return cls(model_type=model_type, text=_text_config(raw, source, False, 1e-6),
                       eos_token_ids=_eos_ids(raw.get("eos_token_id")))
        supported = ", ".join(VLM_MODEL_TYPES + TEXT_MODEL_TYPES)
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


def _text_config(raw: dict, src: str, tie_default: bool, eps_default: float) -> TextConfig:
    hidden = int(_require(raw, "hidden_size", src, 4096))
    heads = int(_require(raw, "num_attention_heads", src, 32))
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{src}: hidden_act {act!r} is not supported (only silu)")
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
    )


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
    )


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 (or do_sample False) means greedy."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0              # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        from .errors import InputError
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens must be an integer >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"SamplingParams: {message} (got {self})")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0
