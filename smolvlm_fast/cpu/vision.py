"""The SigLIP vision encoder in one C++ call with bf16 products and attention (csrc/cpu/vision_encoder.cpp, through
smolvlm_fast._cpu.VisionEncoder), built from the checkpoint's parameter names, and a bf16 linear for the products
around it (the patch embedding, the connector). The bf16 copies of the weights are made once per weights dict
(packed_vision) and kept while its arrays live: the model encodes images on every request.

Norms, softmax and every sum stay float32; the products' operands are rounded to bf16 (nearest even).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from ..config import VisionConfig
from ..formats.bf16 import Bf16Bits
from ..errors import InputError
from .native import _cpu  # None when the extension is not built: the NumPy code runs instead

VISION = "model.vision_model."
CONNECTOR = "model.connector.modality_projection.proj.weight"
PATCH = VISION + "embeddings.patch_embedding."
# VisionEncoder's layer keys -> the checkpoint's names under model.vision_model.encoder.layers.{i}.
LAYER_NAMES = {"ln1_weight": "layer_norm1.weight", "ln1_bias": "layer_norm1.bias",
               "out_weight": "self_attn.out_proj.weight", "out_bias": "self_attn.out_proj.bias",
               "ln2_weight": "layer_norm2.weight", "ln2_bias": "layer_norm2.bias",
               "fc1_weight": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias",
               "fc2_weight": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias"}
QKV = ("q_proj", "k_proj", "v_proj")


def available() -> bool:
    return getattr(_cpu, "VisionEncoder", None) is not None


def _f32(a) -> np.ndarray:
    """float32 and contiguous; a Bf16Bits (a loader's bits, cpu/weights.py) widened."""
    return a.float32() if isinstance(a, Bf16Bits) else np.ascontiguousarray(a, dtype=np.float32)


def layer_names(i: int) -> list[str]:
    """The checkpoint names encoder layer i reads."""
    p = f"{VISION}encoder.layers.{i}."
    return [p + n for n in LAYER_NAMES.values()] + [p + f"self_attn.{n}.{t}" for n in QKV for t in ("weight", "bias")]


def build_encoder(w: dict, cfg: VisionConfig):
    """A _cpu.VisionEncoder holding bf16 copies of the encoder layers' products (q/k/v stacked into one). The
    layers' float32 arrays are made one layer at a time (a generator), so a tower loaded as bf16 bits is never
    float32 all at once."""
    def layers():
        for i in range(cfg.num_hidden_layers):
            p = f"{VISION}encoder.layers.{i}."
            layer = {key: _f32(w[p + name]) for key, name in LAYER_NAMES.items()}
            layer["qkv_weight"] = np.concatenate([_f32(w[p + f"self_attn.{n}.weight"]) for n in QKV])  # [3D, D]
            layer["qkv_bias"] = np.concatenate([_f32(w[p + f"self_attn.{n}.bias"]) for n in QKV])  # [3D]
            yield layer
    return _cpu.VisionEncoder(layers(), _f32(w[VISION + "post_layernorm.weight"]),
                              _f32(w[VISION + "post_layernorm.bias"]), cfg.num_attention_heads, cfg.layer_norm_eps)


def run_encoder(encoder, x: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
    """x [N, S, D] (N tiles) -> [N, S, D] through every layer and the post LayerNorm. key_mask [N, S] bool (the
    real patches) or None; a tile needs at least one."""
    N, S, D = x.shape
    out = np.array(x, dtype=np.float32, order="C")  # [N, S, D], updated in place by the C++
    if key_mask is not None:
        key_mask = np.ascontiguousarray(key_mask, dtype=bool)
        if not key_mask.any(axis=1).all():
            raise InputError("an image tile has no real patch (its pixel_attention_mask is all zero)")
    encoder.run(out.reshape(N * S, D), N, S, key_mask)
    return out


class Bf16Linear:
    """y = x @ W.T (+ bias) with W [N, K] rounded to bf16 and packed once; x is rounded as it is read, the sums
    are float32."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        weight = _f32(weight)
        self.n, self.k = weight.shape
        self.packed = _cpu.bf16_pack(weight)
        self.bias = None if bias is None else _f32(bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [..., K] -> [..., N]."""
        x2 = _f32(x.reshape(-1, self.k))  # [M, K]
        out = np.empty((len(x2), self.n), dtype=np.float32)
        _cpu.bf16_gemm(x2, self.packed, self.n, self.k, self.bias, False, False, out)
        return out.reshape(*x.shape[:-1], self.n)


def patch_embed_bf16(pixels: np.ndarray, patch: int, proj: Bf16Linear, pos_embed: np.ndarray,
                     position_ids: np.ndarray) -> np.ndarray:
    """ops.patch_embed's stride-P conv (groups 1) with the product in bf16: pixels [B, C, H, W] -> [B, N, D]."""
    B, C, H, W = pixels.shape
    h, w = H // patch, W // patch
    patches = pixels[:, :, :h * patch, :w * patch].reshape(B, C, h, patch, w, patch).transpose(0, 2, 4, 1, 3, 5)
    out = proj(patches.reshape(B * h * w, C * patch * patch)).reshape(B, h * w, proj.n)  # [B, N, D], bias added
    out += pos_embed[position_ids]
    return out


@dataclass
class PackedVision:
    encoder: object                # _cpu.VisionEncoder
    patch: Bf16Linear | None       # the conv stem's product (None: another stem, which stays float32)
    connector: Bf16Linear | None   # None: a quantized connector weight, which stays on `linear`


_PACKED: dict[int, tuple[weakref.ref, PackedVision]] = {}  # id(anchor array) -> (a weak reference to it, packed)


def packed_vision(w: dict, cfg: VisionConfig) -> PackedVision | None:
    """The bf16 copies for this weights dict, made on its first call and kept while its arrays live; None where the
    extension lacks the encoder or a vision weight is not a float array (a quantized checkpoint). The cache is keyed
    on one of the dict's arrays (the post-LayerNorm weight), checked by a weak reference: shallow copies of a dict
    (a model made again over a model's weights) share one packing, even after pack_and_drop_floats; a new array at
    a dead one's id is packed afresh, and an entry goes with its array (weights are read at packing, not after)."""
    if not available():
        return None
    anchor = w[VISION + "post_layernorm.weight"]
    entry = _PACKED.get(id(anchor))
    if entry is not None and entry[0]() is anchor:
        return entry[1]
    names = [n for i in range(cfg.num_hidden_layers) for n in layer_names(i)]
    if not all(isinstance(w.get(n), (np.ndarray, Bf16Bits)) for n in names):
        return None
    conv = w.get(PATCH + "weight")
    patch = None
    if cfg.patch_stem == "conv" and isinstance(conv, (np.ndarray, Bf16Bits)):
        patch = Bf16Linear(_f32(conv).reshape(conv.shape[0], -1), w.get(PATCH + "bias"))  # [D, C*P*P]
    connector = Bf16Linear(w[CONNECTOR]) if isinstance(w.get(CONNECTOR), (np.ndarray, Bf16Bits)) else None
    packed = PackedVision(build_encoder(w, cfg), patch, connector)
    _PACKED[id(anchor)] = (weakref.ref(anchor), packed)
    weakref.finalize(anchor, _drop_dead, id(anchor))
    return packed


def packed_names(cfg: VisionConfig) -> list[str]:
    """The vision weights the bf16 packing copies (and pack_and_drop_floats lets go): the encoder layers'
    weights, the conv stem's kernel and the connector."""
    return [n for i in range(cfg.num_hidden_layers) for n in layer_names(i)] + [PATCH + "weight", CONNECTOR]


def pack_and_drop_floats(w: dict, cfg: VisionConfig) -> int:
    """For a model in precision "bfloat16" for good: pack w's vision weights now, then delete from w the float32
    arrays whose bf16 copies the packed encoder, stem and connector own (they copy what they keep), so that the
    vision tower is held once, in bf16. Returns the bytes let go (0 where nothing was packed). w then serves the
    bf16 path only: the float32 one reads those arrays."""
    packed = packed_vision(w, cfg)
    if packed is None:
        return 0
    names = [n for n in packed_names(cfg) if n != PATCH + "weight" or packed.patch is not None]
    names = [n for n in names if n != CONNECTOR or packed.connector is not None]
    freed = sum(w[n].nbytes for n in names if n in w)
    for n in names:
        w.pop(n, None)
    return freed


def _drop_dead(key: int) -> None:
    """An anchor array died: forget its entry, unless a newer array at the same id has replaced it."""
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is None:
        del _PACKED[key]
