"""int4 weights on the PyTorch path: the packed tensors on the device, the module that stands in for nn.Linear,
and the functions that swap it in from outside the model (gpt-fast's style: the model classes know nothing of it).

The format is int4.Int4Weight's (layout in smolvlm_fast/formats/int4.py), moved to torch with torch.from_numpy: the
NumPy quantizer and the GGUF Q4_0 / Q4_1 conversion are the only producers, so both backends hold the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import ops
from ..formats import int4

DECODER_PREFIX = "text.layers."           # qkv_proj, o_proj, gate_up_proj, down_proj of every decoder layer
VISION_PREFIXES = ("vision.", "connector")  # the SigLIP layers' qkv, out_proj, fc1, fc2 and the connector


@dataclass(frozen=True)
class Int4Tensors:
    """An int4 weight as torch tensors (int4.Int4Weight's fields and layout): what ops.int4_gemm takes."""
    N: int
    K: int
    group_size: int
    symmetric: bool
    qweight: torch.Tensor             # uint8 [N, K // 2]
    scales: torch.Tensor              # float16 [N, K // group_size]
    mins: torch.Tensor | None = None  # float16 [N, K // group_size]; None when symmetric

    @classmethod
    def from_numpy(cls, w: int4.Int4Weight, device=None) -> "Int4Tensors":
        def move(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return cls(w.N, w.K, w.group_size, w.symmetric, move(w.qweight), move(w.scales), move(w.mins))

    def to_numpy(self) -> int4.Int4Weight:
        def back(t):
            return None if t is None else np.ascontiguousarray(t.detach().cpu().numpy())
        return int4.Int4Weight(self.N, self.K, self.group_size, self.symmetric, back(self.qweight),
                                back(self.scales), back(self.mins))


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W int4; x [..., K] in any float dtype, y in x's dtype (ops.int4_gemm)."""

    def __init__(self, weight: Int4Tensors, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.K, weight.N
        self.group_size, self.symmetric = weight.group_size, weight.symmetric
        self.register_buffer("qweight", weight.qweight)
        # the fp16 scales and mins kept as their bits: model.to(dtype) casts float buffers and must not round these
        self.register_buffer("scales", weight.scales.view(torch.int16))
        self.register_buffer("mins", None if weight.mins is None else weight.mins.view(torch.int16))
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None,
                    symmetric: bool = False) -> "Int4Linear":
        """Round-to-nearest int4 of a float weight [N, K] (int4.quantize_int4), on the weight's device."""
        w = int4.quantize_int4(weight.detach().float().cpu().numpy(),
                                group_size=group_size or default_group_size(weight.shape[1]), symmetric=symmetric)
        return cls(Int4Tensors.from_numpy(w, weight.device), None if bias is None else bias.detach().clone())

    @property
    def weight_int4(self) -> Int4Tensors:
        mins = None if self.mins is None else self.mins.view(torch.float16)
        return Int4Tensors(self.out_features, self.in_features, self.group_size, self.symmetric, self.qweight,
                           self.scales.view(torch.float16), mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int4_gemm(x.reshape(-1, self.in_features), self.weight_int4, self.bias)  # [M, N]
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, " \
               f"{kind}, bias={self.bias is not None}"


def default_group_size(K: int) -> int:
    """64, or 32 where 64 does not divide K (the NumPy backend's rule, so both quantize to the same bits)."""
    return 64 if K % 64 == 0 else 32


def quantize_model(model: nn.Module, *, group_size: int | None = None, symmetric: bool = False,
                   vision: bool = False, lm_head: bool = False,
                   prequantized: dict[str, int4.Int4Weight] | None = None) -> nn.Module:
    """Swap the decoder's nn.Linear layers (smolvlm_torch.SmolVLM: the fused qkv_proj and gate_up_proj, o_proj,
    down_proj) for Int4Linear, in place; with vision=True the vision encoder's and the connector's too, with
    lm_head=True the output projection (for tied embeddings a separate int4 copy; the embedding stays float).

    group_size None: 64, or 32 where K % 64 != 0; a given size where it divides K, else the same fallback. Layers
    whose K is not a multiple of 32 stay float. prequantized maps module names to int4 weights used as they are
    (GGUF Q4 blocks), instead of quantizing the module's float weight."""
    prequantized = prequantized or {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        selected = name.startswith(DECODER_PREFIX) or (vision and name.startswith(VISION_PREFIXES)) \
            or (lm_head and name == "lm_head")
        if not selected:
            continue
        K = module.in_features
        if name in prequantized:
            bias = None if module.bias is None else module.bias.detach().clone()
            new = Int4Linear(Int4Tensors.from_numpy(prequantized[name], module.weight.device), bias)
        elif K % 32 == 0:
            new = Int4Linear.from_weight(module.weight, module.bias, _group_for(K, group_size), symmetric)
        else:
            continue
        model.set_submodule(name, new)
    if lm_head and getattr(model, "lm_head", None) is None:  # tied: quantize a copy of the embedding
        embedding = model.text.embed_tokens.weight  # [V, D]
        model.lm_head = Int4Linear.from_weight(embedding, None, _group_for(embedding.shape[1], group_size), symmetric)
    return model


def _group_for(K: int, group_size: int | None) -> int:
    return group_size if group_size and K % group_size == 0 else default_group_size(K)


# ---------------------------------------------------------------- GGUF Q4 checkpoints


def load_gguf_int4(path: str | Path, device="cpu", dtype=torch.float32, *, vision: bool = False,
                   lm_head: bool = False):
    """A GGUF checkpoint on the torch backend with its Q4_0 / Q4_1 decoder weights kept as they are (lossless,
    group 32; q/k/v and gate/up blocks stacked into the fused layers), other decoder linears quantized from float.

    The float model is built first with zero placeholders where the int4 layers go (the loader wants
    every tensor), then those layers are swapped: nothing is dequantized and requantized."""
    from ..formats.gguf import load_gguf_weights
    from .loader import build_model

    path = Path(path)
    # Q4_0 / Q4_1 as int4.Int4Weight, Q8_0 as int4.Q8Weight, the rest float32
    config, weights = load_gguf_weights(path, keep_quantized=True)
    packed = fused_int4_weights(weights, config)

    def tensors():
        for name, w in weights.items():
            if _module_of(name, config) in packed:
                yield name, torch.zeros(()).expand(*w.shape)  # placeholder: the layer is swapped below
            else:
                yield name, torch.from_numpy(int4.dequantize(w))

    model = build_model(config, tensors(), str(path), device, dtype)
    return quantize_model(model, lm_head=lm_head, vision=vision, prequantized=packed)


def fused_int4_weights(weights: dict, config) -> dict[str, int4.Int4Weight]:
    """{module name of smolvlm_torch.SmolVLM: int4 weight} for the decoder layers whose every part (q, k and v for
    qkv_proj, gate and up for gate_up_proj) is int4 of one group size and kind, the parts' rows stacked in order."""
    from .loader import parameter_for

    parts: dict[str, dict[int, object]] = {}
    for name, w in weights.items():
        module = _module_of(name, config)
        if module is not None and module.startswith(DECODER_PREFIX):
            parts.setdefault(module, {})[parameter_for(name, config)[1] or 0] = w
    out = {}
    for module, by_part in parts.items():
        ws = [by_part[i] for i in sorted(by_part)]
        first = ws[0]
        if all(isinstance(w, int4.Int4Weight) and (w.K, w.group_size, w.symmetric) ==
               (first.K, first.group_size, first.symmetric) for w in ws):
            out[module] = int4.Int4Weight(
                sum(w.N for w in ws), first.K, first.group_size, first.symmetric,
                np.concatenate([w.qweight for w in ws]), np.concatenate([w.scales for w in ws]),
                None if first.symmetric else np.concatenate([w.mins for w in ws]))
    return out


def _module_of(hf_name: str, config) -> str | None:
    """The smolvlm_torch module a Hugging Face weight name lands in ("text.layers.0.qkv_proj"), or None."""
    from .loader import parameter_for

    name, _ = parameter_for(hf_name, config)
    return name.removesuffix(".weight") if name is not None and name.endswith(".weight") else None
