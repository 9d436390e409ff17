"""The tensors a checkpoint must hold, by Hugging Face name and shape, derived from its config."""
from __future__ import annotations

from ..config import ModelConfig, TextConfig, VisionConfig
from ..errors import CheckpointError


def text_tensor_shapes(t: TextConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    if t.architecture == "phi":
        return phi_tensor_shapes(t, prefix)
    D, I, Dh = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * Dh, t.num_key_value_heads * Dh
    shapes = {f"{prefix}embed_tokens.weight": (t.vocab_size, D), f"{prefix}norm.weight": (D,)}
    for i in range(t.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D), p + "mlp.down_proj.weight": (D, I),
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
        }
        if t.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def phi_tensor_shapes(t: TextConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Phi-2's blocks: biased q/k/v/dense and fc1/fc2, one LayerNorm per block, final_layernorm."""
    D, I, Dh = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * Dh, t.num_key_value_heads * Dh
    shapes = {f"{prefix}embed_tokens.weight": (t.vocab_size, D), f"{prefix}final_layernorm.weight": (D,),
              f"{prefix}final_layernorm.bias": (D,)}
    for i in range(t.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        for name, rows, cols in (("self_attn.q_proj", q, D), ("self_attn.k_proj", kv, D), ("self_attn.v_proj", kv, D),
                                 ("self_attn.dense", D, q), ("mlp.fc1", I, D), ("mlp.fc2", D, I)):
            shapes |= {p + name + ".weight": (rows, cols), p + name + ".bias": (rows,)}
        shapes |= {p + "input_layernorm.weight": (D,), p + "input_layernorm.bias": (D,)}
    return shapes


def cross_tensor_shapes(t: TextConfig, n_layers: int, prefix: str) -> dict[str, tuple[int, ...]]:
    """The gated cross-attention layers (MllamaCrossAttentionDecoderLayer's names), after `prefix`cross_layers.{j}."""
    D, I, Dh = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * Dh, t.num_key_value_heads * Dh
    shapes = {}
    for j in range(n_layers):
        p = f"{prefix}cross_layers.{j}."
        shapes |= {p + "cross_attn.q_proj.weight": (q, D), p + "cross_attn.k_proj.weight": (kv, D),
                   p + "cross_attn.v_proj.weight": (kv, D), p + "cross_attn.o_proj.weight": (D, q),
                   p + "cross_attn.q_norm.weight": (Dh,), p + "cross_attn.k_norm.weight": (Dh,),
                   p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D), p + "mlp.down_proj.weight": (D, I),
                   p + "cross_attn_attn_gate": (1,), p + "cross_attn_mlp_gate": (1,)}
    return shapes


def stem_tensor_shapes(v: VisionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    D, C, P = v.hidden_size, v.num_channels, v.patch_size
    p = f"{prefix}embeddings.patch_embedding."
    if v.patch_stem == "dwsep":
        return {p + "depthwise.weight": (C, 1, P, P), p + "depthwise.bias": (C,), p + "pointwise.weight": (D, C),
                p + "pointwise.bias": (D,)}
    groups = v.groups if v.patch_stem == "grouped" else 1
    return {p + "weight": (D, C // groups, P, P), p + "bias": (D,)}


def vision_tensor_shapes(v: VisionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    D, I = v.hidden_size, v.intermediate_size
    shapes = stem_tensor_shapes(v, prefix) | {
        f"{prefix}embeddings.position_embedding.weight": (v.patches_per_side**2, D),
        f"{prefix}post_layernorm.weight": (D,), f"{prefix}post_layernorm.bias": (D,),
    }
    for i in range(v.num_hidden_layers):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {p + f"self_attn.{proj}.weight": (D, D), p + f"self_attn.{proj}.bias": (D,)}
        shapes |= {p + "mlp.fc1.weight": (I, D), p + "mlp.fc1.bias": (I,), p + "mlp.fc2.weight": (D, I),
                   p + "mlp.fc2.bias": (D,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {p + f"{norm}.weight": (D,), p + f"{norm}.bias": (D,)}
    return shapes


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must contain, Hugging Face name -> shape."""
    t = config.text
    if not config.is_vlm:
        shapes = text_tensor_shapes(t, config.text_prefix)
    else:
        v = config.vision
        shapes = text_tensor_shapes(t, config.text_prefix) | vision_tensor_shapes(v, "model.vision_model.")
        shapes["model.connector.modality_projection.proj.weight"] = (t.hidden_size, v.hidden_size * config.scale_factor**2)
        shapes |= cross_tensor_shapes(t, len(config.cross_attention_layers), config.text_prefix)
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    if t.architecture == "phi":
        shapes["lm_head.bias"] = (t.vocab_size,)
    return shapes


def check_tensor(name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]], source: str) -> None:
    if name in expected and tuple(shape) != expected[name]:
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(shape)}, the config needs {expected[name]}")


def check_complete(seen: set[str], expected: dict[str, tuple[int, ...]], source: str) -> None:
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
