"""Loading a checkpoint into the PyTorch model (models/smolvlm_torch.py): Hugging Face tensor names mapped onto
its parameters (q/k/v and gate/up fused into one), every name and shape checked against the config."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import ModelConfig
from ..formats.layout import check_complete, check_tensor, tensor_shapes
from .smolvlm_torch import SmolVLM


def parameter_for(hf_name: str, config: ModelConfig):
    """Map a Hugging Face tensor name to (our parameter name, part index in a fused parameter or None)."""
    text_prefix = config.text_prefix
    fused = {"self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1),
             "self_attn.v_proj": ("qkv_proj", 2), "mlp.gate_proj": ("gate_up_proj", 0),
             "mlp.up_proj": ("gate_up_proj", 1), "self_attn.o_proj": ("o_proj", None),
             "mlp.down_proj": ("down_proj", None)}
    vision_fused = {"self_attn.q_proj": ("qkv", 0), "self_attn.k_proj": ("qkv", 1), "self_attn.v_proj": ("qkv", 2),
                    "self_attn.out_proj": ("out_proj", None), "mlp.fc1": ("fc1", None), "mlp.fc2": ("fc2", None)}
    renames = {"model.vision_model.embeddings.patch_embedding.weight": "vision.patch_weight",
               "model.vision_model.embeddings.patch_embedding.bias": "vision.patch_bias",
               "model.vision_model.embeddings.position_embedding.weight": "vision.position_embedding",
               "model.connector.modality_projection.proj.weight": "connector.weight",
               f"{text_prefix}norm.weight": "text.norm", "lm_head.weight": "lm_head.weight",
               f"{text_prefix}embed_tokens.weight": "text.embed_tokens.weight",
               "lm_head.bias": "lm_head_bias" if config.text.tie_word_embeddings else "lm_head.bias"}
    stem = "model.vision_model.embeddings.patch_embedding."
    renames |= {f"{stem}depthwise.weight": "vision.dw_weight", f"{stem}depthwise.bias": "vision.dw_bias",
                f"{stem}pointwise.weight": "vision.pw_weight", f"{stem}pointwise.bias": "vision.pw_bias"}
    phi = config.text.architecture == "phi"
    if phi:  # Phi-2's names for the same products
        fused |= {"self_attn.dense": ("o_proj", None), "mlp.fc1": ("fc1", None), "mlp.fc2": ("fc2", None)}
    if hf_name in renames:
        return renames[hf_name], None
    if hf_name.startswith("model.vision_model."):
        name = hf_name.removeprefix("model.vision_model.").replace("encoder.layers.", "layers.")
        table, prefix = vision_fused, "vision."
    elif hf_name.startswith(text_prefix):
        name, table, prefix = hf_name.removeprefix(text_prefix), fused, "text."
        if name.endswith("layernorm.weight") and (not phi or name.startswith("cross_layers.")):  # RMSNorm weights
            return prefix + name.removesuffix(".weight"), None
    else:
        return None, None
    for hf_part, (ours, part) in table.items():
        if f".{hf_part}." in f".{name}":
            return prefix + name.replace(hf_part, ours), part
    return prefix + name, None


def load_weights(model: SmolVLM, tensors: Iterable[tuple[str, object]], source: str) -> None:
    """Copy (hf_name, tensor) pairs into the model, checking names and shapes against the config."""
    expected = tensor_shapes(model.config)
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for hf_name, tensor in tensors:
            if hf_name not in expected:
                continue  # e.g. rotary inv_freq buffers or a tied lm_head copy
            tensor = torch.as_tensor(tensor)
            check_tensor(hf_name, tuple(tensor.shape), expected, source)
            name, part = parameter_for(hf_name, model.config)
            target = params[name]
            if part is not None:
                size = tensor.shape[0]
                offsets = _fused_offsets(model, name)
                target = target[offsets[part]:offsets[part] + size]
            target.copy_(tensor.to(target.dtype))
            seen.add(hf_name)
    check_complete(seen, expected, source)


def _fused_offsets(model: SmolVLM, name: str) -> list[int]:
    if name.startswith("vision."):
        D = model.config.vision.hidden_size
        return [0, D, 2 * D]
    t = model.config.text
    if "gate_up_proj" in name:
        return [0, t.intermediate_size]
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return [0, q, q + kv]


def build_model(config: ModelConfig, tensors, source: str, device="cpu", dtype=torch.float32) -> SmolVLM:
    """An empty model on `device` in `dtype`, filled from (hf_name, tensor) pairs."""
    with torch.device("meta"):
        model = SmolVLM(config)
    model = model.to_empty(device=device).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    load_weights(model, tensors, source)
    return model.eval()

