"""Parity with transformers (the reference) on tiny random-weight SmolVLM checkpoints of both model types, on both
backends (numpy, what a CPU user gets by default, and torch): the same inputs from the processor, logits within
1e-4 relative in fp32, and 16 identical greedy tokens."""
import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor

from .fixtures import load_hf_processor

RNG = np.random.default_rng(1234)
BACKENDS = pytest.mark.parametrize("backend", ["numpy", "torch"])


def rgb(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def cases():
    rgba = np.concatenate([RNG.integers(0, 256, (50, 70, 3)), np.linspace(0, 255, 50 * 70).reshape(50, 70, 1)], -1)
    return {
        "small": ([rgb(40, 30)], ["Describe this image."]),
        "large_non_square_tiled": ([rgb(300, 170)], ["What is in the picture?"]),
        "greyscale": ([Image.fromarray(RNG.integers(0, 256, (60, 45), dtype=np.uint8), "L")], ["What do you see?"]),
        "rgba": ([Image.fromarray(rgba.astype(np.uint8), "RGBA")], ["Describe it."]),
        "two_images": ([rgb(50, 50), rgb(130, 70)], ["Compare the two pictures."]),
        "batch_of_two": ([[rgb(40, 40)], [rgb(200, 90)]], ["Hi.", "Tell me a story about this picture in detail."]),
    }


def prompts(processor, texts, images):
    per_prompt = images if isinstance(images[0], list) else [images]
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": t}]}],
        add_generation_prompt=True) for t, imgs in zip(texts, per_prompt)]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def checkpoint(request):
    path = request.getfixturevalue(f"tiny_{request.param}")
    ref_cls = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}[request.param]
    import transformers
    reference = getattr(transformers, ref_cls).from_pretrained(path, dtype=torch.float32).eval()
    return path, request.param, reference


def relative_error(ours, ref, keep):
    return float((ours[keep] - ref[keep]).abs().max() / ref[keep].abs().max())


@BACKENDS
@pytest.mark.parametrize("case", list(cases()))
def test_parity_with_transformers(checkpoint, case, backend):
    path, model_type, reference = checkpoint
    images, texts = cases()[case]
    ref_processor = load_hf_processor(path, model_type)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForVision2Seq.from_pretrained(path, device="cpu", dtype="float32", backend=backend)
    text = prompts(processor, texts, images)
    assert text == prompts(ref_processor, texts, images)
    kwargs = dict(text=text if len(text) > 1 else text[0], images=images, return_tensors="pt", padding=True)
    ref_inputs, inputs = ref_processor(**kwargs), processor(**kwargs)
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        torch.testing.assert_close(torch.as_tensor(inputs[key]), ref_inputs[key], rtol=0, atol=1e-6, msg=key)

    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_logits = reference(**ref_inputs).logits
    logits = model(**inputs).logits
    assert relative_error(logits, ref_logits, keep) < 1e-4

    ref_out = reference.generate(**ref_inputs, max_new_tokens=16, do_sample=False)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert out.tolist() == ref_out.tolist()
    new = out[:, inputs["input_ids"].shape[1]:]
    assert len(set(new[0].tolist())) > 1, "the random model is too flat for this test to mean anything"


@BACKENDS
def test_text_only_prompt_on_a_vlm(tiny_idefics3, backend):
    import transformers
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(tiny_idefics3, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    model = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, device="cpu", dtype="float32", backend=backend)
    inputs = processor(text="User: what is the capital of France?<end_of_utterance>\nAssistant:", return_tensors="pt")
    ref_out = reference.generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, max_new_tokens=16, do_sample=False)
    assert model.generate(**inputs, max_new_tokens=16).tolist() == ref_out.tolist()


@pytest.mark.parametrize("dtype, backend", [(torch.float16, "torch"), (torch.bfloat16, "torch"),
                                            (torch.bfloat16, "numpy")])  # float16 does not run on numpy
def test_half_precision_checkpoints_load(tmp_path, dtype, backend):
    """fp16/bf16 checkpoints (sharded, with an index) load and match transformers loading the same files."""
    import transformers
    from .fixtures import build_tiny_vlm
    path = build_tiny_vlm(tmp_path / "half", dtype=dtype)
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 300, (1, 20))
    for source in (path, tmp_path / "sharded"):
        model = AutoModelForVision2Seq.from_pretrained(source, device="cpu", dtype="float32", backend=backend)
        with torch.no_grad():
            ref_logits = reference(input_ids=ids).logits
        assert relative_error(model(input_ids=ids).logits, ref_logits, torch.ones(1, 20, dtype=torch.bool)) < 1e-4
    model = AutoModelForVision2Seq.from_pretrained(path, device="cpu", dtype=dtype, backend=backend)
    assert model.dtype == dtype
    assert torch.isfinite(model(input_ids=ids).logits).all()


@BACKENDS
def test_llama_checkpoint_matches_transformers(tiny_llama, backend):
    import transformers
    from smolvlm_fast import AutoModelForCausalLM, AutoTokenizer
    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32", backend=backend)
    inputs = tokenizer(["The quick brown fox", "A picture is worth a thousand words and more"],
                       padding=True, return_tensors="pt")
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    assert relative_error(model(**inputs).logits, ref_logits, keep) < 1e-4
    ref_out = reference.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert model.generate(**inputs, max_new_tokens=16, do_sample=False).tolist() == ref_out.tolist()
