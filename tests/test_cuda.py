"""The PyTorch path on CUDA (run with `pytest -m gpu` on a GPU machine; skipped elsewhere)."""
import pytest
import torch

from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor

pytestmark = pytest.mark.gpu


def test_cuda_fp32_matches_cpu_and_bf16_is_close(tiny_idefics3, large_rgb):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=text, images=[large_rgb], return_tensors="pt")
    cpu = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, device="cpu", dtype="float32")
    gpu = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, device="cuda", dtype="float32")
    assert gpu.generate(**inputs.to("cuda"), max_new_tokens=16).tolist() == cpu.generate(**inputs, max_new_tokens=16).tolist()
    ref = cpu(**inputs).logits
    bf16 = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, device="cuda")
    assert bf16.dtype == torch.bfloat16
    err = (bf16(**inputs.to("cuda")).logits.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2  # bf16 keeps 8 mantissa bits (~4e-3 per rounding), compounded over 4 layers and the vision tower
