"""The PyTorch-free path: import, load (safetensors fp32/bf16 and GGUF), process and generate in a process
where `import torch` fails, with the same greedy tokens as the PyTorch backend."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from smolvlm_fast import AutoModelForCausalLM, AutoModelForVision2Seq, AutoProcessor

SCRIPT = r"""
import json, sys
sys.modules["torch"] = None          # `import torch` raises ImportError from here on
sys.modules["transformers"] = None
import numpy as np
from PIL import Image
from smolvlm_fast import AutoModelForCausalLM, AutoModelForVision2Seq, AutoProcessor

args = json.loads(sys.argv[1])
results = {}
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8))
for key, path in args["vlm"].items():
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForVision2Seq.from_pretrained(path)
    assert model.backend == "numpy"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=text, images=[image], return_tensors="np")
    results[key] = model.generate(**inputs, max_new_tokens=8).tolist()
gguf = args["gguf"]
model = AutoModelForCausalLM.from_pretrained(gguf)
tokenizer = model.tokenizer
inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="np")
results["gguf"] = model.generate(**inputs, max_new_tokens=8).tolist()
from smolvlm_fast import LLM, SamplingParams  # the engine, its backend object and the KV-cache sizing: no torch
llm = LLM(args["vlm"]["fp32"], ignore_eos=True)
chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
results["llm"] = llm.generate(chat, SamplingParams(max_new_tokens=8))[0].token_ids
schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
results["json"] = llm.generate(chat, SamplingParams(max_new_tokens=32, json_schema=schema))[0].text  # llguidance
assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from .fixtures import build_tiny_vlm
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_bf16"), "smolvlm", dtype=torch.bfloat16)


def test_whole_path_runs_without_torch(tiny_idefics3, tiny_bf16, smollm2_gguf):
    args = {"vlm": {"fp32": str(tiny_idefics3), "bf16": str(tiny_bf16)}, "gguf": str(smollm2_gguf)}
    run = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert json.loads(results["json"]) in ({"ok": True}, {"ok": False})
    image = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    from PIL import Image
    for key, path in args["vlm"].items():
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForVision2Seq.from_pretrained(path, backend="torch", dtype="float32", device="cpu")
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
            add_generation_prompt=True)
        inputs = processor(text=text, images=[Image.fromarray(image)], return_tensors="pt")
        assert results[key] == model.generate(**inputs, max_new_tokens=8).tolist(), key
        if key == "fp32":
            free = model.generate(**inputs, max_new_tokens=8, eos_token_id=[])[0]
            assert results["llm"] == free[inputs["input_ids"].shape[1]:].tolist()  # LLM, without torch
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf, backend="torch", dtype="float32", device="cpu")
    inputs = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                 add_generation_prompt=True, return_tensors="pt")
    assert results["gguf"] == model.generate(**inputs, max_new_tokens=8).tolist()
