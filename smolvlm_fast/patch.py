"""`smolvlm_fast.patch(hf_model)`: our ops inside a loaded transformers SmolVLM / Idefics3 / Llama model, which keeps
its own generate(), cache (DynamicCache or StaticCache) and weights.

    model = AutoModelForImageTextToText.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")
    smolvlm_fast.patch(model)            # linear=True: the decoder's Linear layers in int4 too
    model.generate(**inputs)

What changes, from outside the model classes:
- attention, text and vision, goes through an attention function registered with transformers' AttentionInterface
  (and its mask function with AttentionMaskInterface) and selected with set_attn_implementation: prefill runs
  ops.rope_attention, steps with cached keys run ops.paged_attention over the cache transformers hands in (each batch
  row one block, or one block per key where left padding leaves holes). A mask of another shape (sliding windows,
  custom masks) runs transformers' SDPA, with a warning;
- RMSNorm, LayerNorm and the MLPs' activations (SiLU-and-multiply, tanh GELU) run ops.rms_norm, ops.layer_norm,
  ops.silu_and_mul and ops.gelu_tanh (the modules' forward is replaced; their classes and parameters stay);
- linear=True swaps the decoder layers' nn.Linear for int4_linear.Int4Linear (round-to-nearest int4, group 64).

The patched model stays a torch model (torch tensors in and out, on the CPU our ops' PyTorch references): on the
CPU the faster path is the import change (`from smolvlm_fast import AutoModelForVision2Seq`), which runs the
NumPy + C++ backend and still returns torch tensors for torch inputs. On the CPU patch() also lowers torch's
threads to the CPUs this process may run on, unless they are the user's (engine/threads.py).

RoPE stays where transformers applies it (before its cache update): the cache holds rotated keys, as ours does, and
the attention function receives rotated queries and keys. Importing this module imports neither torch nor
transformers; patch() does.
"""
from __future__ import annotations

import warnings
from types import MethodType

from . import ops
from .errors import InputError

ATTENTION = "smolvlm_fast"
MODEL_TYPES = ("llama", "idefics3", "smolvlm")
RMS_NORMS = ("LlamaRMSNorm", "Idefics3RMSNorm")
GATED_MLPS = ("LlamaMLP",)
VISION_MLPS = ("Idefics3VisionMLP", "SmolVLMVisionMLP")
DECODER_LAYERS = ("LlamaDecoderLayer",)


def patch(hf_model, *, linear: bool = False):
    """Route hf_model's attention, norms and activations (and with linear=True its decoder's Linear layers, in int4)
    through smolvlm_fast; in place, and returns hf_model. Patching twice changes nothing more."""
    check_supported(hf_model)
    register_attention()
    hf_model.set_attn_implementation(ATTENTION)
    if hf_model.config._attn_implementation != ATTENTION:
        raise InputError(f"{type(hf_model).__name__} did not take the {ATTENTION!r} attention implementation")
    for module in hf_model.modules():
        name = type(module).__name__
        if name in RMS_NORMS:
            module.forward = MethodType(rms_norm_forward, module)
        elif name == "LayerNorm" and getattr(module, "weight", None) is not None:
            module.forward = MethodType(layer_norm_forward, module)
        elif name in GATED_MLPS and module.config.hidden_act == "silu":
            module.forward = MethodType(gated_mlp_forward, module)
        elif name in VISION_MLPS and module.config.hidden_act == "gelu_pytorch_tanh":
            module.forward = MethodType(vision_mlp_forward, module)
    if linear:
        quantize_decoder(hf_model)
    if all(p.device.type == "cpu" for p in hf_model.parameters()):
        from .engine.threads import size_torch_threads
        size_torch_threads()
    return hf_model


def check_supported(hf_model) -> None:
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not hasattr(hf_model, "set_attn_implementation") or model_type is None:
        raise InputError(f"smolvlm_fast.patch takes a loaded transformers model, got {type(hf_model).__name__}")
    text_type = getattr(getattr(config, "text_config", None), "model_type", "llama")
    if model_type not in MODEL_TYPES or text_type != "llama":
        raise InputError(f"smolvlm_fast.patch supports SmolVLM, Idefics3 and Llama models (model_type "
                         f"{', '.join(MODEL_TYPES)}); got {type(hf_model).__name__} with model_type {model_type!r}"
                         + (f" and a {text_type!r} text model" if text_type != "llama" else ""))


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # boolean masks, None where plain causal


# ---------------------------------------------------------------- norms and MLPs (a module's forward, self = module)

def rms_norm_forward(self, x):
    return ops.rms_norm(x, self.weight, self.variance_epsilon)


def layer_norm_forward(self, x):
    return ops.layer_norm(x, self.weight, self.bias, self.eps)


def gated_mlp_forward(self, x):
    import torch
    gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)  # [..., 2I]
    return self.down_proj(ops.silu_and_mul(gate_up))


def vision_mlp_forward(self, x):
    return self.fc2(ops.gelu_tanh(self.fc1(x)))


# ---------------------------------------------------------------- attention

def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                      **kwargs):
    """transformers' attention-function contract: query [B, Hq, Sq, Dh], key/value [B, Hkv, Sk, Dh] (RoPE applied,
    cached keys first), attention_mask bool [B, 1, Sq, Sk] (True: attend) or None -> ([B, Sq, Hq, Dh], None)."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, Dh]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    keep = None if attention_mask is None else as_keep_mask(attention_mask, q.shape[0], k.shape[1])
    out = None
    if not (dropout and module.training) and (attention_mask is None or keep is not None):
        out = attend(q, k, v, keep, causal, scaling)
    if out is None:
        return sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, is_causal, **kwargs)
    return out, None


def attend(q, k, v, keep, causal: bool, scale):
    """Our ops where the mask has a shape they take, else None. keep [B, Sq, Sk] bool or None (None: transformers'
    SDPA semantics, causal from the top-left corner when Sq > 1)."""
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    if keep is None:
        if Sq == Sk:  # a prefill, or the vision encoder
            return ops.rope_attention(q, k, v, causal=causal and Sq > 1, scale=scale)
        if not causal:
            return ops.cross_attention(q, k, v, scale=scale)
        if Sq == 1:  # a decode step over the cache
            return paged(q, k, v, None, scale)
        return ops.rope_attention(q, k[:, :Sq], v[:, :Sq], causal=True, scale=scale)  # into an empty static cache
    import torch

    keys = keep[:, -1]  # [B, Sk] the keys the last query sees: all of its row's keys for the masks below
    all_keys = bool(keys.all())
    if Sq == Sk:
        causal_mask = torch.ones(Sq, Sk, dtype=torch.bool, device=keep.device).tril()
        for is_causal, expected in ((True, causal_mask & keys[:, None]), (False, keys[:, None].expand(B, Sq, Sk))):
            if torch.equal(keep, expected):
                out = ops.rope_attention(q, k, v, causal=is_causal, scale=scale, key_mask=None if all_keys else keys)
                return zero_empty_rows(out, keep)
    if torch.equal(keep, paged_mask(keys, Sq)):
        return zero_empty_rows(paged(q, k, v, None if all_keys else keys, scale), keep)
    return None


def paged_mask(keys, Sq: int):
    """[B, Sk] keys -> [B, Sq, Sk]: query j of a row with n keys sees the first n - Sq + j + 1 of them (the paged
    cache's rule: the last Sq keys are the queries' own tokens)."""
    import torch

    rank = keys.long().cumsum(-1) - 1  # [B, Sk] the index of each kept key among its row's keys
    last = keys.sum(-1, keepdim=True) - Sq + torch.arange(Sq, device=keys.device)  # [B, Sq] the last key j sees
    return keys[:, None, :] & (rank[:, None, :] <= last[:, :, None])


def paged(q, k, v, keys, scale):
    """q [B, Sq, Hq, Dh] over k/v [B, Sk, Hkv, Dh] through ops.paged_attention: a row is one block of Sk tokens, or,
    where keys [B, Sk] leaves some out (left padding), a block per token and a block table of the kept ones."""
    import torch

    B, Sq, Hq, Dh = q.shape
    Sk, device = k.shape[1], q.device
    if keys is None:
        k_cache, v_cache = k.contiguous(), v.contiguous()  # [B blocks, Sk, Hkv, Dh]
        block_tables = torch.arange(B, dtype=torch.int32, device=device)[:, None]
        seq_lens = torch.full((B,), Sk, dtype=torch.int32, device=device)
    else:
        k_cache, v_cache = k.reshape(B * Sk, 1, *k.shape[2:]), v.reshape(B * Sk, 1, *v.shape[2:])  # a block per key
        order = keys.int().argsort(dim=-1, descending=True, stable=True)  # [B, Sk] kept keys first, in order
        block_tables = (order + Sk * torch.arange(B, device=device)[:, None]).int()
        seq_lens = keys.sum(-1).int()
    query_start_loc = torch.arange(0, B * Sq + 1, Sq, dtype=torch.int32, device=device)
    out = ops.paged_attention(q.reshape(B * Sq, Hq, Dh), k_cache, v_cache, block_tables, seq_lens,
                              query_start_loc=query_start_loc, scale=scale)  # [B*Sq, Hq, Dh]
    return out.view(B, Sq, Hq, Dh)


def zero_empty_rows(out, keep):
    """Queries that see no key (left padding in a prefill) -> 0, as SDPA gives them."""
    empty = ~keep.any(-1)  # [B, Sq]
    return out.masked_fill(empty[:, :, None, None], 0) if bool(empty.any()) else out


def as_keep_mask(mask, B: int, Sk: int):
    """transformers' 4-D mask (bool, or additive float: 0 keeps, the dtype's minimum drops) -> [B, Sq, Sk] bool, or
    None where it is not one per row (heads that differ, or bias values)."""
    import torch

    if mask.dim() != 4:
        return None
    mask = mask[..., :Sk]
    if mask.dtype != torch.bool:
        drop = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | drop).all()):
            return None
        mask = ~drop
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        return None
    return mask[:, 0].expand(B, -1, -1)


_warned: set[str] = set()


def sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = type(module).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"smolvlm_fast.patch: {name} got an attention mask our kernels do not take (or runs with "
                      "dropout); it runs transformers' SDPA", stacklevel=2)
    if is_causal is not None:
        kwargs["is_causal"] = is_causal
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


# ---------------------------------------------------------------- int4 Linear layers

def quantize_decoder(hf_model) -> None:
    """Every nn.Linear inside the decoder layers -> Int4Linear (K a multiple of 32; other layers stay float)."""
    from torch import nn

    from .models.int4_linear import Int4Linear

    for layer in [m for m in hf_model.modules() if type(m).__name__ in DECODER_LAYERS]:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear) and module.in_features % 32 == 0:
                layer.set_submodule(name, Int4Linear.from_weight(module.weight, module.bias))
