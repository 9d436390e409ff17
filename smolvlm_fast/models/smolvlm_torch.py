"""The PyTorch forward of SmolVLM (idefics3 / smolvlm) and of text-only Llama models.

The model never sees requests: it gets packed token ids, the step's StepMetadata (made a `ForwardBatch` of
tensors here), the KV cache tensors allocated outside it and, per sequence, its images (models/batch.py).
Every hot op goes through `smolvlm_fast.ops`. Loading a checkpoint into it: models/loader.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig, TextConfig, VisionConfig
from ..errors import InputError, check_image_tokens
from .batch import StepMetadata, check_images, cross_spans, derived_per_sequence, spliced_features


@dataclass
class ForwardBatch:
    """Attention metadata of one step, as tensors on the model's device."""
    positions: torch.Tensor          # [T] int32
    slot_mapping: torch.Tensor       # [T] int32
    block_tables: torch.Tensor       # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor           # [num_seqs] int32
    query_start_loc: torch.Tensor    # [num_seqs + 1] int32
    max_seq_len: int                 # a bound of seq_lens, known on the host: sizes the attention's context splits
    #                                  and the RoPE table without reading seq_lens back (no sync; graphs capture it)

    @classmethod
    def from_metadata(cls, meta: StepMetadata, device) -> "ForwardBatch":
        def i32(values):
            return torch.tensor(values, dtype=torch.int32, device=device)
        return cls(i32(meta.positions), i32(meta.slot_mapping), i32(meta.block_tables), i32(meta.seq_lens),
                   i32(meta.query_start_loc), max(meta.seq_lens, default=0))


# ---------------------------------------------------------------- vision encoder (SigLIP, variable size)

class VisionLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        D = v.hidden_size
        self.heads, self.eps = v.num_attention_heads, v.layer_norm_eps
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out_proj = nn.Linear(D, D)
        self.fc1 = nn.Linear(D, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, D)

    def forward(self, x, key_mask):
        B, N, D = x.shape
        h = ops.layer_norm(x, self.layer_norm1.weight, self.layer_norm1.bias, self.eps)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).unbind(2)  # 3 x [B, N, H, Dh]
        attn = ops.rope_attention(q, k, v, causal=False, key_mask=key_mask)  # [B, N, H, Dh]
        x = x + self.out_proj(attn.reshape(B, N, D))
        h = ops.layer_norm(x, self.layer_norm2.weight, self.layer_norm2.bias, self.eps)
        return x + self.fc2(ops.gelu_tanh(self.fc1(h)))


class VisionEncoder(nn.Module):
    def __init__(self, v: VisionConfig, fixed_size: bool = False):
        """fixed_size: every image is image_size square (the factorized variant): positions are arange, no masks."""
        super().__init__()
        self.config, self.fixed_size = v, fixed_size
        D, C, P = v.hidden_size, v.num_channels, v.patch_size
        if v.patch_stem == "dwsep":
            self.dw_weight, self.dw_bias = nn.Parameter(torch.empty(C, 1, P, P)), nn.Parameter(torch.empty(C))
            self.pw_weight, self.pw_bias = nn.Parameter(torch.empty(D, C)), nn.Parameter(torch.empty(D))
        else:
            self.groups = v.groups if v.patch_stem == "grouped" else 1
            self.patch_weight = nn.Parameter(torch.empty(D, C // self.groups, P, P))
            self.patch_bias = nn.Parameter(torch.empty(D))
        self.position_embedding = nn.Parameter(torch.empty(v.patches_per_side**2, v.hidden_size))
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(v.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(v.hidden_size)

    def forward(self, pixels, patch_mask):
        """pixels [N, C, H, W], patch_mask [N, H/P, W/P] bool -> [N, (H/P)*(W/P), D]."""
        x = self.embed_patches(pixels, patch_mask)  # [N, h*w, D]
        key_mask = None if bool(patch_mask.all()) else patch_mask.flatten(1)  # [N, h*w]
        for layer in self.layers:
            x = layer(x, key_mask)
        return ops.layer_norm(x, self.post_layernorm.weight, self.post_layernorm.bias, self.config.layer_norm_eps)


    def embed_patches(self, pixels, patch_mask):
        """The patch stem plus position embeddings: [N, C, H, W] -> [N, (H/P)*(W/P), D]."""
        position_ids = None if self.fixed_size else bucketed_position_ids(patch_mask, self.config.patches_per_side)
        if self.config.patch_stem == "dwsep":
            return ops.dwsep_patch_embed(pixels, self.dw_weight, self.dw_bias, self.pw_weight, self.pw_bias,
                                         self.position_embedding, position_ids)
        return ops.patch_embed(pixels, self.patch_weight, self.patch_bias, self.position_embedding, position_ids,
                               groups=self.groups)


def bucketed_position_ids(patch_mask, patches_per_side):
    """Position ids of a variable-size image: fractional patch coordinates bucketed onto the learned grid.

    patch_mask [N, h, w] bool -> [N, h*w] int64; padding patches get 0 (as transformers does).
    """
    N, h, w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    rows = patch_mask[:, :, 0].sum(1)  # [N] patches per column of real image
    cols = patch_mask[:, 0, :].sum(1)  # [N]
    frac_h = torch.arange(h, device=device, dtype=torch.float32)[None] * (1.0 / rows)[:, None]  # [N, h]
    frac_w = torch.arange(w, device=device, dtype=torch.float32)[None] * (1.0 / cols)[:, None]  # [N, w]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(N, -1)  # [N, h*w]
    return torch.where(patch_mask.reshape(N, -1), ids, torch.zeros_like(ids))


def pixel_shuffle(x, scale):
    """[N, S, D] -> [N, S/scale^2, D*scale^2], grouping scale x scale neighbouring patches (transformers' order)."""
    N, S, D = x.shape
    side = int(S**0.5)
    x = x.view(N, side, side // scale, D * scale).permute(0, 2, 1, 3)
    x = x.reshape(N, side // scale, side // scale, D * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(N, S // scale**2, D * scale**2)


# ---------------------------------------------------------------- Llama decoder

class TextLayer(nn.Module):
    def __init__(self, t: TextConfig):
        super().__init__()
        D, Dh = t.hidden_size, t.head_dim
        self.t = t
        self.q_size, self.kv_size = t.num_attention_heads * Dh, t.num_key_value_heads * Dh
        self.input_layernorm = nn.Parameter(torch.empty(D))
        self.post_attention_layernorm = nn.Parameter(torch.empty(D))
        self.qkv_proj = nn.Linear(D, self.q_size + 2 * self.kv_size, bias=t.attention_bias)
        self.o_proj = nn.Linear(self.q_size, D, bias=False)
        self.gate_up_proj = nn.Linear(D, 2 * t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, D, bias=False)

    def attention(self, x, batch: ForwardBatch, kv_cache, cos_sin):
        T, Dh = x.shape[0], self.t.head_dim
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(T, -1, Dh), k.view(T, -1, Dh), v.view(T, -1, Dh)  # [T, H, Dh]
        k_cache, v_cache = kv_cache
        ops.write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping, cos_sin=cos_sin, positions=batch.positions)
        out = ops.paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                  query_start_loc=batch.query_start_loc, cos_sin=cos_sin, positions=batch.positions,
                                  max_seq_len=batch.max_seq_len)
        return self.o_proj(out.reshape(T, self.q_size))

    def forward(self, x, residual, batch, kv_cache, cos_sin):
        eps = self.t.rms_norm_eps
        if residual is None:
            x, residual = ops.rms_norm(x, self.input_layernorm, eps), x
        else:
            x, residual = ops.rms_norm(x, self.input_layernorm, eps, residual)
        x = self.attention(x, batch, kv_cache, cos_sin)
        x, residual = ops.rms_norm(x, self.post_attention_layernorm, eps, residual)
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x))), residual


class PhiLayer(TextLayer):
    """Phi-2's parallel block: x + dense(attn(LN(x))) + fc2(gelu(fc1(LN(x)))), biased projections."""

    def __init__(self, t: TextConfig):
        nn.Module.__init__(self)
        D, Dh = t.hidden_size, t.head_dim
        self.t = t
        self.q_size, self.kv_size = t.num_attention_heads * Dh, t.num_key_value_heads * Dh
        self.input_layernorm = nn.LayerNorm(D)
        self.qkv_proj = nn.Linear(D, self.q_size + 2 * self.kv_size)
        self.o_proj = nn.Linear(self.q_size, D)  # Phi's "dense"
        self.fc1, self.fc2 = nn.Linear(D, t.intermediate_size), nn.Linear(t.intermediate_size, D)

    def forward(self, x, residual, batch, kv_cache, cos_sin):
        """(x, residual) whose sum is the hidden state -> (attention + MLP, that hidden state)."""
        h = x if residual is None else x + residual  # [T, D]
        normed = ops.layer_norm(h, self.input_layernorm.weight, self.input_layernorm.bias, self.t.layer_norm_eps)
        mlp = self.fc2(ops.gelu_tanh(self.fc1(normed)))
        return self.attention(normed, batch, kv_cache, cos_sin) + mlp, h


class CrossLayer(nn.Module):
    """A gated cross-attention layer (MllamaCrossAttentionDecoderLayer's form, docs/xattn.md): text queries over
    the request's image states, whose K/V (`image_kv`) are computed once per request."""

    def __init__(self, t: TextConfig):
        super().__init__()
        D, Dh = t.hidden_size, t.head_dim
        self.t = t
        self.cross_attn = nn.Module()
        self.cross_attn.q_proj = nn.Linear(D, t.num_attention_heads * Dh, bias=False)
        self.cross_attn.k_proj = nn.Linear(D, t.num_key_value_heads * Dh, bias=False)
        self.cross_attn.v_proj = nn.Linear(D, t.num_key_value_heads * Dh, bias=False)
        self.cross_attn.o_proj = nn.Linear(t.num_attention_heads * Dh, D, bias=False)
        self.cross_attn.q_norm, self.cross_attn.k_norm = nn.Module(), nn.Module()
        self.cross_attn.q_norm.weight, self.cross_attn.k_norm.weight = nn.Parameter(torch.empty(Dh)), nn.Parameter(torch.empty(Dh))
        self.input_layernorm = nn.Parameter(torch.empty(D))
        self.post_attention_layernorm = nn.Parameter(torch.empty(D))
        self.gate_up_proj = nn.Linear(D, 2 * t.intermediate_size, bias=False)
        self.down_proj = nn.Linear(t.intermediate_size, D, bias=False)
        self.cross_attn_attn_gate, self.cross_attn_mlp_gate = nn.Parameter(torch.empty(1)), nn.Parameter(torch.empty(1))

    def image_kv(self, states):
        """Image states [T, D] -> (k [T, Hkv, Dh] after k_norm, v [T, Hkv, Dh])."""
        T, a = states.shape[0], self.cross_attn
        k = ops.rms_norm(a.k_proj(states).view(T, -1, self.t.head_dim), a.k_norm.weight, self.t.rms_norm_eps)
        return k, a.v_proj(states).view(T, -1, self.t.head_dim)

    def forward(self, h, spans):
        """h [T, D] hidden states; spans: (first row, rows, (k, v)) per sequence with images -> h updated."""
        eps, a, Dh = self.t.rms_norm_eps, self.cross_attn, self.t.head_dim
        rows = torch.cat([torch.arange(r0, r0 + n, device=h.device) for r0, n, _ in spans])  # [R]
        x = h[rows]  # [R, D]
        q = ops.rms_norm(a.q_proj(ops.rms_norm(x, self.input_layernorm, eps)).view(len(rows), -1, Dh),
                         a.q_norm.weight, eps)  # [R, Hq, Dh]
        attn = torch.cat([ops.cross_attention(q[None, i:i + n], k[None], v[None])[0]
                          for i, (_, n, (k, v)) in zip(_offsets(spans), spans)])  # [R, Hq, Dh]
        x = x + torch.tanh(self.cross_attn_attn_gate) * a.o_proj(attn.flatten(1))
        mlp = self.down_proj(ops.silu_and_mul(self.gate_up_proj(ops.rms_norm(x, self.post_attention_layernorm, eps))))
        h = h.clone()
        h[rows] = x + torch.tanh(self.cross_attn_mlp_gate) * mlp
        return h


def _cat(features: list):
    """Tensors in order as one (None for none)."""
    if len(features) <= 1:
        return features[0] if features else None
    return torch.cat(features)


def _offsets(spans):
    """Start of each span's rows among the gathered rows."""
    starts, total = [], 0
    for _, n, _ in spans:
        starts.append(total)
        total += n
    return starts


class TextModel(nn.Module):
    def __init__(self, t: TextConfig, cross_attention_layers: tuple[int, ...] = ()):
        super().__init__()
        self.t = t
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        layer = PhiLayer if t.architecture == "phi" else TextLayer
        self.layers = nn.ModuleList(layer(t) for _ in range(t.num_hidden_layers))
        if t.architecture == "phi":
            self.final_layernorm = nn.LayerNorm(t.hidden_size)
        else:
            self.norm = nn.Parameter(torch.empty(t.hidden_size))
        self.cross_after = {i: j for j, i in enumerate(cross_attention_layers)}  # decoder layer -> cross layer
        self.cross_layers = nn.ModuleList(CrossLayer(t) for _ in cross_attention_layers)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def rope(self, max_position: int):
        """The [positions, rotary_dim] cos/sin table, grown on demand."""
        if self.cos_sin.shape[0] < max_position:
            size = min(max(max_position, 2 * self.cos_sin.shape[0]), self.t.max_position_embeddings)
            self.cos_sin = ops.rope_table(self.t.rotary_dim, max(size, max_position), self.t.rope_theta,
                                          device=self.embed_tokens.weight.device)
        return self.cos_sin

    def forward(self, embeds, batch: ForwardBatch, kv_caches, cross_spans=None):
        """embeds [T, D] -> final hidden states [T, D]. cross_spans: CrossLayer.forward's spans (None: no images)."""
        cos_sin = self.rope(batch.max_seq_len)
        x, residual = embeds, None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(x, residual, batch, kv_cache, cos_sin)
            if cross_spans and i in self.cross_after:
                j = self.cross_after[i]
                x, residual = self.cross_layers[j](x + residual, [(r0, n, kv[j]) for r0, n, kv in cross_spans]), None
        if self.t.architecture == "phi":
            h = x if residual is None else x + residual
            return ops.layer_norm(h, self.final_layernorm.weight, self.final_layernorm.bias, self.t.layer_norm_eps)
        if residual is None:  # a cross layer came last
            return ops.rms_norm(x, self.norm, self.t.rms_norm_eps)
        return ops.rms_norm(x, self.norm, self.t.rms_norm_eps, residual)[0]


# ---------------------------------------------------------------- the whole model


class SmolVLM(nn.Module):
    """SmolVLM (vision encoder + connector + Llama decoder), or a text-only Llama when config.vision is None."""
    backend = "torch"  # engine.backend's name for how this model's arrays are handled

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.vision = VisionEncoder(config.vision, fixed_size=config.is_xattn) if config.is_vlm else None
        if config.is_vlm:
            self.connector = nn.Linear(config.vision.hidden_size * config.scale_factor**2, t.hidden_size, bias=False)
        self.text = TextModel(t, config.cross_attention_layers)
        phi = t.architecture == "phi"  # Phi's lm_head has a bias, kept apart when the weight is tied
        self.lm_head = None if t.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=phi)
        self.lm_head_bias = nn.Parameter(torch.empty(t.vocab_size)) if phi and t.tie_word_embeddings else None

    @property
    def device(self):
        return self.text.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.text.embed_tokens.weight.dtype

    def encode_images(self, pixels, patch_mask):
        """pixels [N, C, H, W], patch_mask [N, H/P, W/P] -> image features [N * image_seq_len, D_text]."""
        hidden = self.vision(pixels.to(self.dtype), patch_mask)  # [N, S, Dv]
        features = self.connector(pixel_shuffle(hidden, self.config.scale_factor))  # [N, S/s^2, D]
        return features.reshape(-1, features.shape[-1])

    def embed(self, input_ids, image_features=None):
        """input_ids [T] -> [T, D]; image features [n, D], when given, replace the n <image> tokens in order.

        Decode steps pass none: an <image> token the model generates itself stays a token.
        """
        embeds = self.text.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_id
        check_image_tokens(int(is_image.sum()), image_features.shape[0])
        return embeds.masked_scatter(is_image[:, None], image_features.to(embeds.dtype))

    def forward(self, input_ids, meta: StepMetadata, kv_caches, images: list | None = None):
        """Packed input_ids [T] -> hidden states [T, D]; writes the new tokens' K/V into kv_caches.
        images: per sequence of the step, its SequenceImages or None. Spliced into the <image> tokens, or (a
        cross-attention model) attended to through K/V computed at the sequence's first step and kept with it."""
        ids = torch.as_tensor(input_ids, device=self.device)
        images = check_images(meta, images)
        if self.config.is_xattn:
            embeds = self.text.embed_tokens(ids)
            spans = cross_spans(meta, derived_per_sequence(images, lambda features: self.cross_kv(_cat(features))))
        else:
            embeds, spans = self.embed(ids, _cat(spliced_features(images))), None
        return self.text(embeds, ForwardBatch.from_metadata(meta, self.device), kv_caches, spans)

    def cross_kv(self, image_features):
        """A request's image features [n, D] -> per cross-attention layer its (k, v) [n, Hkv, Dh], kept with the
        request and reused at every step."""
        states = torch.as_tensor(image_features, device=self.device).to(self.dtype)
        return [layer.image_kv(states) for layer in self.text.cross_layers]

    def compute_logits(self, hidden):
        if self.lm_head is not None:  # an nn.Linear, or an Int4Linear swapped in by quantization (tied ones too)
            logits = self.lm_head(hidden)  # [n, vocab]
        else:
            logits = hidden @ self.text.embed_tokens.weight.T  # [n, vocab]
        return logits if self.lm_head_bias is None else logits + self.lm_head_bias

    def image_features_per_row(self, pixel_values, pixel_attention_mask=None) -> list:
        """pixel_values [B, n, C, H, W] (all-zero padding images allowed) -> per batch row, its image features
        [n_real * image_seq_len, D], exactly as transformers' get_image_features selects and masks them."""
        pixel_values = torch.as_tensor(pixel_values)
        if pixel_values.dim() != 5:
            raise InputError(f"pixel_values must be [batch, images, channels, height, width], got {tuple(pixel_values.shape)}")
        B, n, C, H, W = pixel_values.shape
        P = self.config.vision.patch_size
        self.config.check_image_size(H, W)
        if H < P or W < P:
            raise InputError(f"pixel_values of {H}x{W} are smaller than one {P}x{P} patch")
        flat = pixel_values.flatten(0, 1).to(self.device)  # [B*n, C, H, W]
        real = (flat != 0).flatten(1).any(1)  # [B*n]: padding images are all zero
        if pixel_attention_mask is None or self.config.is_xattn:  # the variant's images are whole: no padding
            mask = torch.ones(int(real.sum()), H, W, dtype=torch.bool, device=self.device)
        else:
            mask = torch.as_tensor(pixel_attention_mask).flatten(0, 1).to(self.device)[real].bool()  # [N, H, W]
        h, w = H // P, W // P
        patch_mask = mask[:, :h * P, :w * P].reshape(-1, h, P, w, P).any(dim=(2, 4))  # [N, h, w]
        features = self.encode_images(flat[real], patch_mask) if bool(real.any()) else None
        per_row = (real.view(B, n).sum(1) * self.config.image_seq_len).tolist()
        return list(features.split(per_row)) if features is not None else [None] * B

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype=None):
        """One (k_cache, v_cache) pair of [num_blocks, block_size, kv_heads, head_dim] per decoder layer."""
        t = self.config.text
        shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
        dtype = dtype or self.dtype
        return [(torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape, dtype=dtype, device=self.device))
                for _ in range(t.num_hidden_layers)]
