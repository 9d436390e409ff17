"""The PyTorch path with every op on its Triton kernel (in Triton's interpreter here, on the GPU under
`pytest -m gpu`) gives the tokens and logits of the reference ops."""
import numpy as np
import pytest
from PIL import Image

from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor, ops


def inputs_for(path, device):
    processor = AutoProcessor.from_pretrained(path)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    return processor(text=text, images=[image], return_tensors="pt", do_image_splitting=False).to(device)


def run(path, device, dtype, impl):
    model = AutoModelForVision2Seq.from_pretrained(path, device=device, dtype=dtype)
    inputs = inputs_for(path, device)
    with ops.prefer(impl):
        return model(**inputs).logits.float().cpu(), model.generate(**inputs, max_new_tokens=8).tolist()


def test_every_op_on_triton_matches_reference(tiny_idefics3):
    assert all("triton" in ops.available(name) for name in ops.TRITON_MODULES), "a Triton kernel is missing"
    ref_logits, ref_tokens = run(tiny_idefics3, "cpu", "float32", "reference")
    logits, tokens = run(tiny_idefics3, "cpu", "float32", "triton")
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max() / ref_logits.abs().max() < 1e-4


@pytest.mark.gpu
def test_triton_on_cuda_bf16_is_close(tiny_idefics3):
    ref_logits, ref_tokens = run(tiny_idefics3, "cuda", "float32", "reference")
    _, tokens = run(tiny_idefics3, "cuda", "float32", "triton")
    assert tokens == ref_tokens
    logits, _ = run(tiny_idefics3, "cuda", "bfloat16", "triton")
    ref_bf16, _ = run(tiny_idefics3, "cuda", "bfloat16", "reference")
    # FlashAttention's rule end to end: the kernels' bf16 error is at most twice the reference ops' bf16 error.
    assert (logits - ref_logits).abs().max() <= 2 * (ref_bf16 - ref_logits).abs().max() + 1e-3
