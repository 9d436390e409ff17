"""The PyTorch-free forward of SmolVLM (idefics3 / smolvlm), of its factorized variant (smolvlm_fast_xattn:
docs/xattn.md) and of text-only Llama models, in NumPy.

Free functions, one per layer, each taking the weights dict under the checkpoint's own (Hugging Face) names.
Every linear layer goes through `linear`, which takes float32 or quantized (int4 / q8) weights. The KV cache is
allocated outside and handed in; the step's attention metadata comes from cache.StepMetadata.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cpu_decoder
from .cache import StepMetadata, cross_spans
from .config import ModelConfig, TextConfig, VisionConfig
from .errors import CheckpointError, InputError, check_image_tokens
from .ops.numpy_ops import (cross_attention, dwsep_patch_embed, gelu_tanh, kv_cache_zeros, layer_norm,
                            paged_attention, paged_plan, patch_embed, rms_norm, rope_attention, rope_factors,
                            rope_table, rotate, silu_and_mul, write_kv_cache)
from .quant import Int4Weight, Q8Weight, dequantize, embedding_rows, from_gguf, linear, quantize_int4
from .weights.layout import check_complete, check_tensor, tensor_shapes


# ---------------------------------------------------------------- vision encoder (SigLIP, variable size)

VISION = "model.vision_model."


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


def vision_embeddings(w: dict, cfg: VisionConfig, pixels: np.ndarray, patch_mask: np.ndarray) -> np.ndarray:
    """pixels [N, C, H, W], patch_mask [N, H/P, W/P] -> [N, (H/P)*(W/P), D]."""
    p = VISION + "embeddings."
    position_ids = bucketed_position_ids(patch_mask, cfg.patches_per_side)  # [N, h*w]
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


def vision_encoder(w: dict, cfg: VisionConfig, pixels: np.ndarray, patch_mask: np.ndarray,
                   fixed_size: bool = False) -> np.ndarray:
    """pixels [N, C, H, W] (any multiple of the patch size), patch_mask [N, H/P, W/P] bool -> [N, S, D].
    fixed_size (the factorized variant): image_size square pixels through its stem, every patch real."""
    if fixed_size:
        x, key_mask = stem_embeddings(w, cfg, pixels), None  # [N, S, D]
    else:
        x = vision_embeddings(w, cfg, pixels, patch_mask)  # [N, S, D]
        key_mask = None if patch_mask.all() else patch_mask.reshape(len(patch_mask), -1)  # [N, S]
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


def connector(w: dict, config: ModelConfig, hidden: np.ndarray) -> np.ndarray:
    """Vision hidden states [N, S, Dv] -> image features [N * S/s^2, D_text]."""
    x = pixel_shuffle(hidden, config.scale_factor)  # [N, S/s^2, Dv*s^2]
    return linear(x.reshape(-1, x.shape[-1]), w["model.connector.modality_projection.proj.weight"])  # [N*S/s^2, D]


def image_features_per_row(w: dict, config: ModelConfig, pixel_values,
                           pixel_attention_mask=None) -> list[np.ndarray | None]:
    """pixel_values [B, n, C, H, W] (all-zero padding images allowed) -> per batch row, its image features
    [n_real * image_seq_len, D] or None, exactly as transformers' get_image_features selects and masks them."""
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
    hidden = vision_encoder(w, config.vision, flat[real], patch_mask, fixed_size=config.is_xattn)  # [N, S, Dv]
    features = connector(w, config, hidden)  # [N*seq, D]
    per_row = real.reshape(B, n).sum(1) * config.image_seq_len  # [B]
    return [f if len(f) else None for f in np.split(features, np.cumsum(per_row)[:-1])]


# ---------------------------------------------------------------- decoder (Llama or Phi blocks, gated cross-attention)


@dataclass
class Step:
    """One step's attention metadata as int32 arrays, the RoPE rows of its positions, and the attention plan
    (which cache slots and causal masks each sequence uses), all computed once and shared by every layer."""
    slot_mapping: np.ndarray     # [T]
    block_tables: np.ndarray     # [num_seqs, max_blocks]
    seq_lens: np.ndarray         # [num_seqs]
    query_start_loc: np.ndarray  # [num_seqs + 1]
    cos: np.ndarray              # [T, 1, 2, R/2] RoPE factors (ops.numpy_ops.rope_factors), R = rotary_dim
    sin: np.ndarray              # [T, 1, 2, R/2]
    plan: list                   # ops.numpy_ops.paged_plan

    @classmethod
    def from_metadata(cls, meta: StepMetadata, cos_sin: np.ndarray, block_size: int, heads: int) -> "Step":
        i32 = {name: np.array(getattr(meta, name), dtype=np.int32)
               for name in ("positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")}
        plan = paged_plan(i32["block_tables"], i32["seq_lens"], i32["query_start_loc"], block_size, heads)
        return cls(i32["slot_mapping"], i32["block_tables"], i32["seq_lens"], i32["query_start_loc"],
                   *rope_factors(cos_sin, i32["positions"]), plan)


def text_prefix(config: ModelConfig) -> str:
    return "model.text_model." if config.is_vlm else "model."


def embed(w: dict, config: ModelConfig, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
    """input_ids [T] -> [T, D]; image features [n, D], when given, replace the n <image> tokens in order.

    Decode steps pass none: an <image> token the model generates itself stays a token.
    """
    x = embedding_rows(w[text_prefix(config) + "embed_tokens.weight"], input_ids)  # [T, D]
    if image_features is None:
        return x
    if config.is_xattn:
        raise InputError("this model attends to images through cross-attention: pass cross_kv, not image_features")
    is_image = input_ids == config.image_token_id  # [T]
    check_image_tokens(int(is_image.sum()), len(image_features))
    x[is_image] = image_features
    return x


QKV, QKV_BIAS, GATE_UP = "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias", "mlp.gate_up_proj.weight"
MLP_ROWS = 256  # tokens per MLP pass


def decoder_layer(w: dict, p: str, t: TextConfig, x: np.ndarray, residual: np.ndarray | None, step: Step,
                  kv_cache: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One Llama layer over the packed tokens: (x, residual) [T, D] -> (x, residual); writes K/V into kv_cache."""
    T, Dh, eps = x.shape[0], t.head_dim, t.rms_norm_eps
    Hq, Hkv = t.num_attention_heads, t.num_key_value_heads
    if residual is None:
        x, residual = rms_norm(x, w[p + "input_layernorm.weight"], eps), x  # [T, D]
    else:
        x, residual = rms_norm(x, w[p + "input_layernorm.weight"], eps, residual)  # [T, D] x 2
    qkv = linear(x, w[p + QKV], w.get(p + QKV_BIAS)).reshape(T, Hq + 2 * Hkv, Dh)  # q_proj | k_proj | v_proj rows
    qk = rotate(qkv[:, :Hq + Hkv], step.cos, step.sin)  # RoPE on q and k: [T, Hq + Hkv, Dh]
    q, k, v = qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv:]  # [T, Hq, Dh], [T, Hkv, Dh] x 2
    write_kv_cache(k, v, *kv_cache, step.slot_mapping)
    attn = paged_attention(q, *kv_cache, step.block_tables, step.seq_lens, query_start_loc=step.query_start_loc,
                           plan=step.plan)  # [T, Hq, Dh]
    x = linear(attn.reshape(T, Hq * Dh), w[p + "self_attn.o_proj.weight"])  # [T, D]
    x, residual = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps, residual)  # [T, D] x 2
    return mlp(w, p, x), residual  # [T, D]


def mlp(w: dict, p: str, x: np.ndarray) -> np.ndarray:
    """SwiGLU x [T, D] -> [T, D], MLP_ROWS tokens at a time (a long prompt's [T, 2I] would be large)."""
    if len(x) > MLP_ROWS:
        return by_rows(lambda rows: mlp(w, p, rows), x)
    h = silu_and_mul(linear(x, w[p + GATE_UP]))  # gate_proj | up_proj rows: [T, 2I] -> [T, I]
    return linear(h, w[p + "mlp.down_proj.weight"])  # [T, D]


def by_rows(f, x: np.ndarray) -> np.ndarray:
    """f(x) [T, D] -> [T, D] computed MLP_ROWS rows at a time."""
    out = np.empty_like(x)  # [T, D]
    for i in range(0, len(x), MLP_ROWS):
        out[i:i + MLP_ROWS] = f(x[i:i + MLP_ROWS])
    return out


def phi_layer(w: dict, p: str, t: TextConfig, x: np.ndarray, step: Step,
              kv_cache: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One Phi-2 parallel block over the packed tokens: x [T, D] -> x + dense(attn(LN(x))) + fc2(gelu(fc1(LN(x))));
    writes K/V into kv_cache."""
    T, Dh = x.shape[0], t.head_dim
    Hq, Hkv = t.num_attention_heads, t.num_key_value_heads
    h = layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], t.layer_norm_eps)  # [T, D]
    qkv = linear(h, w[p + QKV], w[p + QKV_BIAS]).reshape(T, Hq + 2 * Hkv, Dh)  # q_proj | k_proj | v_proj rows
    qk = rotate(qkv[:, :Hq + Hkv], step.cos, step.sin)  # partial RoPE on q and k: [T, Hq + Hkv, Dh]
    q, k, v = qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv:]  # [T, Hq, Dh], [T, Hkv, Dh] x 2
    write_kv_cache(k, v, *kv_cache, step.slot_mapping)
    attn = paged_attention(q, *kv_cache, step.block_tables, step.seq_lens, query_start_loc=step.query_start_loc,
                           plan=step.plan)  # [T, Hq, Dh]
    out = linear(attn.reshape(T, Hq * Dh), w[p + "self_attn.dense.weight"], w[p + "self_attn.dense.bias"])  # [T, D]
    out += x
    out += by_rows(lambda rows: phi_mlp(w, p, rows), h) if T > MLP_ROWS else phi_mlp(w, p, h)  # [T, D]
    return out


def phi_mlp(w: dict, p: str, h: np.ndarray) -> np.ndarray:
    """fc2(gelu_tanh(fc1(h))): [T, D] -> [T, I] -> [T, D]."""
    h = gelu_tanh(linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))  # [T, I]
    return linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])  # [T, D]


@dataclass
class CrossSpan:
    """The packed rows a..b-1 of one sequence with images, and its image K/V for one cross layer."""
    a: int
    b: int
    k: np.ndarray  # [n_img, Hkv, Dh], k_norm applied
    v: np.ndarray  # [n_img, Hkv, Dh]


def layer_spans(meta: StepMetadata, cross_kv: list | None, n_layers: int) -> list[list[CrossSpan]]:
    """Per cross layer, the spans of the step's sequences that have images (cache.cross_spans: cross_kv holds one
    entry per sequence, None for a text-only one)."""
    if cross_kv is not None and len(cross_kv) != len(meta.seq_lens):
        raise InputError(f"cross_kv has {len(cross_kv)} entries for a step of {len(meta.seq_lens)} sequences")
    spans = cross_spans(meta, cross_kv) or []
    for _, _, kv in spans:
        if len(kv) != n_layers:
            raise InputError(f"a cross_kv entry has {len(kv)} layers, the model has {n_layers} cross layers")
    return [[CrossSpan(a, a + n, *kv[j]) for a, n, kv in spans if n] for j in range(n_layers)]


def cross_layer(w: dict, p: str, t: TextConfig, x: np.ndarray, spans: list[CrossSpan]) -> np.ndarray:
    """One gated cross-attention layer (Mllama's), in place on the rows of x [T, D] whose sequence has images:
    x += tanh(attn_gate) o_proj(attn(q_norm(q_proj(RMSNorm(x))), image K/V)); x += tanh(mlp_gate) mlp(RMSNorm(x))."""
    if not spans:
        return x  # no sequence of this step has images: the layer is the identity
    Hq, Dh, eps = t.num_attention_heads, t.head_dim, t.rms_norm_eps
    rows = np.concatenate([np.arange(s.a, s.b) for s in spans])  # [R]
    h = x[rows]  # [R, D] (a copy)
    q = linear(rms_norm(h, w[p + "input_layernorm.weight"], eps), w[p + "cross_attn.q_proj.weight"])  # [R, Hq*Dh]
    q = rms_norm(q.reshape(len(rows), Hq, Dh), w[p + "cross_attn.q_norm.weight"], eps)  # [R, Hq, Dh]
    attn = np.empty_like(q)  # [R, Hq, Dh]
    r = 0
    for s in spans:  # every token of a sequence sees all of its image tokens
        n = s.b - s.a
        attn[r:r + n] = cross_attention(q[None, r:r + n], s.k[None], s.v[None])[0]  # [n, Hq, Dh]
        r += n
    out = linear(attn.reshape(len(rows), Hq * Dh), w[p + "cross_attn.o_proj.weight"])  # [R, D]
    h += np.tanh(w[p + "cross_attn_attn_gate"][0]) * out
    hn = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)  # [R, D]
    h += np.tanh(w[p + "cross_attn_mlp_gate"][0]) * mlp(w, p, hn)  # [R, D]
    x[rows] = h
    return x


def image_kv(w: dict, p: str, t: TextConfig, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A request's image states [n, D] -> one cross layer's (k after k_norm, v), each [n, Hkv, Dh] float32."""
    n, Hkv, Dh = len(features), t.num_key_value_heads, t.head_dim
    k = linear(features, w[p + "cross_attn.k_proj.weight"]).reshape(n, Hkv, Dh)  # [n, Hkv, Dh]
    v = linear(features, w[p + "cross_attn.v_proj.weight"]).reshape(n, Hkv, Dh)  # [n, Hkv, Dh]
    return rms_norm(k, w[p + "cross_attn.k_norm.weight"], t.rms_norm_eps), v


def decoder(w: dict, config: ModelConfig, x: np.ndarray, step: Step, kv_caches: list,
            spans: list[list[CrossSpan]] | None = None) -> np.ndarray:
    """Embeddings [T, D] -> final hidden states [T, D]. spans (layer_spans): per cross layer, its sequences'
    rows and image K/V; the cross layer after decoder layer i runs on the whole hidden state x + residual."""
    t, prefix = config.text, text_prefix(config)
    cross_after = {i: j for j, i in enumerate(config.cross_attention_layers)}
    residual = None  # Llama: the stream is x + residual; Phi keeps it in x alone
    for i, kv_cache in enumerate(kv_caches):
        p = f"{prefix}layers.{i}."
        if t.architecture == "phi":
            x = phi_layer(w, p, t, x, step, kv_cache)  # [T, D]
        else:
            x, residual = decoder_layer(w, p, t, x, residual, step, kv_cache)  # [T, D] x 2
        j = cross_after.get(i)
        if j is not None and spans and spans[j]:
            if residual is not None:
                x, residual = x + residual, None  # [T, D]
            x = cross_layer(w, f"{prefix}cross_layers.{j}.", t, x, spans[j])  # [T, D]
    if t.architecture == "phi":
        return layer_norm(x, w[prefix + "final_layernorm.weight"], w[prefix + "final_layernorm.bias"],
                          t.layer_norm_eps)  # [T, D]
    if residual is None:
        return rms_norm(x, w[prefix + "norm.weight"], t.rms_norm_eps)  # [T, D]
    return rms_norm(x, w[prefix + "norm.weight"], t.rms_norm_eps, residual)[0]  # [T, D]


def logits(w: dict, config: ModelConfig, hidden: np.ndarray) -> np.ndarray:
    """hidden [n, D] -> [n, V] float32: lm_head, or the tied input embedding (+ Phi's lm_head bias)."""
    head = w[text_prefix(config) + "embed_tokens.weight"] if config.text.tie_word_embeddings else w["lm_head.weight"]
    return linear(hidden, head, w.get("lm_head.bias"))  # [n, V]


# ---------------------------------------------------------------- the model the engine drives


class NumpyModel:
    """SmolVLM, its factorized variant or a text-only Llama over NumPy: weights by Hugging Face name, the forward
    in free functions."""

    def __init__(self, config: ModelConfig, weights: dict, fused: bool | None = None,
                 int8_activations: bool | None = None):
        """fused: run each step's decoder layers in C++ (cpu_decoder), one call per run of layers between
        cross-attention layers, which stay in NumPy; None means where the extension has it. The C++ step knows
        Llama blocks only: Phi blocks always take the free functions.
        int8_activations: in those steps, int4 products round x to int8 (cpu_decoder.int8_activations_default)."""
        self.config, self.weights = config, stack_projections(weights, config)
        self.cos_sin = np.empty((0, config.text.rotary_dim), dtype=np.float32)
        self.fused = (cpu_decoder.available() if fused is None else fused) and config.text.architecture == "llama"
        self.int8_activations = (cpu_decoder.int8_activations_default() if int8_activations is None
                                 else int8_activations)
        self._segments = None  # [(layers, _cpu.Decoder)] (cpu_decoder.build_segments), built on the first step

    @classmethod
    def from_checkpoint(cls, location: str | Path, quantize: str | None = None, **options) -> "NumpyModel":
        """A checkpoint dir (config.json + safetensors) or a .gguf file; quantize="int4" makes the decoder int4.
        options: fused, int8_activations (see __init__)."""
        location = Path(location)
        if location.suffix == ".gguf":
            config, weights = load_gguf_weights(location)
        else:
            config = ModelConfig.from_file(location / "config.json")
            weights = load_safetensors_weights(location, config)
        if quantize is not None:
            weights = quantize_weights(weights, config, quantize)
        return cls(config, weights, **options)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """One (k_cache, v_cache) pair of float32 [num_blocks, block_size, kv_heads, head_dim] per decoder layer."""
        t = self.config.text
        shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
        return [(kv_cache_zeros(shape), kv_cache_zeros(shape)) for _ in range(t.num_hidden_layers)]

    def image_features_per_row(self, pixel_values, pixel_attention_mask=None) -> list[np.ndarray | None]:
        if not self.config.is_vlm:
            raise InputError("this is a text-only model; it cannot take images (use a SmolVLM checkpoint)")
        return image_features_per_row(self.weights, self.config, pixel_values, pixel_attention_mask)

    def cross_kv(self, image_features: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """A request's image features [n, D] -> per cross-attention layer its (k after k_norm, v), each
        [n, Hkv, Dh] float32: computed once per request and handed to every forward step."""
        if not self.config.is_xattn:
            raise InputError("this model has no cross-attention layers (its images splice into the prompt)")
        features = np.asarray(image_features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.config.text.hidden_size:
            raise InputError(f"image features must be [n, {self.config.text.hidden_size}], got {features.shape}")
        prefix = text_prefix(self.config) + "cross_layers."
        return [image_kv(self.weights, f"{prefix}{j}.", self.config.text, features)
                for j in range(len(self.config.cross_attention_layers))]

    def forward(self, input_ids: np.ndarray, meta: StepMetadata, kv_caches: list,
                image_features: np.ndarray | None = None, cross_kv: list | None = None) -> np.ndarray:
        """Packed input_ids [T] -> hidden states [T, D]; writes the new tokens' K/V into kv_caches.
        cross_kv (the factorized variant): per sequence of the step, None (no images) or its self.cross_kv(...)."""
        t = self.config.text
        x = embed(self.weights, self.config, np.asarray(input_ids), image_features)  # [T, D]
        if cross_kv is not None and any(kv is not None for kv in cross_kv) and not self.config.is_xattn:
            raise InputError("cross_kv is for models with cross-attention layers (model_type smolvlm_fast_xattn)")
        spans = layer_spans(meta, cross_kv, len(self.config.cross_attention_layers))
        if self.fused:
            return self.fused_decoder(x, meta, kv_caches, spans)  # [T, D]
        step = Step.from_metadata(meta, self.rope(max(meta.seq_lens)), kv_caches[0][0].shape[1], t.num_attention_heads)
        return decoder(self.weights, self.config, x, step, kv_caches, spans)  # [T, D]

    def fused_decoder(self, x: np.ndarray, meta: StepMetadata, kv_caches: list,
                      spans: list[list[CrossSpan]]) -> np.ndarray:
        """As decoder(), with each run of Llama layers between cross layers in one C++ call: embeddings [T, D] ->
        final hidden states [T, D]. Segment j leaves the whole hidden state for cross layer j."""
        prefix, cos_sin, arrays = text_prefix(self.config), self.rope(max(meta.seq_lens)), cpu_decoder.step_arrays(meta)
        if self._segments is None:
            self._segments = cpu_decoder.build_segments(self.weights, self.config, prefix, self.int8_activations)
        for j, (layers, segment) in enumerate(self._segments):
            x = cpu_decoder.step(segment, x, arrays, kv_caches[layers.start:layers.stop], cos_sin)  # [T, D]
            if j < len(spans):
                x = cross_layer(self.weights, f"{prefix}cross_layers.{j}.", self.config.text, x, spans[j])  # [T, D]
        if len(self._segments) == len(spans):  # a cross layer after the last decoder layer: the final norm here
            x = rms_norm(x, self.weights[prefix + "norm.weight"], self.config.text.rms_norm_eps)  # [T, D]
        return x

    def compute_logits(self, hidden: np.ndarray) -> np.ndarray:
        return logits(self.weights, self.config, hidden)  # [n, V]

    def rope(self, max_position: int) -> np.ndarray:
        """The [positions, rotary_dim] cos/sin table, grown on demand."""
        if len(self.cos_sin) < max_position:
            t = self.config.text
            size = max(min(max(max_position, 2 * len(self.cos_sin)), t.max_position_embeddings), max_position)
            self.cos_sin = rope_table(t.rotary_dim, size, t.rope_theta)
        return self.cos_sin


# ---------------------------------------------------------------- loading


def load_safetensors_weights(model_dir: Path, config: ModelConfig) -> dict:
    """The checkpoint's tensors as float32 (float32 ones stay views of the memory-mapped file)."""
    from .weights.safetensors_numpy import load_checkpoint_numpy

    expected = tensor_shapes(config)
    weights = {}
    for name, array in load_checkpoint_numpy(model_dir).items():
        if name not in expected:
            continue  # e.g. rotary inv_freq buffers or a tied lm_head copy
        check_tensor(name, array.shape, expected, str(model_dir))
        if array.dtype.kind != "f":
            raise CheckpointError(f"{model_dir}: tensor {name} has dtype {array.dtype}, expected a float type")
        weights[name] = array.astype(np.float32, copy=False)
    check_complete(set(weights), expected, str(model_dir))
    return weights


def load_gguf_weights(path: Path) -> tuple[ModelConfig, dict]:
    """A GGUF file's config and weights under HF names: Q4_0/Q4_1 stay int4, Q8_0 stays q8, F32/F16 -> float32."""
    from .weights import gguf as g

    reader = g.open_gguf(path)
    raw_config = g.read_config(g.read_metadata(reader), reader, path)
    config = ModelConfig.from_dict(raw_config, source=str(path))
    expected = tensor_shapes(config)
    weights = {}
    for t in reader.tensors:
        name = g.hf_name(t.name)
        if name is None or name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} (not part of a llama model with this config)")
        check_tensor(name, g.hf_shape(t), expected, f"{path} ({t.name})")
        weights[name] = _gguf_weight(t, raw_config, path)
        _drop_pages(reader, t.data_offset, t.n_bytes)
    check_complete(set(weights), expected, str(path))
    return config, weights


def _drop_pages(reader, offset: int, size: int) -> None:
    """Let go of the file pages a converted tensor was read from, so loading never holds the file and its converted
    copy in resident memory at once (they stay in the page cache; reading them again just faults them back in)."""
    mapped = getattr(reader.data, "_mmap", None)  # np.memmap's mmap.mmap
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, offset + size - start)


def _gguf_weight(t, raw_config: dict, path: Path):
    from .weights import gguf as g

    if t.tensor_type in (g.Q.Q4_0, g.Q.Q4_1, g.Q.Q8_0):
        return from_gguf(*g.raw_rows(t, raw_config, path))  # stays 4-bit / 8-bit
    return g.load_tensor(t, raw_config, path).astype(np.float32, copy=False)


DECODER_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
PHI_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.dense.weight", "mlp.fc1.weight", "mlp.fc2.weight")
CROSS_LINEARS = ("cross_attn.q_proj.weight", "cross_attn.k_proj.weight", "cross_attn.v_proj.weight",
                 "cross_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def decoder_linears(config: ModelConfig) -> list[str]:
    """Every linear weight of the text decoder (its blocks and cross-attention layers) by name; not the lm_head."""
    prefix, t = text_prefix(config), config.text
    block = PHI_LINEARS if t.architecture == "phi" else DECODER_LINEARS
    names = [f"{prefix}layers.{i}.{suffix}" for i in range(t.num_hidden_layers) for suffix in block]
    return names + [f"{prefix}cross_layers.{j}.{suffix}" for j in range(len(config.cross_attention_layers))
                    for suffix in CROSS_LINEARS]


def quantize_weights(weights: dict, config: ModelConfig, method: str) -> dict:
    """quantize="int4": the decoder's float linear weights to int4 (group 64, or 32 where K % 64 != 0; a weight
    whose K is no multiple of 32 stays float)."""
    if method != "int4":
        raise InputError(f"quantize={method!r} is not supported (only 'int4')")
    out = dict(weights)
    for name in decoder_linears(config):
        w = weights[name]
        if isinstance(w, np.ndarray) and w.shape[1] % 32 == 0:
            out[name] = quantize_int4(w, group_size=64 if w.shape[1] % 64 == 0 else 32)
    return out


def stack_projections(weights: dict, config: ModelConfig) -> dict:
    """Add each decoder layer's q/k/v rows stacked as self_attn.qkv_proj (and its bias) and gate/up rows as
    mlp.gate_up_proj (Llama blocks and cross-attention layers): one product instead of three and two. The
    checkpoint's names stay, as views of the stack."""
    weights = dict(weights)
    prefix = text_prefix(config)
    gate_up = {GATE_UP: ["mlp.gate_proj.weight", "mlp.up_proj.weight"]}
    layers = [(f"{prefix}cross_layers.{j}.", dict(gate_up)) for j in range(len(config.cross_attention_layers))]
    for i in range(config.text.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        groups = {QKV: ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]}
        if config.text.architecture == "llama":
            groups |= gate_up
        if p + "self_attn.q_proj.bias" in weights:
            groups[QKV_BIAS] = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
        layers.append((p, groups))
    for p, groups in layers:
        for stacked, names in groups.items():
            if p + stacked in weights:
                continue
            weights[p + stacked] = stack_rows([weights[p + n] for n in names])
            start = 0
            for name in names:
                rows = weights[p + name].shape[0]
                weights[p + name] = row_slice(weights[p + stacked], start, start + rows)
                start += rows
    return weights


def stack_rows(parts: list):
    """Weights [N_i, K] of one kind -> [sum N_i, K] of that kind; mixed kinds (a GGUF with Q8_0 v next to Q4 q and k)
    are stacked as float32."""
    first = parts[0]
    if all(isinstance(w, np.ndarray) for w in parts):
        return np.concatenate([np.asarray(w, dtype=np.float32) for w in parts])
    same = lambda attr: all(type(w) is type(first) and getattr(w, attr) == getattr(first, attr) for w in parts)
    if isinstance(first, Int4Weight) and same("K") and same("group_size") and same("symmetric"):
        return Int4Weight(sum(w.N for w in parts), first.K, first.group_size, first.symmetric,
                          np.concatenate([w.qweight for w in parts]), np.concatenate([w.scales for w in parts]),
                          None if first.symmetric else np.concatenate([w.mins for w in parts]))
    if isinstance(first, Q8Weight) and same("K"):
        return Q8Weight(sum(w.N for w in parts), first.K, np.concatenate([w.q for w in parts]),
                        np.concatenate([w.scales for w in parts]))
    return np.concatenate([dequantize(w) for w in parts])


def row_slice(w, start: int, stop: int):
    """Rows [start, stop) of a weight, as a view of it."""
    if isinstance(w, Int4Weight):
        return Int4Weight(stop - start, w.K, w.group_size, w.symmetric, w.qweight[start:stop], w.scales[start:stop],
                          None if w.mins is None else w.mins[start:stop])
    if isinstance(w, Q8Weight):
        return Q8Weight(stop - start, w.K, w.q[start:stop], w.scales[start:stop])
    return w[start:stop]
