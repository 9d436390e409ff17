"""The factorized variant (model_type smolvlm_fast_xattn, docs/xattn.md) through the engine on the PyTorch backend:
its config is checked at the border, init_random writes a loadable checkpoint, decode with the image K/V computed
once equals recomputing them at every step, every op on its Triton kernel gives the reference ops' tokens, requests
with and without images batch together as each alone, prefix caching tells images apart, and the server answers."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm_fast import CheckpointError, InputError, LLM, ModelConfig, SamplingParams, init_random, ops
from smolvlm_fast.auto import load_torch_model
from smolvlm_fast.engine.cache import PagedCache
from smolvlm_fast.engine.sequence import Request
from smolvlm_fast.engine.engine import generate, prefill
from smolvlm_fast.inputs.processor import Processor


def xattn_config(arch="phi", stem="dwsep", groups=1, rotary=0.5, cross=(0, 1), tie=False) -> dict:
    return {"model_type": "smolvlm_fast_xattn",
            "vision_config": {"image_size": 32, "patch_size": 8, "patch_stem": stem, "groups": groups,
                              "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                              "num_attention_heads": 4},
            "text_config": {"architecture": arch, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "head_dim": 16, "partial_rotary_factor": rotary, "max_position_embeddings": 512,
                            "rms_norm_eps": 1e-5, "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
                            "tie_word_embeddings": tie},
            "cross_attention_layers": list(cross), "scale_factor": 2}


VARIANTS = {"phi-dwsep": xattn_config(),
            "llama-grouped": xattn_config(arch="llama", stem="grouped", groups=3, cross=(1,)),
            "llama-conv-tied": xattn_config(arch="llama", stem="conv", rotary=1.0, cross=(0,), tie=True)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return init_random(VARIANTS[request.param], tmp_path_factory.mktemp(request.param), seed=3, std=0.3)


@pytest.fixture(scope="module")
def phi_checkpoint(tmp_path_factory):
    return init_random(VARIANTS["phi-dwsep"], tmp_path_factory.mktemp("phi"), seed=4, std=0.3)


def picture(seed: int, size=(40, 56)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def image_request(path, seed: int, question: str = "What is it?", max_new_tokens: int = 12):
    processor = Processor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=text, images=[picture(seed)], return_tensors="np")
    return inputs["input_ids"][0].tolist(), inputs["pixel_values"][0], max_new_tokens


def recompute_greedy(model, prompt: list[int], features, steps: int) -> list[int]:
    """Greedy tokens with the whole sequence and the image K/V recomputed from scratch at every step."""
    ids = list(prompt)
    for _ in range(steps):
        cache = PagedCache(-(-len(ids) // 16), 16)
        kv = model.allocate_kv_cache(cache.allocator.num_blocks, 16)
        hidden, meta = prefill(model, cache, kv, [Request(ids, image_features=features)], [0])
        ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------- config and checkpoint


def test_init_random_writes_a_complete_checkpoint(tmp_path):
    path = init_random(xattn_config(), tmp_path / "ck", seed=0)
    config = ModelConfig.from_file(path / "config.json")
    assert config.is_xattn and config.cross_attention_layers == (0, 1) and config.text.rotary_dim == 8
    processor = Processor.from_pretrained(path)
    ids = list(processor(text="a<image>b", images=[picture(0)])["input_ids"][0])
    assert ids.count(config.image_token_id) == 1  # one <image> token per image, not image_seq_len of them
    assert processor.tokenizer.decode(list(range(300)))  # every id of the vocabulary decodes
    same = init_random(xattn_config(), tmp_path / "again", seed=0)
    assert (same / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    other = init_random(xattn_config(), tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (path / "model.safetensors").read_bytes()


def test_checkpoint_missing_a_cross_layer_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    path = init_random(xattn_config(), tmp_path / "ck", seed=0)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.text_model.cross_layers.1.cross_attn.k_norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cross_layers.1.cross_attn.k_norm"):
        load_torch_model(path, "cpu", "float32")


# ---------------------------------------------------------------- the forward through the engine


def test_matches_the_independent_reference(checkpoint):
    """Logits of the whole prompt within 1e-4 and 16 greedy tokens identical to tests/xattn_reference.py (plain
    PyTorch written from docs/xattn.md), with an image and without."""
    from safetensors.torch import load_file

    from tests.xattn_reference import XAttnReference

    config = json.loads((checkpoint / "config.json").read_text())
    reference = XAttnReference(config, load_file(checkpoint / "model.safetensors"))
    model, _, _ = load_torch_model(checkpoint, "cpu", "float32")
    prompt, pixels, _ = image_request(checkpoint, seed=1)
    text_only = [t for t in prompt if t != model.config.image_token_id]
    for images in (torch.as_tensor(pixels), None):
        features = None if images is None else model.image_features_per_row(images[None])[0]
        prompt = prompt if images is not None else text_only
        cache = PagedCache(4, 16)
        hidden, _ = prefill(model, cache, model.allocate_kv_cache(4, 16), [Request(prompt, image_features=features)],
                            [0])
        want = reference.logits(prompt, images)
        got = model.compute_logits(hidden)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        seq = generate(model, [Request(prompt, SamplingParams(max_new_tokens=16), image_features=features)])[0]
        assert seq.output_ids == reference.greedy(prompt, images, max_new_tokens=16)


def test_decode_with_cached_image_kv_equals_recomputing(checkpoint):
    model, _, _ = load_torch_model(checkpoint, "cpu", "float32")
    prompt, pixels, steps = image_request(checkpoint, seed=1)
    features = model.image_features_per_row(torch.as_tensor(pixels)[None])[0]
    seq = generate(model, [Request(prompt, SamplingParams(max_new_tokens=steps), image_features=features)])[0]
    assert seq.output_ids == recompute_greedy(model, prompt, features, steps)


def test_images_change_the_output_and_text_only_skips_cross_layers(phi_checkpoint):
    model, _, _ = load_torch_model(phi_checkpoint, "cpu", "float32")
    prompt, pixels, _ = image_request(phi_checkpoint, seed=1)
    cache = PagedCache(8, 16)
    kv = model.allocate_kv_cache(8, 16)

    def last_logits(features, seq_id):
        hidden, _ = prefill(model, cache, kv, [Request(prompt, image_features=features)], [seq_id])
        return model.compute_logits(hidden[-1:])

    one = model.image_features_per_row(torch.as_tensor(pixels)[None])[0]
    _, other_pixels, _ = image_request(phi_checkpoint, seed=2)
    other = model.image_features_per_row(torch.as_tensor(other_pixels)[None])[0]
    assert not torch.allclose(last_logits(one, 0), last_logits(other, 1))
    # Without images the cross layers are the identity: the same as a model whose gates are zero.
    no_image = last_logits(None, 2)
    with torch.no_grad():
        for layer in model.text.cross_layers:
            layer.cross_attn_attn_gate.zero_()
            layer.cross_attn_mlp_gate.zero_()
    torch.testing.assert_close(last_logits(one, 3), no_image, rtol=1e-5, atol=1e-5)


def test_every_op_on_triton_matches_the_reference_ops(checkpoint):
    model, _, _ = load_torch_model(checkpoint, "cpu", "float32")
    prompt, pixels, steps = image_request(checkpoint, seed=1, max_new_tokens=6)

    def run(impl):
        with ops.prefer(impl):
            features = model.image_features_per_row(torch.as_tensor(pixels)[None])[0]
            request = Request(prompt, SamplingParams(max_new_tokens=steps), image_features=features)
            cache = PagedCache(4, 16)
            hidden, _ = prefill(model, cache, model.allocate_kv_cache(4, 16), [request], [0])
            return model.compute_logits(hidden), generate(model, [request])[0].output_ids

    ref_logits, ref_tokens = run("reference")
    logits, tokens = run("triton")
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() / ref_logits.abs().max() < 1e-4


def test_batched_with_and_without_images_equals_each_alone(phi_checkpoint):
    llm = LLM(str(phi_checkpoint), backend="torch")
    chats = [[{"role": "user", "content": [{"type": "image", "image": picture(i)},
                                           {"type": "text", "text": "Describe it." * (i + 1)}]}] for i in range(3)]
    prompts = [chats[0], "Hello there, how are you?", chats[1], chats[2]]
    params = SamplingParams(max_new_tokens=10)
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1


def test_prefix_cache_tells_images_apart(phi_checkpoint):
    llm = LLM(str(phi_checkpoint), backend="torch")
    question = "What is in this picture? Tell me in detail please, with colours and shapes."

    def ask(seed):
        chat = [{"role": "user", "content": [{"type": "image", "image": picture(seed)},
                                             {"type": "text", "text": question}]}]
        return llm.generate([chat], SamplingParams(max_new_tokens=8))[0]

    first, other, again = ask(1), ask(2), ask(1)
    assert other.num_cached_tokens == 0  # same text, another image: the text's K/V differ, nothing reused
    assert again.num_cached_tokens > 0 and again.token_ids == first.token_ids


def test_image_of_the_wrong_size_or_count_is_refused(phi_checkpoint):
    model, _, _ = load_torch_model(phi_checkpoint, "cpu", "float32")
    with pytest.raises(InputError, match="32x32"):
        model.image_features_per_row(torch.zeros(1, 1, 3, 48, 48) + 0.5)
    prompt, pixels, _ = image_request(phi_checkpoint, seed=1)
    features = model.image_features_per_row(torch.as_tensor(pixels)[None])[0]
    two_markers = prompt + [model.config.image_token_id]
    with pytest.raises(InputError):
        generate(model, [Request(two_markers, image_features=features)])


def test_server_answers_with_an_image(phi_checkpoint):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from smolvlm_fast.serving.server.app import create_app

    llm = LLM(str(phi_checkpoint), backend="torch")
    buf = io.BytesIO()
    picture(1).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "x", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "What is it?"}]}]}
    with TestClient(create_app(llm, model_name="x")) as client:
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    chat = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "What is it?"}]}]
    want = llm.generate(chat, SamplingParams(max_new_tokens=6))[0]
    assert reply.json()["usage"]["completion_tokens"] == len(want.token_ids)
    assert reply.json()["choices"][0]["message"]["content"] == want.text


def test_cross_layer_equals_transformers_mllama_layer(phi_checkpoint):
    """Our CrossLayer (ops.cross_attention, packed rows of two sequences) against MllamaCrossAttentionDecoderLayer
    loaded with the same tensors from the checkpoint."""
    from safetensors.torch import load_file
    from transformers import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    model, _, _ = load_torch_model(phi_checkpoint, "cpu", "float32")
    t = model.config.text
    config = MllamaTextConfig(hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
                              num_key_value_heads=t.num_key_value_heads, intermediate_size=t.intermediate_size,
                              rms_norm_eps=t.rms_norm_eps, hidden_act="silu")
    config._attn_implementation = "eager"
    theirs = MllamaCrossAttentionDecoderLayer(config, layer_idx=0).eval()
    prefix = "model.text_model.cross_layers.1."
    tensors = {k.removeprefix(prefix): v for k, v in load_file(phi_checkpoint / "model.safetensors").items()
               if k.startswith(prefix)}
    theirs.load_state_dict(tensors, strict=True)
    assert theirs.cross_attn.head_dim == t.head_dim
    g = torch.Generator().manual_seed(7)
    hidden = [torch.randn(n, t.hidden_size, generator=g) for n in (5, 1)]  # a prefill chunk and a decode token
    images = [torch.randn(n, t.hidden_size, generator=g) for n in (16, 32)]  # one and two images' states
    layer = model.text.cross_layers[1]
    with torch.no_grad():
        ours = layer(torch.cat(hidden), [(0, 5, layer.image_kv(images[0])), (5, 1, layer.image_kv(images[1]))])
        for (start, n), h, c in zip(((0, 5), (5, 1)), hidden, images):
            want = theirs(h[None], c[None], None, None, None)
            want = want[0] if isinstance(want, tuple) else want
            torch.testing.assert_close(ours[start:start + n], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_preempted_requests_keep_their_image_kv_and_finish_as_alone(phi_checkpoint, backend):
    """A cache too small for all requests at once: sequences are preempted and recomputed, their image K/V kept."""
    chats = [[{"role": "user", "content": [{"type": "image", "image": picture(i)},
                                           {"type": "text", "text": "Describe."}]}] for i in range(4)]
    params = SamplingParams(max_new_tokens=40)  # ~36 prompt tokens: 3 blocks each to start, 5 at the end
    roomy = LLM(str(phi_checkpoint), backend=backend)
    alone = [roomy.generate([c], params)[0].token_ids for c in chats]
    tight = LLM(str(phi_checkpoint), backend=backend, num_blocks=12, enable_prefix_caching=False)
    together = [o.token_ids for o in tight.generate(chats, params)]
    assert tight.stats.preemptions > 0
    assert together == alone


@pytest.mark.gpu
def test_on_cuda_the_kernels_give_the_reference_ops_tokens(phi_checkpoint):
    model, _, _ = load_torch_model(phi_checkpoint, "cuda", "float32")
    prompt, pixels, steps = image_request(phi_checkpoint, seed=1)

    def tokens(impl):
        with ops.prefer(impl):
            features = model.image_features_per_row(torch.as_tensor(pixels, device="cuda")[None])[0]
            return generate(model, [Request(prompt, SamplingParams(max_new_tokens=steps), image_features=features)])[0]

    assert tokens(None).output_ids == tokens("reference").output_ids
