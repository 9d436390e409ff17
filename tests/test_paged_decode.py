"""Sequences of different lengths decoded together over the paged cache give the tokens each gives alone."""
import pytest
import torch

from smolvlm_fast import AutoModelForCausalLM, SamplingParams
from smolvlm_fast.engine.sequence import Request
from smolvlm_fast.engine.engine import generate


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_decode_equals_each_alone(tiny_llama, block_size, backend):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32", backend=backend).model
    gen = torch.Generator().manual_seed(0)
    # lengths end on a block edge, one past it, one short of it, and one is much longer than the rest
    lengths = [block_size, block_size + 1, 2 * block_size - 1, 6 * block_size + 3, 3]
    params = SamplingParams(max_new_tokens=2 * block_size + 1)  # decoding crosses block edges too
    requests = [Request(torch.randint(3, 300, (n,), generator=gen).tolist(), params) for n in lengths]
    together = generate(model, requests, block_size=block_size)
    for request, seq in zip(requests, together):
        alone = generate(model, [request], block_size=block_size)[0]
        assert seq.output_ids == alone.output_ids
        assert len(seq.output_ids) == params.max_new_tokens and seq.finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32").model
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                            repetition_penalty=1.2, seed=7)
    first = generate(model, [Request([1, 5, 9, 40], params)])[0].output_ids
    assert generate(model, [Request([1, 5, 9, 40], params)])[0].output_ids == first
    other = SamplingParams(**{**params.__dict__, "seed": 8})
    assert generate(model, [Request([1, 5, 9, 40], other)])[0].output_ids != first


def test_stop_token_and_stop_string(tiny_llama):
    from smolvlm_fast import AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32").model
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    free = generate(model, [Request([1, 5, 9, 40], SamplingParams(max_new_tokens=16))])[0].output_ids
    stop_at = free[5]
    stopped = generate(model, [Request([1, 5, 9, 40], SamplingParams(max_new_tokens=16, stop_token_ids=(stop_at,)))])[0]
    assert stopped.output_ids == free[:free.index(stop_at) + 1] and stopped.finish_reason == "stop"
    text = tokenizer.decode(free[:6])
    stop_string = text[-2:] if text.strip() else None
    if stop_string:
        seq = generate(model, [Request([1, 5, 9, 40], SamplingParams(max_new_tokens=16, stop_strings=(stop_string,)))],
                       decode=tokenizer.decode)[0]
        assert seq.finish_reason == "stop" and stop_string in tokenizer.decode(seq.output_ids)
        assert len(seq.output_ids) <= 6


def test_vlm_stops_at_end_of_utterance_even_without_generation_config(tiny_idefics3, tmp_path):
    import shutil
    from smolvlm_fast import AutoModelForVision2Seq
    path = shutil.copytree(tiny_idefics3, tmp_path / "no_gen_config")
    (path / "generation_config.json").unlink()
    model = AutoModelForVision2Seq.from_pretrained(path, device="cpu", dtype="float32")
    assert 423 in model._sampling_params({}).stop_token_ids  # <end_of_utterance> in the fixture's vocabulary
