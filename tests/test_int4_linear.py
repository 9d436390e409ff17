"""int4 on the PyTorch path (smolvlm_fast/int4_linear.py): Int4Linear, quantize="int4" swapping the decoder's
Linear layers from outside the model, the vision / lm_head options, and GGUF Q4_0 / Q4_1 weights going into
Int4Linear as they are.

The NumPy backend is the reference: with quantize="int4" both backends must hold the same int4 bits and give the
same logits (within 1e-4 relative, fp32: the same products summed in another order) and the same greedy tokens.
On the CPU the model's Int4Linear runs the PyTorch reference op; one test runs it through the Triton kernel in the
interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from smolvlm_fast import AutoModelForCausalLM, AutoModelForVision2Seq, AutoProcessor, ops
from smolvlm_fast.cli import main
from smolvlm_fast.errors import InputError
from smolvlm_fast.models.int4_linear import Int4Linear, Int4Tensors, quantize_model
from smolvlm_fast.cpu.weights import GATE_UP, QKV
from smolvlm_fast.ops import reference

TORCH = {"backend": "torch", "device": "cpu", "dtype": "float32"}
DECODER_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
NUMPY_NAMES = {"qkv_proj": QKV, "o_proj": "self_attn.o_proj.weight", "gate_up_proj": GATE_UP,
               "down_proj": "mlp.down_proj.weight"}


# the products are compared (to 1e-4), so the numpy model keeps a float32 KV cache (conftest.float32_kv_cache)
pytestmark = pytest.mark.usefixtures("float32_kv_cache")


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def as_numpy(x) -> np.ndarray:
    return x.float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def random_ids(vocab: int, n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (1, n))


def assert_same_int4_as_numpy(torch_model, numpy_model):
    """Every decoder Int4Linear holds the NumPy backend's int4 bits for that (fused) layer."""
    t = torch_model.model.config.text
    prefix = "model.text_model." if torch_model.model.config.is_vlm else "model."
    for i, layer in enumerate(torch_model.model.text.layers):
        for name in DECODER_MODULES:
            module = getattr(layer, name)
            assert isinstance(module, Int4Linear), f"layer {i} {name} is {type(module).__name__}"
            ours = module.weight_int4.to_numpy()
            theirs = numpy_model.model.weights[f"{prefix}layers.{i}.{NUMPY_NAMES[name]}"]
            assert (ours.group_size, ours.symmetric) == (theirs.group_size, theirs.symmetric)
            for field in ("qweight", "scales", "mins"):
                a, b = getattr(ours, field), getattr(theirs, field)
                assert (a is None and b is None) or a.tobytes() == b.tobytes(), f"layer {i} {name} {field}"
    assert len(torch_model.model.text.layers) == t.num_hidden_layers


def assert_same_outputs(a, b, ids, new_tokens: int = 12):
    """Logits within 1e-4 relative and the same greedy tokens; a and b take ids in their own array type."""
    logits_a = as_numpy(a(torch.as_tensor(ids) if a.backend == "torch" else ids).logits)
    logits_b = as_numpy(b(torch.as_tensor(ids) if b.backend == "torch" else ids).logits)
    assert relative_error(logits_a, logits_b) < 1e-4
    out_a = a.generate(torch.as_tensor(ids) if a.backend == "torch" else ids, max_new_tokens=new_tokens)
    out_b = b.generate(torch.as_tensor(ids) if b.backend == "torch" else ids, max_new_tokens=new_tokens)
    assert np.asarray(out_a).tolist() == np.asarray(out_b).tolist()


# ---------------------------------------------------------------- the module

@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (128, False)])
def test_int4_linear_is_the_dequantized_linear(group_size, symmetric):
    weight, bias = torch.randn(40, 256) * 0.05, torch.randn(40)
    layer = Int4Linear.from_weight(weight, bias, group_size=group_size, symmetric=symmetric)
    assert (layer.in_features, layer.out_features, layer.group_size, layer.symmetric) == (256, 40, group_size,
                                                                                          symmetric)
    x = torch.randn(2, 3, 256)
    deq = reference.dequantize_int4(layer.weight_int4)
    assert (deq - weight).abs().max() <= layer.weight_int4.scales.float().abs().max() / 2 + 1e-6  # round to nearest
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ deq.T + bias, rtol=1e-5, atol=1e-5)


def test_dtype_casts_leave_the_int4_weight_alone():
    layer = Int4Linear.from_weight(torch.randn(24, 64), torch.randn(24), group_size=32)
    before = layer.weight_int4
    layer.to(torch.bfloat16)
    after = layer.weight_int4
    assert after.scales.dtype == after.mins.dtype == torch.float16 and after.qweight.dtype == torch.uint8
    assert torch.equal(after.scales, before.scales) and torch.equal(after.mins, before.mins)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(5, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_from_numpy_round_trip():
    from smolvlm_fast.formats import int4 as int4_format
    w = int4_format.quantize_int4(np.random.default_rng(0).standard_normal((8, 96), dtype=np.float32), group_size=32)
    back = Int4Tensors.from_numpy(w).to_numpy()
    assert back.qweight.tobytes() == w.qweight.tobytes() and back.scales.tobytes() == w.scales.tobytes()
    assert back.mins.tobytes() == w.mins.tobytes() and (back.N, back.K, back.group_size) == (8, 96, 32)


# ---------------------------------------------------------------- quantize="int4" on the torch backend

@pytest.fixture(scope="module")
def llama_pair(tiny_llama):
    return (AutoModelForCausalLM.from_pretrained(tiny_llama, quantize="int4", **TORCH),
            AutoModelForCausalLM.from_pretrained(tiny_llama, quantize="int4", backend="numpy"))


def test_torch_int4_equals_numpy_int4(llama_pair, monkeypatch):
    """The same int4 linears on both backends. The LM heads differ by design: the torch backend keeps it float
    (quantize_lm_head is off by default), the numpy one stores it Q8_0 as llama.cpp's Q4 files do, so the numpy
    model gets torch's float head for the comparison."""
    from smolvlm_fast.formats.int4 import Q8Weight
    ours, numpy_model = llama_pair
    assert_same_int4_as_numpy(ours, numpy_model)
    assert isinstance(ours.model.lm_head, nn.Linear)  # off by default
    assert isinstance(numpy_model.model.weights["lm_head.weight"], Q8Weight)
    monkeypatch.setitem(numpy_model.model.weights, "lm_head.weight", ours.model.lm_head.weight.detach().numpy())
    assert_same_outputs(ours, numpy_model, random_ids(ours.config.text.vocab_size))


def test_int4_model_through_the_triton_kernels(llama_pair):
    """The same model with every op on its Triton kernel (the interpreter here) gives the reference's outputs."""
    ours, _ = llama_pair
    ids = torch.as_tensor(random_ids(ours.config.text.vocab_size, seed=1))
    ref_logits, ref_tokens = ours(ids).logits, ours.generate(ids, max_new_tokens=6).tolist()
    with ops.prefer("triton"):
        logits, tokens = ours(ids).logits, ours.generate(ids, max_new_tokens=6).tolist()
    assert tokens == ref_tokens
    assert relative_error(logits, ref_logits) < 1e-4


def test_vision_and_lm_head_options(tiny_idefics3):
    """quantize_vision / quantize_lm_head swap those layers too, and the model computes what the float model with
    the same int4 weights dequantized computes."""
    ours = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, quantize="int4", quantize_vision=True,
                                                  quantize_lm_head=True, **TORCH)
    dense = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, **TORCH)
    swapped = {name: m for name, m in ours.model.named_modules() if isinstance(m, Int4Linear)}
    assert {"connector", "lm_head", "vision.layers.0.qkv", "vision.layers.1.fc2", "text.layers.1.down_proj"} <= \
        set(swapped)
    assert not any(isinstance(m, nn.Linear) for m in ours.model.modules())
    with torch.no_grad():
        for name, m in swapped.items():
            target = dense.model.get_submodule(name)
            target.weight.copy_(reference.dequantize_int4(m.weight_int4))
            if m.bias is not None:
                torch.testing.assert_close(m.bias, target.bias, rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    assert relative_error(ours(**inputs).logits, dense(**inputs).logits) < 1e-4
    assert ours.generate(**inputs, max_new_tokens=8).tolist() == dense.generate(**inputs, max_new_tokens=8).tolist()


def test_quantize_model_group_size_and_skips():
    """A given group size where it divides K, 32 where only that does; K not a multiple of 32 stays float."""
    model = nn.Module()
    model.text = nn.Module()
    model.text.layers = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(256, 8), "b": nn.Linear(96, 8),
                                                      "c": nn.Linear(40, 8)})])
    model.other = nn.Linear(64, 8)
    quantize_model(model, group_size=128)
    layer = model.text.layers[0]
    assert (layer["a"].group_size, layer["b"].group_size) == (128, 32)
    assert type(layer["c"]) is nn.Linear and type(model.other) is nn.Linear


def test_option_errors(tiny_llama):
    with pytest.raises(InputError, match="quantize_vision and quantize_lm_head need"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, backend="numpy", quantize="int4", quantize_lm_head=True)
    with pytest.raises(InputError, match="need quantize='int4'"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantize_vision=True, **TORCH)


def test_cli_generates_with_int4_on_torch(tiny_llama, capsys):
    args = ["generate", "Tell me a story.", "--model", str(tiny_llama), "--backend", "torch", "--device", "cpu",
            "--quantize", "int4", "--quantize-lm-head", "--max-new-tokens", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip()


# ---------------------------------------------------------------- GGUF Q4 into Int4Linear

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "F16"])
def test_gguf_q4_goes_into_int4_linear_as_is(tmp_path, qtype, monkeypatch):
    """A GGUF's Q4 blocks land in the fused Int4Linear layers bit for bit (the NumPy backend keeps them too), float
    ones are quantized as from safetensors, and both backends give the same logits and tokens (the numpy backend's
    quantize="int4" stores a float tied embedding Q8_0, so it gets torch's float one for the comparison);
    quantize_lm_head adds an int4 copy of the tied embedding."""
    from gguf import GGMLQuantizationType as Q

    from .test_gguf import write_gguf
    path = tmp_path / "tiny.gguf"
    write_gguf(path, getattr(Q, qtype))
    ours = AutoModelForCausalLM.from_pretrained(path, quantize="int4", **TORCH)
    numpy_model = AutoModelForCausalLM.from_pretrained(path, backend="numpy", quantize="int4")
    assert_same_int4_as_numpy(ours, numpy_model)
    groups = (ours.model.text.layers[0].qkv_proj.group_size, ours.model.text.layers[0].down_proj.group_size)
    assert groups == ((64, 32) if qtype == "F16" else (32, 32))  # K = 64 and 96
    assert ours.model.lm_head is None
    monkeypatch.setitem(numpy_model.model.weights, "model.embed_tokens.weight",
                        ours.model.text.embed_tokens.weight.detach().numpy())
    assert_same_outputs(ours, numpy_model, random_ids(ours.config.text.vocab_size, n=10), new_tokens=8)

    with_head = AutoModelForCausalLM.from_pretrained(path, quantize="int4", quantize_lm_head=True, **TORCH)
    assert isinstance(with_head.model.lm_head, Int4Linear)
    assert with_head.model.text.embed_tokens.weight.dtype == torch.float32


@pytest.fixture
def one_torch_thread():
    """The CPU reference op dequantizes every weight at every call: many small parallel regions, which crawl when
    other processes hold the machine's cores. One thread keeps the test's time steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_real_smollm2_gguf_int4_on_torch(smollm2_gguf, one_torch_thread):
    """SmolLM2-135M-Instruct's Q4_1 weights in Int4Linear: the NumPy backend's greedy answer, token for token."""
    ours = AutoModelForCausalLM.from_pretrained(smollm2_gguf, quantize="int4", **TORCH)
    numpy_model = AutoModelForCausalLM.from_pretrained(smollm2_gguf, backend="numpy")
    layer = ours.model.text.layers[7].gate_up_proj
    theirs = numpy_model.model.weights[f"model.layers.7.{GATE_UP}"]
    assert layer.weight_int4.to_numpy().qweight.tobytes() == theirs.qweight.tobytes()
    ids = numpy_model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                    add_generation_prompt=True, return_tensors="np")
    ids = np.asarray(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out = ours.generate(torch.as_tensor(ids), max_new_tokens=8).tolist()
    assert out == numpy_model.generate(ids, max_new_tokens=8).tolist()
    assert "Paris" in ours.tokenizer.decode(out[0][ids.shape[1]:])
