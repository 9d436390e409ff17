"""An independent plain-PyTorch reference for the factorized variant (model_type "smolvlm_fast_xattn").

Written from docs/xattn.md alone (config.json fields, the forward, the safetensors names), without the engine's
model code, so that the engine's backends can be held against it. Every layer is spelled out (norms, attention,
activations); the whole sequence is recomputed for every step, in float32 or float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

V = "model.vision_model."
T = "model.text_model."
CONNECTOR = "model.connector.modality_projection.proj.weight"


def _dims(config: dict) -> dict:
    vc, tc = config["vision_config"], config["text_config"]
    head_dim = tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"]
    return dict(
        C=vc.get("num_channels", 3), P=vc["patch_size"], D=vc["hidden_size"], Iv=vc["intermediate_size"],
        n_patches=(vc["image_size"] // vc["patch_size"]) ** 2, s=config.get("scale_factor", 1),
        H=tc["hidden_size"], I=tc["intermediate_size"], Vocab=tc["vocab_size"], Hq=tc["num_attention_heads"],
        Hkv=tc.get("num_key_value_heads") or tc["num_attention_heads"], Dh=head_dim,
    )


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of docs/xattn.md's layout with its shape, for this config."""
    vc, tc, d = config["vision_config"], config["text_config"], _dims(config)
    C, P, D, Iv, H, I, Hq, Hkv, Dh = (d[k] for k in ("C", "P", "D", "Iv", "H", "I", "Hq", "Hkv", "Dh"))
    shapes: dict[str, tuple[int, ...]] = {}
    stem = V + "embeddings.patch_embedding."
    if vc.get("patch_stem", "conv") == "dwsep":
        shapes |= {stem + "depthwise.weight": (C, 1, P, P), stem + "depthwise.bias": (C,),
                   stem + "pointwise.weight": (D, C), stem + "pointwise.bias": (D,)}
    else:
        groups = vc.get("groups", 1) if vc.get("patch_stem") == "grouped" else 1
        shapes |= {stem + "weight": (D, C // groups, P, P), stem + "bias": (D,)}
    shapes[V + "embeddings.position_embedding.weight"] = (d["n_patches"], D)
    for i in range(vc["num_hidden_layers"]):
        p = f"{V}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{name}.weight": (D, D), f"{p}self_attn.{name}.bias": (D,)}
        shapes |= {p + "mlp.fc1.weight": (Iv, D), p + "mlp.fc1.bias": (Iv,),
                   p + "mlp.fc2.weight": (D, Iv), p + "mlp.fc2.bias": (D,)}
        for n in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}{n}.weight": (D,), f"{p}{n}.bias": (D,)}
    shapes |= {V + "post_layernorm.weight": (D,), V + "post_layernorm.bias": (D,)}
    shapes[CONNECTOR] = (H, D * d["s"] ** 2)

    shapes[T + "embed_tokens.weight"] = (d["Vocab"], H)
    phi = tc["architecture"] == "phi"
    for i in range(tc["num_hidden_layers"]):
        p = f"{T}layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (Hq * Dh, H), p + "self_attn.k_proj.weight": (Hkv * Dh, H),
                   p + "self_attn.v_proj.weight": (Hkv * Dh, H), p + "input_layernorm.weight": (H,)}
        if phi:
            shapes |= {p + "self_attn.q_proj.bias": (Hq * Dh,), p + "self_attn.k_proj.bias": (Hkv * Dh,),
                       p + "self_attn.v_proj.bias": (Hkv * Dh,), p + "self_attn.dense.weight": (H, Hq * Dh),
                       p + "self_attn.dense.bias": (H,), p + "mlp.fc1.weight": (I, H), p + "mlp.fc1.bias": (I,),
                       p + "mlp.fc2.weight": (H, I), p + "mlp.fc2.bias": (H,), p + "input_layernorm.bias": (H,)}
        else:
            shapes |= {p + "self_attn.o_proj.weight": (H, Hq * Dh), p + "mlp.gate_proj.weight": (I, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
                       p + "post_attention_layernorm.weight": (H,)}
    if phi:
        shapes |= {T + "final_layernorm.weight": (H,), T + "final_layernorm.bias": (H,), "lm_head.bias": (d["Vocab"],)}
    else:
        shapes[T + "norm.weight"] = (H,)
    if not tc.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (d["Vocab"], H)

    for j in range(len(config.get("cross_attention_layers", []))):
        p = f"{T}cross_layers.{j}."
        shapes |= {p + "cross_attn.q_proj.weight": (Hq * Dh, H), p + "cross_attn.k_proj.weight": (Hkv * Dh, H),
                   p + "cross_attn.v_proj.weight": (Hkv * Dh, H), p + "cross_attn.o_proj.weight": (H, Hq * Dh),
                   p + "cross_attn.q_norm.weight": (Dh,), p + "cross_attn.k_norm.weight": (Dh,),
                   p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                   p + "mlp.down_proj.weight": (H, I), p + "cross_attn_attn_gate": (1,),
                   p + "cross_attn_mlp_gate": (1,)}
    return shapes


def random_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights for every name of the layout: matrices with std fan_in^-1/2 (kept in [0.02, 0.3]),
    small biases, norm weights around 1, gates uniform(-1, 1) (non-zero, so the cross layers matter)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(config).items():
        if name.endswith("_gate"):
            t = torch.rand(shape, generator=g) * 2 - 1
        elif "norm" in name and name.endswith(".weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name or "position_embedding" in name:
            t = 0.3 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = min(0.3, max(0.02, fan_in**-0.5)) * torch.randn(shape, generator=g)
        out[name] = t
    return out


# --- layers, written out ---

def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [B, Hq, S, Dh], k/v [B, Hkv, T, Dh] (Hq a multiple of Hkv) -> [B, S, Hq*Dh]."""
    B, Hq, S, Dh = q.shape
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [B, Hq, T, Dh]: query head h reads KV head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # [B, Hq, S, T]
    if causal:
        future = torch.ones(S, k.shape[2], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs @ v).transpose(1, 2).reshape(B, S, Hq * Dh)


def rotate_half_partial(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """x [B, heads, S, Dh]: rotate-half RoPE over the first rotary_dim features, the rest passed through."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # [rotary_dim/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]  # [S, rotary_dim/2]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)  # [S, rotary_dim]
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """Idefics3's order: x [N, seq, D] -> [N, seq/s^2, D*s^2]."""
    N, seq, D = x.shape
    side = math.isqrt(seq)
    x = x.reshape(N, side, side // s, D * s).permute(0, 2, 1, 3)
    x = x.reshape(N, side // s, side // s, D * s * s).permute(0, 2, 1, 3)
    return x.reshape(N, seq // (s * s), D * s * s)


class XAttnReference:
    """The factorized SmolVLM forward from docs/xattn.md; one request (one token sequence) at a time."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.config, self.vc, self.tc = config, config["vision_config"], config["text_config"]
        self.dtype, self.d = dtype, _dims(config)
        if self.tc["architecture"] not in ("llama", "phi"):
            raise ValueError(f"text_config.architecture: {self.tc['architecture']!r} is not 'llama' or 'phi'")
        if self.vc.get("patch_stem", "conv") not in ("conv", "grouped", "dwsep"):
            raise ValueError(f"vision_config.patch_stem: {self.vc['patch_stem']!r}")
        for name, shape in tensor_shapes(config).items():
            if name not in tensors:
                raise ValueError(f"missing tensor {name}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name}: shape {tuple(tensors[name].shape)}, expected {shape}")
        self.w = {k: v.detach().to(dtype) for k, v in tensors.items()}
        if self.tc.get("tie_word_embeddings", False):
            self.w["lm_head.weight"] = self.w[T + "embed_tokens.weight"]
        self.rotary_dim = int(self.d["Dh"] * self.tc.get("partial_rotary_factor", 1.0))
        self.cross_after = {layer: j for j, layer in enumerate(config.get("cross_attention_layers", []))}

    def linear(self, x: torch.Tensor, name: str, bias: bool) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        return y + self.w[name + ".bias"] if bias else y

    # --- vision ---

    def patch_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The stem: [N, C, S, S] -> [N, (S/P)^2, D], patches in row-major order."""
        x, C, P, w = pixel_values.to(self.dtype), self.d["C"], self.d["P"], self.w
        p = V + "embeddings.patch_embedding."
        stem = self.vc.get("patch_stem", "conv")
        if stem == "dwsep":
            x = F.conv2d(x, w[p + "depthwise.weight"], w[p + "depthwise.bias"], stride=P, groups=C)  # [N, C, h, w]
            x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
            return x @ w[p + "pointwise.weight"].T + w[p + "pointwise.bias"]  # [N, h*w, D]
        groups = self.vc.get("groups", 1) if stem == "grouped" else 1
        x = F.conv2d(x, w[p + "weight"], w[p + "bias"], stride=P, groups=groups)  # [N, D, h, w]
        return x.flatten(2).transpose(1, 2)  # [N, h*w, D]

    def vision_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """One SigLIP pre-LN layer, x [N, n, D]."""
        p, eps, heads = f"{V}encoder.layers.{i}.", self.vc.get("layer_norm_eps", 1e-6), self.vc["num_attention_heads"]
        N, n, D = x.shape
        h = layer_norm(x, self.w[p + "layer_norm1.weight"], self.w[p + "layer_norm1.bias"], eps)
        q, k, v = (self.linear(h, f"{p}self_attn.{m}", True).reshape(N, n, heads, D // heads).transpose(1, 2)
                   for m in ("q_proj", "k_proj", "v_proj"))
        x = x + self.linear(attention(q, k, v, causal=False), p + "self_attn.out_proj", True)
        h = layer_norm(x, self.w[p + "layer_norm2.weight"], self.w[p + "layer_norm2.bias"], eps)
        return x + self.linear(gelu_tanh(self.linear(h, p + "mlp.fc1", True)), p + "mlp.fc2", True)

    def vision_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] -> [N, (S/P)^2, D]: stem, + position embedding, layers, post LayerNorm."""
        x = self.patch_embed(pixel_values) + self.w[V + "embeddings.position_embedding.weight"]
        for i in range(self.vc["num_hidden_layers"]):
            x = self.vision_layer(i, x)
        eps = self.vc.get("layer_norm_eps", 1e-6)
        return layer_norm(x, self.w[V + "post_layernorm.weight"], self.w[V + "post_layernorm.bias"], eps)

    def image_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, S, S] -> [N * tokens_per_image, H]: the images' states, concatenated in order."""
        x = pixel_shuffle(self.vision_encoder(pixel_values), self.d["s"])  # [N, n/s^2, D*s^2]
        return (x @ self.w[CONNECTOR].T).reshape(-1, self.d["H"])

    # --- text ---

    def self_attention(self, p: str, h: torch.Tensor, out_proj: str, bias: bool) -> torch.Tensor:
        """Causal GQA self-attention with partial RoPE, h [1, S, H] -> [1, S, H]."""
        B, S, _ = h.shape
        Hq, Hkv, Dh = self.d["Hq"], self.d["Hkv"], self.d["Dh"]
        q = self.linear(h, p + "self_attn.q_proj", bias).reshape(B, S, Hq, Dh).transpose(1, 2)
        k = self.linear(h, p + "self_attn.k_proj", bias).reshape(B, S, Hkv, Dh).transpose(1, 2)
        v = self.linear(h, p + "self_attn.v_proj", bias).reshape(B, S, Hkv, Dh).transpose(1, 2)
        positions, theta = torch.arange(S), self.tc.get("rope_theta", 10000.0)
        q = rotate_half_partial(q, positions, theta, self.rotary_dim)
        k = rotate_half_partial(k, positions, theta, self.rotary_dim)
        return self.linear(attention(q, k, v, causal=True), p + out_proj, bias)

    def decoder_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"{T}layers.{i}."
        if self.tc["architecture"] == "phi":
            eps = self.tc.get("layer_norm_eps", 1e-5)
            h = layer_norm(x, self.w[p + "input_layernorm.weight"], self.w[p + "input_layernorm.bias"], eps)
            mlp = self.linear(gelu_tanh(self.linear(h, p + "mlp.fc1", True)), p + "mlp.fc2", True)
            return x + self.self_attention(p, h, "self_attn.dense", True) + mlp
        eps = self.tc["rms_norm_eps"]
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], eps)
        x = x + self.self_attention(p, h, "self_attn.o_proj", False)
        return x + self.swiglu(p + "mlp.", rms_norm(x, self.w[p + "post_attention_layernorm.weight"], eps))

    def swiglu(self, p: str, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(h, p + "gate_proj", False), self.linear(h, p + "up_proj", False)
        return self.linear(silu(gate) * up, p + "down_proj", False)

    def cross_layer(self, j: int, hidden: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """Gated cross-attention layer j: hidden [B, S, H] attends to all of image_states [B, T, H]."""
        p, eps, w = f"{T}cross_layers.{j}.", self.tc["rms_norm_eps"], self.w
        B, S, _ = hidden.shape
        Hq, Hkv, Dh = self.d["Hq"], self.d["Hkv"], self.d["Dh"]
        x, c = hidden.to(self.dtype), image_states.to(self.dtype)
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = self.linear(h, p + "cross_attn.q_proj", False).reshape(B, S, Hq, Dh)
        q = rms_norm(q, w[p + "cross_attn.q_norm.weight"], eps).transpose(1, 2)  # [B, Hq, S, Dh]
        k = self.linear(c, p + "cross_attn.k_proj", False).reshape(B, -1, Hkv, Dh)
        k = rms_norm(k, w[p + "cross_attn.k_norm.weight"], eps).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.linear(c, p + "cross_attn.v_proj", False).reshape(B, -1, Hkv, Dh).transpose(1, 2)
        attn = self.linear(attention(q, k, v, causal=False), p + "cross_attn.o_proj", False)
        x = x + torch.tanh(w[p + "cross_attn_attn_gate"]) * attn
        mlp = self.swiglu(p + "mlp.", rms_norm(x, w[p + "post_attention_layernorm.weight"], eps))
        return x + torch.tanh(w[p + "cross_attn_mlp_gate"]) * mlp

    def logits(self, input_ids: list[int], pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The causal forward of the whole sequence: [S, vocab]. Without images (None or zero of them) the cross
        layers are skipped; the prompt is expected to hold one image_token_id per image, embedded as a token."""
        x = self.w[T + "embed_tokens.weight"][torch.as_tensor(input_ids, dtype=torch.long)][None]  # [1, S, H]
        images = None
        if pixel_values is not None and len(pixel_values) > 0:
            images = self.image_states(pixel_values)[None]  # [1, n_img_tokens, H]
        for i in range(self.tc["num_hidden_layers"]):
            x = self.decoder_layer(i, x)
            if images is not None and i in self.cross_after:
                x = self.cross_layer(self.cross_after[i], x, images)
        if self.tc["architecture"] == "phi":
            eps = self.tc.get("layer_norm_eps", 1e-5)
            x = layer_norm(x, self.w[T + "final_layernorm.weight"], self.w[T + "final_layernorm.bias"], eps)
            return self.linear(x, "lm_head", True)[0]
        return self.linear(rms_norm(x, self.w[T + "norm.weight"], self.tc["rms_norm_eps"]), "lm_head", False)[0]

    def greedy(self, input_ids: list[int], pixel_values: torch.Tensor | None = None, max_new_tokens: int = 16,
               eos_token_id: int | None = None) -> list[int]:
        """The new tokens of greedy decoding, the full forward recomputed each step; stops after eos_token_id
        when one is given."""
        ids, new = list(input_ids), []
        for _ in range(max_new_tokens):
            token = int(self.logits(ids, pixel_values)[-1].argmax())
            ids.append(token)
            new.append(token)
            if token == eos_token_id:
                break
        return new
