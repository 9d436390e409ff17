"""The PyTorch-free forward of SmolVLM (idefics3 / smolvlm), of its factorized variant (smolvlm_fast_xattn:
docs/xattn.md) and of text-only Llama models, in NumPy.

Free functions, one per layer, each taking the weights dict under the checkpoint's own (Hugging Face) names.
Every linear layer goes through `linear`, which takes float32 or quantized (int4 / q8) weights. The KV cache is
allocated outside and handed in; the step's attention metadata and its images per sequence come from
models/batch.py. The vision encoder is in models/vision_numpy.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig, TextConfig
from ..cpu import decoder as cpu_decoder
from ..cpu.linear import linear
from ..cpu.vision import available as vision_available
from ..cpu.vision import pack_and_drop_floats, packed_names
from ..cpu.ops import (
    cross_attention,
    gelu_tanh,
    kv_cache_dtype,
    kv_cache_zeros,
    layer_norm,
    paged_attention,
    paged_plan,
    rms_norm,
    rope_factors,
    rope_table,
    rotate,
    silu_and_mul,
    write_kv_cache,
)
from ..cpu.weights import (
    GATE_UP,
    QKV,
    QKV_BIAS,
    bf16_weights,
    decoder_linears,
    head_name,
    load_gguf_weights,
    load_safetensors_weights,
    quantize_weights,
    quantized_names,
    stack_projections,
    text_prefix,
)
from ..errors import InputError, check_image_tokens
from ..formats.bf16 import Bf16Bits
from ..formats.int4 import Int4Weight, Q8Weight, embedding_rows
from .batch import StepMetadata, check_images, cross_spans, derived_per_sequence, spliced_features
from .vision_numpy import image_features_per_row

# ---------------------------------------------------------------- decoder (Llama or Phi blocks, gated cross-attention)


@dataclass
class Step:
    """One step's attention metadata as int32 arrays, the RoPE rows of its positions, and the attention plan
    (which cache slots and causal masks each sequence uses), all computed once and shared by every layer."""
    slot_mapping: np.ndarray     # [T]
    block_tables: np.ndarray     # [num_seqs, max_blocks]
    seq_lens: np.ndarray         # [num_seqs]
    query_start_loc: np.ndarray  # [num_seqs + 1]
    cos: np.ndarray              # [T, 1, 2, R/2] RoPE factors (cpu/ops.py rope_factors), R = rotary_dim
    sin: np.ndarray              # [T, 1, 2, R/2]
    plan: list                   # cpu/ops.py paged_plan

    @classmethod
    def from_metadata(cls, meta: StepMetadata, cos_sin: np.ndarray, block_size: int, heads: int) -> "Step":
        i32 = {name: np.array(getattr(meta, name), dtype=np.int32)
               for name in ("positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")}
        plan = paged_plan(i32["block_tables"], i32["seq_lens"], i32["query_start_loc"], block_size, heads)
        return cls(i32["slot_mapping"], i32["block_tables"], i32["seq_lens"], i32["query_start_loc"],
                   *rope_factors(cos_sin, i32["positions"]), plan)


def embed(w: dict, config: ModelConfig, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
    """input_ids [T] -> [T, D]; image features [n, D], when given, replace the n <image> tokens in order.

    Decode steps pass none: an <image> token the model generates itself stays a token.
    """
    x = embedding_rows(w[text_prefix(config) + "embed_tokens.weight"], input_ids)  # [T, D]
    if image_features is None:
        return x
    is_image = input_ids == config.image_token_id  # [T]
    check_image_tokens(int(is_image.sum()), len(image_features))
    x[is_image] = image_features
    return x


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


def layer_spans(meta: StepMetadata, cross_kv: list, n_layers: int) -> list[list[CrossSpan]]:
    """Per cross layer, the spans of the step's sequences that have images (batch.cross_spans: cross_kv holds one
    entry per sequence, None for a text-only one)."""
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
    return linear(hidden, w[head_name(config)], w.get("lm_head.bias"))  # [n, V]


# ---------------------------------------------------------------- the model the engine drives


class NumpyModel:
    """SmolVLM, its factorized variant or a text-only Llama over NumPy: weights by Hugging Face name, the forward
    in free functions."""
    backend = "numpy"  # engine.backend's name for how this model's arrays are handled
    device, dtype = "cpu", np.float32  # it computes on the CPU; activations and outputs are float32
    PRECISIONS = ("float32", "bfloat16")

    def __init__(self, config: ModelConfig, weights: dict, fused: bool | None = None,
                 int8_activations: bool | None = None, precision: str = "float32", kv_dtype: str | None = None):
        """fused: run each step's decoder layers in C++ (cpu/decoder.py), one call per run of layers between
        cross-attention layers, which stay in NumPy; None means where the extension has it. The C++ step knows
        Llama blocks only: Phi blocks always take the free functions.
        int8_activations: in those steps, int4 products round x to int8 (cpu_decoder.int8_activations_default).
        precision: "float32", or "bfloat16" for products of bf16-rounded inputs accumulated in float32
        (auto.py's from_pretrained picks it from dtype and the checkpoint).
        kv_dtype: "float32" or "float16" for the KV cache; None: the default (see kv_dtype below)."""
        if precision not in self.PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(self.PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if precision == "bfloat16":
            weights = bf16_weights(weights, config)
        self.config, self.weights = config, stack_projections(weights, config)
        if precision == "bfloat16" and config.is_vlm:
            pack_and_drop_floats(self.weights, config.vision)  # the tower held once, in bf16
        for name, w in self.weights.items():
            if isinstance(w, Bf16Bits):  # a loader's bits that no packing took: widened for the float32 code
                self.weights[name] = w.float32()
        self.cos_sin = np.empty((0, config.text.rotary_dim), dtype=np.float32)
        self.fused = (cpu_decoder.available() if fused is None else fused) and config.text.architecture == "llama"
        self.int8_activations = (cpu_decoder.int8_activations_default() if int8_activations is None
                                 else int8_activations)
        self._segments = None  # [(layers, _cpu.Decoder)] (cpu_decoder.build_segments), built on the first step
        self.kv_dtype_option = kv_dtype
        kv_cache_dtype(kv_dtype)  # a bad name fails here, not at the first allocation

    @classmethod
    def from_checkpoint(cls, location: str | Path, quantize: str | None = None, **options) -> "NumpyModel":
        """A checkpoint dir (config.json + safetensors) or a .gguf file; quantize="int4" makes the decoder int4.
        options: fused, int8_activations, precision (see __init__)."""
        location = Path(location)
        if location.suffix == ".gguf":
            config, weights = load_gguf_weights(location)
        else:
            config = ModelConfig.from_file(location / "config.json")
            # precision bfloat16 (and no int4): the decoder's products and head go from the file's BF16 bits
            # straight into packed bf16, never all in float32 at once
            bf16 = options.get("precision") == "bfloat16"
            packed = frozenset([*decoder_linears(config), head_name(config)]) if bf16 and quantize is None else ()
            bits = frozenset(packed_names(config.vision)) if bf16 and config.is_vlm and vision_available() else ()
            # quantize: the decoder's BF16 weights quantized as they are read, not all widened to float32 first
            int4 = frozenset(quantized_names(config, quantize)) if quantize is not None else frozenset()
            weights = load_safetensors_weights(location, config, frozenset(packed), frozenset(bits), int4)
        if quantize is not None:
            weights = quantize_weights(weights, config, quantize)
        return cls(config, weights, **options)

    @property
    def kv_dtype(self) -> np.dtype:
        """The KV cache's dtype: the constructor's kv_dtype, else $SMOLVLM_FAST_KV_DTYPE, else float16 for a
        model of precision "bfloat16" or with quantized weights, else float32 (cpu.ops.kv_cache_dtype)."""
        quantized = any(isinstance(w, (Int4Weight, Q8Weight)) for w in self.weights.values())
        return kv_cache_dtype(self.kv_dtype_option, self.precision, quantized)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """One (k_cache, v_cache) pair of [num_blocks, block_size, kv_heads, head_dim] per decoder layer, of
        kv_dtype (float32 or float16: the C++ attention widens float16 as it reads, at half the bytes)."""
        t, dtype = self.config.text, self.kv_dtype
        shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
        return [(kv_cache_zeros(shape, dtype), kv_cache_zeros(shape, dtype)) for _ in range(t.num_hidden_layers)]

    def image_features_per_row(self, pixel_values, pixel_attention_mask=None) -> list[np.ndarray | None]:
        if not self.config.is_vlm:
            raise InputError("this is a text-only model; it cannot take images (use a SmolVLM checkpoint)")
        return image_features_per_row(self.weights, self.config, pixel_values, pixel_attention_mask,
                                      precision=self.precision)

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
                images: list | None = None) -> np.ndarray:
        """Packed input_ids [T] -> hidden states [T, D]; writes the new tokens' K/V into kv_caches.
        images: per sequence of the step, its SequenceImages or None. Spliced into the <image> tokens, or (the
        factorized variant) attended to through K/V computed at the sequence's first step and kept with it."""
        t, images = self.config.text, check_images(meta, images)
        if self.config.is_xattn:
            x = embed(self.weights, self.config, np.asarray(input_ids))  # [T, D]
            cross_kv = derived_per_sequence(images, lambda features: self.cross_kv(_concat(features)))
        else:
            x = embed(self.weights, self.config, np.asarray(input_ids), _concat(spliced_features(images)))  # [T, D]
            cross_kv = None
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
            self._segments = cpu_decoder.build_segments(self.weights, self.config, prefix, self.int8_activations,
                                                         bf16_prefill=self.precision == "bfloat16")
        for j, (layers, segment) in enumerate(self._segments):
            x = cpu_decoder.step(segment, x, arrays, kv_caches[layers.start:layers.stop], cos_sin)  # [T, D]
            if j < len(spans):
                x = cross_layer(self.weights, f"{prefix}cross_layers.{j}.", self.config.text, x, spans[j])  # [T, D]
        if len(self._segments) == len(spans):  # a cross layer after the last decoder layer: the final norm here
            x = rms_norm(x, self.weights[prefix + "norm.weight"], self.config.text.rms_norm_eps)  # [T, D]
        return x

    def __repr__(self) -> str:
        return (f"NumpyModel(model_type={self.config.model_type!r}, layers={self.config.text.num_hidden_layers}, "
                f"precision={self.precision!r}, fused={self.fused})")

    def compute_logits(self, hidden: np.ndarray) -> np.ndarray:
        return logits(self.weights, self.config, hidden)  # [n, V]

    def rope(self, max_position: int) -> np.ndarray:
        """The [positions, rotary_dim] cos/sin table, grown on demand."""
        if len(self.cos_sin) < max_position:
            t = self.config.text
            size = max(min(max(max_position, 2 * len(self.cos_sin)), t.max_position_embeddings), max_position)
            self.cos_sin = rope_table(t.rotary_dim, size, t.rope_theta)
        return self.cos_sin


def _concat(features: list) -> np.ndarray | None:
    """Arrays in order as one (None for none)."""
    if len(features) <= 1:
        return features[0] if features else None
    return np.concatenate(features)


MLP_ROWS = 256  # tokens per MLP pass
