"""smolvlm_fast.patch(hf_model): a transformers Llama / Idefics3 model with our ops inside keeps its generate() and
its DynamicCache, gives the same greedy tokens (fp32) with logits within 1e-4, really calls our ops, quantizes its
decoder with linear=True as our own backend does, and refuses models it does not know."""
import numpy as np
import pytest
import torch
from PIL import Image

import smolvlm_fast
from smolvlm_fast import InputError, ops
from smolvlm_fast.models.int4_linear import Int4Linear
from smolvlm_fast.patch import attention_forward

from .fixtures import load_hf_processor

NEW_TOKENS = 16
SPIED = ("rope_attention", "paged_attention", "cross_attention", "rms_norm", "layer_norm", "silu_and_mul",
         "gelu_tanh", "int4_gemm")
# fp32 on the CPU: the same math in another order (SDPA's kernels, our reference ops) differs by a few ulps
LOGITS_RTOL = 1e-4


@pytest.fixture
def op_calls(monkeypatch):
    """How many times each smolvlm_fast.ops function ran."""
    calls = dict.fromkeys(SPIED, 0)
    for name in SPIED:
        def spy(*args, _op=getattr(ops, name), _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return calls


def load_llama(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_vlm(path, model_type):
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration
    cls = Idefics3ForConditionalGeneration if model_type == "idefics3" else SmolVLMForConditionalGeneration
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def greedy(model, inputs):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, eos_token_id=None)
    return out.sequences, torch.stack(out.logits)  # [B, S + new], [new, B, vocab]


def assert_same_generation(reference, patched, inputs):
    tokens, logits = greedy(reference, inputs)
    patched_tokens, patched_logits = greedy(patched, inputs)
    assert torch.equal(patched_tokens, tokens)
    assert (patched_logits - logits).abs().max() <= LOGITS_RTOL * logits.abs().max()


def llama_inputs(path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return tokenizer(["Once upon a time there was a little robot", "The sky"], return_tensors="pt", padding=True)


def test_llama_greedy_tokens_identical_through_our_ops(tiny_llama, op_calls):
    reference, patched = load_llama(tiny_llama), smolvlm_fast.patch(load_llama(tiny_llama))
    names = set(patched.state_dict())
    inputs = llama_inputs(tiny_llama)
    assert_same_generation(reference, patched, {"input_ids": inputs["input_ids"][:1]})  # one prompt, no padding
    layers = reference.config.num_hidden_layers
    assert op_calls["rope_attention"] == layers  # the prefill
    assert op_calls["paged_attention"] == layers * (NEW_TOKENS - 1)  # every decode step, over transformers' cache
    assert op_calls["rms_norm"] == (2 * layers + 1) * NEW_TOKENS and op_calls["silu_and_mul"] == layers * NEW_TOKENS
    assert_same_generation(reference, patched, inputs)  # a left-padded batch: masks with holes
    assert names == set(reference.state_dict())  # the same modules and weights, save_pretrained still works
    assert smolvlm_fast.patch(patched) is patched  # patching twice is harmless
    assert_same_generation(reference, patched, inputs)


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_smolvlm_with_an_image_greedy_tokens_identical(model_type, request, op_calls):
    path = request.getfixturevalue(f"tiny_{model_type}")
    processor = load_hf_processor(path, model_type)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    inputs["pixel_attention_mask"][0, -1, :, 40:] = 0  # the last frame padded on the right, as a smaller image
    inputs["pixel_values"][0, -1, :, :, 40:] = 0       # would be: the vision encoder gets a key mask
    reference, patched = load_vlm(path, model_type), smolvlm_fast.patch(load_vlm(path, model_type))
    assert patched.config.text_config._attn_implementation == patched.config.vision_config._attn_implementation
    assert_same_generation(reference, patched, inputs)
    vision_layers = reference.config.vision_config.num_hidden_layers
    assert op_calls["layer_norm"] == 2 * vision_layers + 1 and op_calls["gelu_tanh"] == vision_layers
    assert op_calls["rope_attention"] == vision_layers + reference.config.text_config.num_hidden_layers
    assert op_calls["paged_attention"] > 0 and op_calls["rms_norm"] > 0


def test_linear_true_swaps_the_decoder_linears_for_int4(tiny_llama, op_calls):
    from smolvlm_fast import AutoModelForCausalLM

    patched = smolvlm_fast.patch(load_llama(tiny_llama), linear=True)
    layers = patched.model.layers
    assert all(isinstance(m, Int4Linear) for layer in layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    assert not isinstance(patched.lm_head, Int4Linear)  # as our quantize="int4": the decoder layers only
    inputs = llama_inputs(tiny_llama)["input_ids"][:1]
    tokens, _ = greedy(patched, {"input_ids": inputs})
    assert op_calls["int4_gemm"] == 7 * len(layers) * NEW_TOKENS
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama, backend="torch", quantize="int4", dtype="float32",
                                                device="cpu")
    expected = ours.generate(input_ids=inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert tokens.tolist() == torch.as_tensor(expected).tolist()  # the same int4 bits, the same greedy tokens


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_attention_over_a_left_padded_cache_matches_sdpa(q_len, impl):
    """Decode and chunked steps of a batch whose rows start at different cache slots (left padding), through the
    reference ops and the Triton kernels (in Triton's interpreter on the CPU)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if impl not in ops.available("paged_attention"):
        pytest.skip(f"no {impl} paged_attention here")

    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Sk, Dh = 3, 4, 2, 11, 16
    q, k, v = (torch.randn(B, h, s, Dh, generator=gen) for h, s in ((Hq, q_len), (Hkv, Sk), (Hkv, Sk)))
    pad = torch.tensor([0, 4, 7])
    keys = torch.arange(Sk)[None] >= pad[:, None]  # [B, Sk]
    causal = torch.arange(Sk)[None] <= (Sk - q_len + torch.arange(q_len))[:, None]  # [q_len, Sk]
    mask = (keys[:, None] & causal)[:, None]  # [B, 1, q_len, Sk]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, Hq // Hkv
    with ops.prefer(impl):
        out, _ = attention_forward(module, q, k, v, mask, scaling=Dh**-0.5)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=Dh**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_mask_our_ops_do_not_take_runs_sdpa_with_a_warning():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen) for _ in range(3))
    mask = torch.rand(1, 1, 5, 5, generator=gen) > 0.3
    mask[..., 0] = True  # a random pattern, no query without keys
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    with pytest.warns(UserWarning, match="SDPA"):
        out, _ = attention_forward(module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.5)[0])


def test_unsupported_models_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(InputError, match="supports SmolVLM, Idefics3 and Llama.*GPT2LMHeadModel.*'gpt2'"):
        smolvlm_fast.patch(gpt2)
    with pytest.raises(InputError, match="loaded transformers model"):
        smolvlm_fast.patch(torch.nn.Linear(4, 4))
