"""Bad input is a clear error naming the file, tensor or limit, never a traceback from inside the forward."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from smolvlm_fast import AutoModelForCausalLM, AutoModelForVision2Seq, CheckpointError, InputError, SamplingParams
from smolvlm_fast.engine.sequence import Request
from smolvlm_fast.engine.engine import generate


@pytest.fixture
def llama_copy(tiny_llama, tmp_path):
    return shutil.copytree(tiny_llama, tmp_path / "llama")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does-not-exist"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "does-not-exist")


def test_directory_without_weights(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    torch.save({}, llama_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never loaded"):
        AutoModelForCausalLM.from_pretrained(llama_copy)


def test_truncated_safetensors(llama_copy):
    path = llama_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(llama_copy)


def test_unknown_model_type(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt_neox'"):
        AutoModelForCausalLM.from_pretrained(llama_copy)


def test_broken_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        AutoModelForCausalLM.from_pretrained(llama_copy)


@pytest.mark.parametrize("change", ["wrong_shape", "missing"])
def test_bad_tensor(llama_copy, change):
    path = llama_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    if change == "missing":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(llama_copy)


def test_prompt_longer_than_context(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    limit = model.config.text.max_position_embeddings
    with pytest.raises(InputError, match=f"context of {limit} tokens"):
        model.generate(input_ids=torch.ones(1, limit, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(InputError, match="context"):
        generate(model.model, [Request([1] * 10, SamplingParams(max_new_tokens=limit))])


def test_token_ids_out_of_range(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    with pytest.raises(InputError, match="input_ids must be non-empty and in"):
        model(input_ids=torch.tensor([[1, 2, 10**6]]))


def test_image_tokens_without_images(tiny_idefics3):
    model = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, model.config.image_token_id, 7]])
    with pytest.raises(InputError, match="1 <image> tokens but the images give 0 features"):
        model(input_ids=ids)


def test_images_for_a_text_only_model(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cpu", dtype="float32")
    with pytest.raises(InputError, match="text-only"):
        model(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.ones(1, 1, 3, 64, 64))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=-2),
                                    dict(repetition_penalty=0.0)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)


def test_unknown_dtype(tiny_llama):
    with pytest.raises(InputError, match="dtype 'float8'"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tiny_llama, monkeypatch):
    """device="cuda" (or --device cuda) where torch has no CUDA, or sees no GPU, names what is missing at load."""
    from smolvlm_fast import LLM, SmolVLMError

    missing = "built without" if torch.version.cuda is None else "sees no GPU"
    with pytest.raises(SmolVLMError, match=missing):
        AutoModelForCausalLM.from_pretrained(tiny_llama, device="cuda")
    with pytest.raises(SmolVLMError, match=missing):
        LLM(tiny_llama, device="cuda:0")
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build on a machine without a GPU
    with pytest.raises(SmolVLMError, match="sees no GPU"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, device="cuda")
