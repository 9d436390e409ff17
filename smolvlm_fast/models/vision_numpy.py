"""The SigLIP vision encoder and the connector in NumPy (the PyTorch-free path): patch embedding with bucketed
position ids, the encoder layers, pixel shuffle and the connector's projection. Free functions taking the
checkpoint's own parameter names.

precision="bfloat16" runs the encoder layers fused in C++ with bf16 products and attention (cpu/vision.py), and the
patch embedding's and the connector's products in bf16 too, where the extension has them; else (and by default,
precision="float32") everything is float32."""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig, VisionConfig
from ..cpu.linear import linear
from ..cpu.ops import dwsep_patch_embed, gelu_tanh, layer_norm, patch_embed, rope_attention
from ..cpu.vision import PackedVision, packed_vision, patch_embed_bf16, run_encoder
from ..errors import InputError

VISION = "model.vision_model."
PRECISIONS = ("float32", "bfloat16")


def bucketed_position_ids(patch_mask: np.ndarray, patches_per_side: int) -> np.ndarray:
    """patch_mask [N, h, w] bool -> [N, h*w] int64: fractional patch coordinates bucketed onto the learned grid
    (float32 as transformers computes them); padding patches get 0."""
    N, h, w = patch_mask.shape
    boundaries = np.arange(1 / patches_per_side, 1.0, 1 / patches_per_side).astype(np.float32)  # [n - 1]
    rows = patch_mask[:, :, 0].sum(1).astype(np.float32)  # [N] patches down the real image
    cols = patch_mask[:, 0, :].sum(1).astype(np.float32)  # [N] patches across it
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_h = np.arange(h, dtype=np.float32)[None] * (np.float32(1) / rows)[:, None]  # [N, h]
        frac_w = np.arange(w, dtype=np.float32)[None] * (np.float32(1) / cols)[:, None]  # [N, w]
    limit = np.float32(1.0 - 1e-6)
    bucket_h = np.searchsorted(boundaries, np.minimum(frac_h, limit), side="right")  # [N, h]
    bucket_w = np.searchsorted(boundaries, np.minimum(frac_w, limit), side="right")  # [N, w]
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(N, -1)  # [N, h*w]
    return np.where(patch_mask.reshape(N, -1), ids, 0)


def vision_embeddings(w: dict, cfg: VisionConfig, pixels: np.ndarray, patch_mask: np.ndarray,
                      packed: PackedVision | None = None) -> np.ndarray:
    """pixels [N, C, H, W], patch_mask [N, H/P, W/P] -> [N, (H/P)*(W/P), D]; the product in bf16 with packed."""
    p = VISION + "embeddings."
    position_ids = bucketed_position_ids(patch_mask, cfg.patches_per_side)  # [N, h*w]
    if packed is not None and packed.patch is not None:
        return patch_embed_bf16(pixels, cfg.patch_size, packed.patch, w[p + "position_embedding.weight"],
                                position_ids)  # [N, h*w, D]
    return patch_embed(pixels, w[p + "patch_embedding.weight"], w[p + "patch_embedding.bias"],
                       w[p + "position_embedding.weight"], position_ids)  # [N, h*w, D]


def vision_layer(w: dict, p: str, cfg: VisionConfig, x: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
    """One pre-LN SigLIP layer: x [B, N, D] -> [B, N, D]."""
    B, N, D = x.shape
    H, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    h = layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps).reshape(B * N, D)  # [B*N, D]
    q, k, v = (linear(h, w[p + f"self_attn.{n}.weight"], w[p + f"self_attn.{n}.bias"]).reshape(B, N, H, D // H)
               for n in ("q_proj", "k_proj", "v_proj"))  # 3 x [B, N, H, Dh]
    attn = rope_attention(q, k, v, causal=False, key_mask=key_mask).reshape(B * N, D)  # [B*N, D]
    x = x + linear(attn, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"]).reshape(B, N, D)
    h = layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps).reshape(B * N, D)  # [B*N, D]
    h = linear(h, w[p + "mlp.fc1.weight"])  # [B*N, I]
    h = gelu_tanh(h, bias=w[p + "mlp.fc1.bias"], out=h)  # the bias added inside, in place: no second [B*N, I]
    x += linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"]).reshape(B, N, D)  # [B, N, D]
    return x


def stem_embeddings(w: dict, cfg: VisionConfig, pixels: np.ndarray) -> np.ndarray:
    """The factorized variant's fixed-size embeddings: pixels [N, C, S, S] -> [N, (S/P)^2, D], by its patch stem
    (conv, grouped conv or depthwise-separable), + the position embedding in row-major patch order."""
    p = VISION + "embeddings."
    pos = w[p + "position_embedding.weight"]  # [(S/P)^2, D]
    if cfg.patch_stem == "dwsep":
        q = p + "patch_embedding."
        return dwsep_patch_embed(pixels, w[q + "depthwise.weight"], w[q + "depthwise.bias"],
                                 w[q + "pointwise.weight"], w[q + "pointwise.bias"], pos, None)  # [N, (S/P)^2, D]
    groups = cfg.groups if cfg.patch_stem == "grouped" else 1
    return patch_embed(pixels, w[p + "patch_embedding.weight"], w[p + "patch_embedding.bias"], pos, None,
                       groups=groups)  # [N, (S/P)^2, D]


def fused_vision(w: dict, cfg: VisionConfig, precision: str) -> PackedVision | None:
    """The bf16 weights (cached per weights dict) for precision="bfloat16"; None for float32, or where the
    extension lacks the fused encoder."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return packed_vision(w, cfg) if precision == "bfloat16" else None


def vision_encoder(w: dict, cfg: VisionConfig, pixels: np.ndarray, patch_mask: np.ndarray,
                   fixed_size: bool = False, precision: str = "float32") -> np.ndarray:
    """pixels [N, C, H, W] (any multiple of the patch size), patch_mask [N, H/P, W/P] bool -> [N, S, D].
    fixed_size (the factorized variant): image_size square pixels through its stem, every patch real.
    precision "bfloat16": the layers in one C++ call with bf16 products (when the extension has it)."""
    packed = fused_vision(w, cfg, precision)
    if fixed_size:
        x, key_mask = stem_embeddings(w, cfg, pixels), None  # [N, S, D]
    else:
        x = vision_embeddings(w, cfg, pixels, patch_mask, packed)  # [N, S, D]
        key_mask = None if patch_mask.all() else patch_mask.reshape(len(patch_mask), -1)  # [N, S]
    if packed is not None:
        return run_encoder(packed.encoder, x, key_mask)  # [N, S, D]
    for i in range(cfg.num_hidden_layers):
        x = vision_layer(w, f"{VISION}encoder.layers.{i}.", cfg, x, key_mask)  # [N, S, D]
    return layer_norm(x, w[VISION + "post_layernorm.weight"], w[VISION + "post_layernorm.bias"], cfg.layer_norm_eps)


def pixel_shuffle(x: np.ndarray, scale: int) -> np.ndarray:
    """[N, S, D] -> [N, S/scale^2, D*scale^2], grouping scale x scale neighbouring patches (transformers' order)."""
    N, S, D = x.shape
    side = int(S**0.5)
    x = x.reshape(N, side, side // scale, D * scale).transpose(0, 2, 1, 3)  # [N, side/s, side, D*s]
    x = x.reshape(N, side // scale, side // scale, D * scale * scale).transpose(0, 2, 1, 3)  # [N, side/s, side/s, D*s^2]
    return x.reshape(N, S // scale**2, D * scale**2)


def connector(w: dict, config: ModelConfig, hidden: np.ndarray, packed: PackedVision | None = None) -> np.ndarray:
    """Vision hidden states [N, S, Dv] -> image features [N * S/s^2, D_text]; the product in bf16 with packed."""
    x = pixel_shuffle(hidden, config.scale_factor)  # [N, S/s^2, Dv*s^2]
    if packed is not None and packed.connector is not None:
        return packed.connector(x.reshape(-1, x.shape[-1]))  # [N*S/s^2, D]
    return linear(x.reshape(-1, x.shape[-1]), w["model.connector.modality_projection.proj.weight"])  # [N*S/s^2, D]


def image_features_per_row(w: dict, config: ModelConfig, pixel_values, pixel_attention_mask=None,
                           precision: str = "float32") -> list[np.ndarray | None]:
    """pixel_values [B, n, C, H, W] (all-zero padding images allowed) -> per batch row, its image features
    [n_real * image_seq_len, D] or None, exactly as transformers' get_image_features selects and masks them.
    precision: "float32", or "bfloat16" (bf16 products where the extension has them; see the module's doc)."""
    packed = fused_vision(w, config.vision, precision)
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    if pixel_values.ndim != 5:
        raise InputError(f"pixel_values must be [batch, images, channels, height, width], got {pixel_values.shape}")
    B, n, C, H, W = pixel_values.shape
    P = config.vision.patch_size
    if C != config.vision.num_channels:
        raise InputError(f"pixel_values have {C} channels, the vision encoder takes {config.vision.num_channels}")
    config.check_image_size(H, W)  # the factorized variant: image_size x image_size only
    if H < P or W < P:
        raise InputError(f"pixel_values of {H}x{W} are smaller than one {P}x{P} patch")
    flat = pixel_values.reshape(B * n, C, H, W)  # [B*n, C, H, W]
    real = flat.reshape(B * n, -1).any(1)  # [B*n]: padding images are all zero
    if pixel_attention_mask is None:
        mask = np.ones((int(real.sum()), H, W), dtype=bool)
    else:
        mask = np.asarray(pixel_attention_mask).reshape(B * n, H, W)[real].astype(bool)  # [N, H, W]
    h, w_ = H // P, W // P
    patch_mask = mask[:, :h * P, :w_ * P].reshape(-1, h, P, w_, P).any(axis=(2, 4))  # [N, h, w]
    if not real.any():
        return [None] * B
    hidden = vision_encoder(w, config.vision, flat[real], patch_mask, fixed_size=config.is_xattn,
                            precision=precision)  # [N, S, Dv]
    features = connector(w, config, hidden, packed)  # [N*seq, D]
    per_row = real.reshape(B, n).sum(1) * config.image_seq_len  # [B]
    return [f if len(f) else None for f in np.split(features, np.cumsum(per_row)[:-1])]
