"""A Phi-architecture variant with tied embeddings keeps lm_head.bias apart (SmolVLM.lm_head_bias); with
quantize_lm_head the torch backend swaps in an int4 copy of the embedding as lm_head, and the bias must still be
added."""
import torch

from smolvlm_fast import init_random
from smolvlm_fast.auto import load_torch_model
from tests.test_xattn import xattn_config


def test_quantized_lm_head_keeps_phis_bias(tmp_path):
    path = init_random(xattn_config(arch="phi", tie=True), tmp_path / "ck", seed=4, std=0.3)
    model, _, _ = load_torch_model(path, "cpu", "float32", quantize="int4", quantize_options={"lm_head": True})
    assert model.lm_head_bias is not None
    hidden = torch.randn(3, model.config.text.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.compute_logits(hidden)
        model.lm_head_bias[7] += 1000.0
        after = model.compute_logits(hidden)
    assert (after[:, 7] - before[:, 7]).min() > 999  # the bias reaches the logits
