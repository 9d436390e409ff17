"""tests/xattn_reference.py against anchors that do not share its code: transformers' Mllama cross-attention layer,
Llama / Phi-3 / Phi decoders (with the cross layers hooked in after the listed layers), the Idefics3 vision
transformer and connector, and F.conv2d. Weights and inputs are fresh random draws each run, from the `seed`
fixture (tests/conftest_seed.py, which seeds torch with it; the seed is in every failure message). Tolerances, fp32:
1e-5 on one layer, 1e-4 on logits (the same sums in another order through up to ~10 layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM
from transformers.models.idefics3.configuration_idefics3 import Idefics3Config, Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer
from transformers.models.mllama.configuration_mllama import MllamaTextConfig
from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

from tests.xattn_reference import CONNECTOR, T, V, XAttnReference, pixel_shuffle, random_tensors

STEM = V + "embeddings.patch_embedding."


def make_config(arch="llama", stem="conv", partial=0.5, tie=False, cross=(0, 2), scale=2, image_size=32, groups=3):
    return {
        "model_type": "smolvlm_fast_xattn",
        "vision_config": {
            "image_size": image_size, "patch_size": 8, "num_channels": 3, "patch_stem": stem,
            "groups": groups if stem == "grouped" else 1, "hidden_size": 48, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 3, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
        },
        "text_config": {
            "architecture": arch, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "partial_rotary_factor": partial, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "layer_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": tie,
        },
        "cross_attention_layers": list(cross),
        "scale_factor": scale,
        "image_token_id": 290,
        "eos_token_id": 299,
    }


def close(a: torch.Tensor, b: torch.Tensor, tol: float, seed: int):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs error {err:.3g} > {tol} (seed {seed})"


def differ(a: torch.Tensor, b: torch.Tensor, seed: int, rel: float = 1e-3):  # far above fp32 noise (~1e-6)
    gap = (a - b).abs().max().item()
    assert gap > rel * b.abs().max().item(), f"outputs differ by only {gap:.3g} (seed {seed})"


# --- anchors built from transformers, with our weights ---

def strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def hf_cross_layer(config: dict, tensors: dict, j: int) -> MllamaCrossAttentionDecoderLayer:
    tc = config["text_config"]
    mc = MllamaTextConfig(hidden_size=tc["hidden_size"], num_attention_heads=tc["num_attention_heads"],
                          num_key_value_heads=tc["num_key_value_heads"], intermediate_size=tc["intermediate_size"],
                          rms_norm_eps=tc["rms_norm_eps"])
    assert mc.hidden_size // mc.num_attention_heads == tc["head_dim"]  # Mllama's head_dim
    mc._attn_implementation = "eager"
    layer = MllamaCrossAttentionDecoderLayer(mc, layer_idx=j).eval()
    layer.load_state_dict(strip(tensors, f"{T}cross_layers.{j}."), strict=True)
    return layer


def run_hf_cross(layer, hidden, images):
    return layer(hidden, cross_attention_states=images, cross_attention_mask=None, attention_mask=None,
                 full_text_row_masked_out_mask=None)


def hf_text_model(config: dict, tensors: dict):
    """Llama (full rotary) -> LlamaForCausalLM, Llama (partial rotary) -> Phi3ForCausalLM (the same block, fused
    qkv and gate_up), Phi -> PhiForCausalLM; the weights renamed from our layout."""
    tc = config["text_config"]
    common = dict(vocab_size=tc["vocab_size"], hidden_size=tc["hidden_size"], intermediate_size=tc["intermediate_size"],
                  num_hidden_layers=tc["num_hidden_layers"], num_attention_heads=tc["num_attention_heads"],
                  num_key_value_heads=tc["num_key_value_heads"], max_position_embeddings=tc["max_position_embeddings"],
                  tie_word_embeddings=tc["tie_word_embeddings"], pad_token_id=0, bos_token_id=None, eos_token_id=None)
    rope = {"rope_type": "default", "rope_theta": tc["rope_theta"],
            "partial_rotary_factor": tc["partial_rotary_factor"]}
    sd = {("model." + k[len(T):] if k.startswith(T) else k): v for k, v in tensors.items()
          if not k.startswith((V, "model.connector", T + "cross_layers"))}
    if tc["tie_word_embeddings"]:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if tc["architecture"] == "phi":
        hf = PhiForCausalLM(PhiConfig(**common, layer_norm_eps=tc["layer_norm_eps"], hidden_act="gelu_new",
                                      qk_layernorm=False, rope_parameters=rope))
    elif tc["partial_rotary_factor"] == 1.0:
        del rope["partial_rotary_factor"]
        hf = LlamaForCausalLM(LlamaConfig(**common, head_dim=tc["head_dim"], rms_norm_eps=tc["rms_norm_eps"],
                                          rope_parameters=rope))
    else:
        assert tc["hidden_size"] // tc["num_attention_heads"] == tc["head_dim"]  # Phi-3's head_dim
        hf = Phi3ForCausalLM(Phi3Config(**common, rms_norm_eps=tc["rms_norm_eps"], rope_parameters=rope))
        for i in range(tc["num_hidden_layers"]):
            p = f"model.layers.{i}."
            sd[p + "self_attn.qkv_proj.weight"] = torch.cat([sd.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv"])
            sd[p + "mlp.gate_up_proj.weight"] = torch.cat([sd.pop(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up")])
    hf.config._attn_implementation = "eager"
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def plain_conv_kernel(config: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Any stem as one dense P x P conv: grouped -> block-diagonal kernel; dwsep -> W[d, c] = pw[d, c] * dw[c]."""
    vc = config["vision_config"]
    C, D = vc["num_channels"], vc["hidden_size"]
    if vc["patch_stem"] == "conv":
        return tensors[STEM + "weight"], tensors[STEM + "bias"]
    if vc["patch_stem"] == "grouped":
        w, g = tensors[STEM + "weight"], vc["groups"]
        dense = torch.zeros(D, C, *w.shape[2:])
        for i in range(g):
            rows, cols = slice(i * D // g, (i + 1) * D // g), slice(i * C // g, (i + 1) * C // g)
            dense[rows, cols] = w[rows]
        return dense, tensors[STEM + "bias"]
    dw, dwb = tensors[STEM + "depthwise.weight"], tensors[STEM + "depthwise.bias"]
    pw, pwb = tensors[STEM + "pointwise.weight"], tensors[STEM + "pointwise.bias"]
    return pw[:, :, None, None] * dw[:, 0][None], pw @ dwb + pwb


def hf_image_states(config: dict, tensors: dict, pixels: torch.Tensor) -> torch.Tensor:
    """Idefics3's vision transformer (its conv stem given the equivalent dense kernel) and connector."""
    vc, tc = config["vision_config"], config["text_config"]
    keys = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "layer_norm_eps", "hidden_act")
    vcfg = Idefics3VisionConfig(**{k: vc[k] for k in keys})
    vcfg._attn_implementation = "eager"
    vit = Idefics3VisionTransformer(vcfg).eval()
    sd = {k: v for k, v in strip(tensors, V).items() if not k.startswith("embeddings.patch_embedding.")}
    sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"] = plain_conv_kernel(config, tensors)
    vit.load_state_dict(sd, strict=True)
    connector = Idefics3Connector(Idefics3Config(vision_config=vc, text_config={"hidden_size": tc["hidden_size"]},
                                                 scale_factor=config["scale_factor"])).eval()
    connector.load_state_dict({"modality_projection.proj.weight": tensors[CONNECTOR]}, strict=True)
    return connector(vit(pixels).last_hidden_state).reshape(-1, tc["hidden_size"])


def with_cross_hooks(hf, config: dict, tensors: dict, images: torch.Tensor) -> list:
    """Hook Mllama cross layer j onto the output of decoder layer cross_attention_layers[j]."""
    handles = []
    for j, layer in enumerate(config["cross_attention_layers"]):
        cross = hf_cross_layer(config, tensors, j)
        hook = lambda mod, args, out, cross=cross: run_hf_cross(cross, out, images.expand(out.shape[0], -1, -1))
        handles.append(hf.model.layers[layer].register_forward_hook(hook))
    return handles


# --- tests ---

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-5)])
def test_cross_layer_matches_mllama(seed, dtype, tol):
    config = make_config()
    tensors = random_tensors(config, seed)
    ref = XAttnReference(config, tensors, dtype)
    layer = hf_cross_layer(config, tensors, 1).to(dtype)
    hidden, images = torch.randn(2, 5, 64, dtype=dtype), torch.randn(2, 7, 64, dtype=dtype)  # GQA: 4 heads on 2
    with torch.no_grad():
        expected = run_hf_cross(layer, hidden, images)
    got = ref.cross_layer(1, hidden, images)
    close(got, expected, tol, seed)
    differ(got, hidden, seed)  # the layer is not the identity
    differ(got, ref.cross_layer(1, hidden, images.flip(1)[:, :4]), seed)  # ... and reads the images


@pytest.mark.parametrize("arch,partial,tie", [("llama", 1.0, False), ("llama", 0.5, True), ("phi", 0.5, False),
                                              ("phi", 0.25, True)])
def test_text_only_matches_transformers(seed, arch, partial, tie):
    config = make_config(arch, partial=partial, tie=tie)
    tensors = random_tensors(config, seed)
    ids = torch.randint(0, 300, (11,)).tolist()
    hf = hf_text_model(config, tensors)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = XAttnReference(config, tensors).logits(ids)
    close(got, expected, 1e-4, seed)


def test_partial_rotary_matters(seed):
    ids = torch.randint(0, 300, (9,)).tolist()
    full, half = make_config(partial=1.0), make_config(partial=0.5)
    tensors = random_tensors(full, seed)
    differ(XAttnReference(half, tensors).logits(ids), XAttnReference(full, tensors).logits(ids), seed, rel=1e-3)


@pytest.mark.parametrize("arch,stem,cross,partial", [("llama", "conv", (0, 2), 0.5), ("llama", "dwsep", (1,), 1.0),
                                                     ("phi", "grouped", (0, 1, 2), 0.5), ("phi", "dwsep", (2,), 0.5)])
def test_with_images_matches_transformers(seed, arch, stem, cross, partial):
    """Images through Idefics3's encoder + connector, cross layers through Mllama's layer hooked after the listed
    decoder layers (the last one before the final norm), the text through Llama / Phi-3 / Phi."""
    config = make_config(arch, stem, partial=partial, cross=cross)
    tensors = random_tensors(config, seed)
    ref = XAttnReference(config, tensors)
    pixels = torch.randn(2, 3, 32, 32)
    ids = [290, 290] + torch.randint(0, 290, (8,)).tolist()
    with torch.no_grad():
        images = hf_image_states(config, tensors, pixels)
        close(ref.image_states(pixels), images, 1e-4, seed)
        assert images.shape == (2 * 4, 64)
        hf = hf_text_model(config, tensors)
        handles = with_cross_hooks(hf, config, tensors, images[None])
        expected = hf(torch.tensor([ids])).logits[0]
        expected_greedy = []  # the whole sequence again at every step: the cross hooks see full sequences only
        for _ in range(6):
            expected_greedy.append(int(hf(torch.tensor([ids + expected_greedy])).logits[0, -1].argmax()))
    for h in handles:
        h.remove()
    close(ref.logits(ids, pixels), expected, 1e-4, seed)
    same_greedy_but_for_ties(ref, ids, pixels, expected_greedy, seed)


def same_greedy_but_for_ties(ref, ids, pixels, expected: list[int], seed: int) -> None:
    """Greedy tokens equal, unless they part where the reference's two best logits are within 1e-4 of each other
    (float32 rounding may then pick either; with random weights that happens about once in 60 seeds)."""
    got = ref.greedy(ids, pixels, max_new_tokens=len(expected))
    if got == expected:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    logits = ref.logits(ids + got[:i], pixels)[-1]
    best, second = logits.topk(2).values.tolist()
    assert best - second <= 1e-4 * max(1.0, logits.abs().max().item()), \
        f"seed {seed}: greedy tokens part at step {i} without a near-tie ({got} vs {expected})"


def test_vision_encoder_matches_idefics3_224(seed):
    config = make_config(image_size=224, scale=1)
    config["vision_config"] |= {"patch_size": 16, "num_hidden_layers": 1}
    tensors = random_tensors(config, seed)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = hf_image_states(config, tensors, pixels)
    close(XAttnReference(config, tensors).image_states(pixels), expected, 1e-4, seed)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_pixel_shuffle_matches_idefics3(seed, s):
    x = torch.randn(3, 64, 5)
    assert torch.equal(pixel_shuffle(x, s), Idefics3Connector.pixel_shuffle(None, x, s))


@pytest.mark.parametrize("stem", ["conv", "grouped", "dwsep"])
def test_stem_matches_conv2d(seed, stem):
    config = make_config(stem=stem)
    tensors = random_tensors(config, seed)
    pixels = torch.randn(2, 3, 32, 32)
    w = {k[len(STEM):]: v for k, v in tensors.items() if k.startswith(STEM)}
    if stem == "conv":
        direct = F.conv2d(pixels, w["weight"], w["bias"], stride=8)
    elif stem == "grouped":
        direct = F.conv2d(pixels, w["weight"], w["bias"], stride=8, groups=3)
    else:
        depth = F.conv2d(pixels, w["depthwise.weight"], w["depthwise.bias"], stride=8, groups=3)
        direct = F.conv2d(depth, w["pointwise.weight"][:, :, None, None], w["pointwise.bias"])
    direct = direct.flatten(2).transpose(1, 2)  # [N, patches row-major, D]
    got = XAttnReference(config, tensors).patch_embed(pixels)
    close(got, direct, 1e-5, seed)
    dense_w, dense_b = plain_conv_kernel(config, tensors)  # the same map as one dense conv
    close(got, F.conv2d(pixels, dense_w, dense_b, stride=8).flatten(2).transpose(1, 2), 1e-5, seed)


def test_dwsep_differs_from_plain_conv(seed):
    """Depthwise means per channel: running the depthwise kernels as a dense conv (every channel mixed) differs."""
    config = make_config(stem="dwsep")
    tensors = random_tensors(config, seed)
    pixels = torch.randn(2, 3, 32, 32)
    dw, dwb = tensors[STEM + "depthwise.weight"], tensors[STEM + "depthwise.bias"]
    mixed = F.conv2d(pixels, dw.expand(3, 3, 8, 8), dwb, stride=8).flatten(2).transpose(1, 2)
    mixed = mixed @ tensors[STEM + "pointwise.weight"].T + tensors[STEM + "pointwise.bias"]
    differ(XAttnReference(config, tensors).patch_embed(pixels), mixed, seed, rel=0.1)


def test_grouped_stem_keeps_groups_apart(seed):
    config = make_config(stem="grouped")
    ref = XAttnReference(config, random_tensors(config, seed))
    pixels = torch.randn(1, 3, 32, 32)
    bumped = pixels.clone()
    bumped[:, 2] += 1.0  # channel 2 feeds only group 2: features 32..47
    delta = (ref.patch_embed(bumped) - ref.patch_embed(pixels)).abs().amax((0, 1))
    assert delta[:32].max() == 0 and delta[32:].min() > 0, f"seed {seed}"


def test_images_change_the_logits(seed):
    config = make_config(cross=(1,))
    ref = XAttnReference(config, random_tensors(config, seed))
    ids = [290] + torch.randint(0, 290, (7,)).tolist()
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    none = ref.logits(ids)
    with_a = ref.logits(ids, a)
    differ(with_a, none, seed)
    differ(with_a, ref.logits(ids, b), seed)
    close(ref.logits(ids, torch.zeros(0, 3, 32, 32)), none, 0.0, seed)  # zero images: the cross layers skipped
    close(with_a[:1], ref.logits(ids[:1], a), 1e-5, seed)  # still causal over the text
    differ(with_a[:1], none[:1], seed)  # the first token already sees the image


def test_fp32_close_to_fp64(seed):
    config = make_config("phi", "dwsep")
    tensors = random_tensors(config, seed)
    ids = [290] + torch.randint(0, 290, (9,)).tolist()
    pixels = torch.randn(1, 3, 32, 32)
    lo = XAttnReference(config, tensors, torch.float32).logits(ids, pixels)
    hi = XAttnReference(config, tensors, torch.float64).logits(ids, pixels)
    assert hi.dtype == torch.float64
    close(lo, hi, 1e-5, seed)


def test_bad_checkpoint_is_named(seed):
    config = make_config()
    tensors = random_tensors(config, seed)
    del tensors[T + "cross_layers.1.cross_attn_mlp_gate"]
    with pytest.raises(ValueError, match="cross_layers.1.cross_attn_mlp_gate"):
        XAttnReference(config, tensors)
    tensors = random_tensors(config, seed)
    tensors[T + "layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match="k_proj"):
        XAttnReference(config, tensors)
