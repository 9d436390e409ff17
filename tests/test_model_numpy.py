"""The NumPy model (models/smolvlm_numpy.py) against transformers on the tiny random checkpoints: logits within 1e-4 relative
in fp32 and 16 greedy tokens identical to transformers' generate for the parity cases; fp16/bf16 checkpoints loaded
with our reader equal to torch's loading; GGUF int4/q8 weights kept quantized; sequences decoded together equal
each alone. The rows of a batch are packed (their real tokens only) over the paged cache, as the engine does."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from smolvlm_fast.engine.cache import PagedCache, schedule_step
from smolvlm_fast.errors import InputError
from smolvlm_fast.cpu.weights import DECODER_LINEARS, GATE_UP, QKV, quantize_weights
from smolvlm_fast.models.batch import SequenceImages
from smolvlm_fast.models.smolvlm_numpy import NumpyModel
from smolvlm_fast.inputs.processor import Processor

from .fixtures import load_hf_processor
from .test_model_parity import cases, prompts

HF_CLASSES = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
              "llama": "LlamaForCausalLM"}


# the products are compared (to 1e-4), so the numpy model keeps a float32 KV cache (conftest.float32_kv_cache)
pytestmark = pytest.mark.usefixtures("float32_kv_cache")


def reference_model(path, model_type):
    import transformers
    return getattr(transformers, HF_CLASSES[model_type]).from_pretrained(path, dtype=torch.float32).eval()


def new_cache(model, token_counts, block_size):
    cache = PagedCache(sum(-(-n // block_size) for n in token_counts), block_size)
    return cache, model.allocate_kv_cache(cache.allocator.num_blocks, block_size)


def prefill(model, cache, kv, rows, features):
    """Every row's prompt in one packed step -> (hidden [T, D], metadata)."""
    meta = schedule_step(cache, {i: len(r) for i, r in enumerate(rows)})
    images = [None if f is None else SequenceImages.of(f) for f in features]
    return model.forward(np.concatenate(rows), meta, kv, images), meta


def greedy(model, rows, features=None, max_new_tokens=16, block_size=16):
    """New token ids of each row, argmax at every step, all rows decoded together."""
    features = features or [None] * len(rows)
    cache, kv = new_cache(model, [len(r) + max_new_tokens for r in rows], block_size)
    hidden, meta = prefill(model, cache, kv, rows, features)
    logits = model.compute_logits(hidden[meta.last_token_indices])  # [rows, V]
    out = [[] for _ in rows]
    for step in range(max_new_tokens):
        for seq, token in zip(out, logits.argmax(-1).tolist()):
            seq.append(token)
        if step + 1 < max_new_tokens:
            meta = schedule_step(cache, {i: 1 for i in range(len(rows))})
            logits = model.compute_logits(model.forward(np.array([s[-1] for s in out]), meta, kv))
    return out


def until_stop(tokens, stop_ids):
    """Tokens up to and including the first stop token (transformers pads a finished row after it)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


def relative_error(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------- SmolVLM parity with transformers


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def vlm(request):
    path = request.getfixturevalue(f"tiny_{request.param}")
    return (path, NumpyModel.from_checkpoint(path), reference_model(path, request.param),
            load_hf_processor(path, request.param), Processor.from_pretrained(path))


@pytest.mark.parametrize("case", list(cases()))
def test_vlm_matches_transformers(vlm, case):
    path, model, reference, ref_processor, processor = vlm
    images, texts = cases()[case]
    text = prompts(processor, texts, images)
    kwargs = dict(text=text if len(text) > 1 else text[0], images=images, padding=True)
    inputs, ref_inputs = processor(**kwargs, return_tensors="np"), ref_processor(**kwargs, return_tensors="pt")
    keep = inputs["attention_mask"].astype(bool)
    rows = [ids[m] for ids, m in zip(inputs["input_ids"], keep)]
    features = model.image_features_per_row(inputs["pixel_values"], inputs["pixel_attention_mask"])

    with torch.no_grad():
        ref_logits = reference(**ref_inputs).logits[torch.from_numpy(keep)].numpy()  # [real tokens, V]
    cache, kv = new_cache(model, [len(r) for r in rows], 16)
    logits = model.compute_logits(prefill(model, cache, kv, rows, features)[0])
    assert logits.dtype == np.float32
    assert relative_error(logits, ref_logits) < 1e-4

    ref_out = reference.generate(**ref_inputs, max_new_tokens=16, do_sample=False)[:, keep.shape[1]:].tolist()
    out = greedy(model, rows, features)
    stop = set(np.atleast_1d(reference.generation_config.eos_token_id).tolist())
    assert [until_stop(o, stop) for o in out] == [until_stop(r, stop) for r in ref_out]
    assert len(set(out[0])) > 1, "the random model is too flat for this test to mean anything"


def test_image_token_count_must_match_the_features(tiny_idefics3, small_rgb):
    model = NumpyModel.from_checkpoint(tiny_idefics3)
    processor = Processor.from_pretrained(tiny_idefics3)
    inputs = processor(text=prompts(processor, ["Hi."], [small_rgb])[0], images=[small_rgb], return_tensors="np")
    features = model.image_features_per_row(inputs["pixel_values"], inputs["pixel_attention_mask"])[0]
    cache, kv = new_cache(model, [inputs["input_ids"].shape[1]], 16)
    with pytest.raises(InputError, match="<image> tokens"):
        prefill(model, cache, kv, [inputs["input_ids"][0]], [features[:-1]])


def test_padding_images_are_dropped(tiny_idefics3, small_rgb):
    """An all-zero image (padding in a batch) gives no features; a row with only padding gives None."""
    model = NumpyModel.from_checkpoint(tiny_idefics3)
    pixels = Processor.from_pretrained(tiny_idefics3)(text="<image>", images=[small_rgb], return_tensors="np")
    one = pixels["pixel_values"][:, :1]  # [1, 1, C, H, W]
    batch = np.concatenate([np.concatenate([one, 0 * one], 1), np.concatenate([0 * one, 0 * one], 1)])
    first, second = model.image_features_per_row(batch)
    np.testing.assert_allclose(first, model.image_features_per_row(one)[0], rtol=1e-5, atol=1e-5)
    assert second is None


# ---------------------------------------------------------------- text-only Llama


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """The forward in one piece, or with its MLP and attention split into chunks of a few tokens (as long prompts
    are done)."""
    if request.param == "chunked":
        from smolvlm_fast.models import smolvlm_numpy as model_numpy
        from smolvlm_fast.cpu import ops as numpy_ops
        monkeypatch.setattr(model_numpy, "MLP_ROWS", 5)
        monkeypatch.setattr(numpy_ops, "MAX_SCORES", 4 * 30)


def test_llama_matches_transformers(tiny_llama, chunking):
    model, reference = NumpyModel.from_checkpoint(tiny_llama), reference_model(tiny_llama, "llama")
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 300, n) for n in (5, 23)]
    with torch.no_grad():
        ref_logits = np.concatenate([reference(torch.from_numpy(r)[None]).logits[0].numpy() for r in rows])
    cache, kv = new_cache(model, [len(r) for r in rows], 16)
    assert relative_error(model.compute_logits(prefill(model, cache, kv, rows, [None, None])[0]), ref_logits) < 1e-4
    for row, out in zip(rows, greedy(model, rows)):
        ref_out = reference.generate(torch.from_numpy(row)[None], max_new_tokens=16, do_sample=False,
                                     eos_token_id=None, min_new_tokens=16)
        assert out == ref_out[0, len(row):].tolist()


@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_decode_equals_each_alone(tiny_llama, block_size):
    model = NumpyModel.from_checkpoint(tiny_llama)
    rng = np.random.default_rng(block_size)
    # lengths end on a block edge, one past it, one short of it, and one is much longer than the rest
    rows = [rng.integers(3, 300, n) for n in (block_size, block_size + 1, 2 * block_size - 1, 6 * block_size + 3, 3)]
    together = greedy(model, rows, max_new_tokens=2 * block_size + 1, block_size=block_size)  # crosses block edges
    for row, out in zip(rows, together):
        assert out == greedy(model, [row], max_new_tokens=2 * block_size + 1, block_size=block_size)[0]


# ---------------------------------------------------------------- checkpoints: half precision, sharded, GGUF


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tmp_path, dtype):
    """fp16/bf16 checkpoints (single file, and sharded with an index) load to exactly torch's float32 values."""
    import safetensors.torch
    from .fixtures import build_tiny_vlm
    path = build_tiny_vlm(tmp_path / "half", dtype=dtype)
    reference = reference_model(path, "idefics3")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    stored = safetensors.torch.load_file(path / "model.safetensors")
    ids = np.random.default_rng(0).integers(0, 300, 20)
    with torch.no_grad():
        ref_logits = reference(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()
    for source in (path, tmp_path / "sharded"):
        model = NumpyModel.from_checkpoint(source)
        for name, t in stored.items():
            assert model.weights[name].dtype == np.float32
            np.testing.assert_array_equal(model.weights[name], t.float().numpy(), err_msg=name)
        cache, kv = new_cache(model, [20], 16)
        assert relative_error(model.compute_logits(prefill(model, cache, kv, [ids], [None])[0]), ref_logits) < 1e-4


NO_TORCH = r"""
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
import numpy as np
from smolvlm_fast.engine.cache import PagedCache, schedule_step
from smolvlm_fast.cpu.weights import DECODER_LINEARS, GATE_UP, QKV
from smolvlm_fast.models.smolvlm_numpy import NumpyModel

model = NumpyModel.from_checkpoint(sys.argv[1])
cache = PagedCache(2, 16)
hidden = model.forward(np.arange(3, 23), schedule_step(cache, {0: 20}), model.allocate_kv_cache(2, 16))
np.save(sys.argv[2], model.compute_logits(hidden))
"""


def test_loads_and_runs_without_torch(tmp_path):
    """A bf16 checkpoint loads and runs in a process where `import torch` fails, with the logits it gives here."""
    from .fixtures import build_tiny_vlm
    path = build_tiny_vlm(tmp_path / "bf16", dtype=torch.bfloat16)
    run = subprocess.run([sys.executable, "-c", NO_TORCH, str(path), str(tmp_path / "logits.npy")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    model = NumpyModel.from_checkpoint(path)
    cache = PagedCache(2, 16)
    hidden = model.forward(np.arange(3, 23), schedule_step(cache, {0: 20}), model.allocate_kv_cache(2, 16))
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), model.compute_logits(hidden))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16"])
def test_gguf_weights_stay_quantized(tmp_path, qtype):
    """A GGUF's Q4_0/Q4_1 tensors load as Int4Weight, Q8_0 as Q8Weight, and the logits equal those of the same
    weights dequantized to float32 (the torch path's GGUF loading)."""
    from gguf import GGMLQuantizationType as Q


    from smolvlm_fast.formats import int4 as int4_format
    from smolvlm_fast.formats.gguf import load_gguf

    from .test_gguf import write_gguf
    path = tmp_path / "tiny.gguf"
    write_gguf(path, getattr(Q, qtype))
    model = NumpyModel.from_checkpoint(path)
    kind = {"Q4_0": int4_format.Int4Weight, "Q4_1": int4_format.Int4Weight, "Q8_0": int4_format.Q8Weight, "F16": np.ndarray}[qtype]
    assert isinstance(model.weights["model.layers.0.mlp.down_proj.weight"], kind)
    dense = NumpyModel(model.config, load_gguf(path).tensors)
    ids = np.random.default_rng(0).integers(0, model.config.text.vocab_size, 20)
    logits = []
    for m in (model, dense):
        cache, kv = new_cache(m, [20], 4)
        logits.append(m.compute_logits(prefill(m, cache, kv, [ids], [None])[0]))
    assert relative_error(*logits) < 1e-4  # the same products, summed in another order


def test_quantize_int4_at_load(tiny_llama):
    """quantize="int4" makes every decoder linear an Int4Weight (group 64 here) and the LM head Q8_0, and the model
    computes what the same weights dequantized to float32 give."""
    from smolvlm_fast.formats import int4 as int4_format
    model = NumpyModel.from_checkpoint(tiny_llama, quantize="int4")
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in DECODER_LINEARS + (QKV, GATE_UP)]
    assert all(isinstance(model.weights[n], int4_format.Int4Weight) and model.weights[n].group_size == 64 for n in names)
    assert isinstance(model.weights["lm_head.weight"], int4_format.Q8Weight)
    dense = NumpyModel(model.config, {name: int4_format.dequantize(w) for name, w in model.weights.items()})
    ids = np.random.default_rng(0).integers(3, 300, 12)
    logits = []
    for m in (model, dense):
        cache, kv = new_cache(m, [12], 16)
        logits.append(m.compute_logits(prefill(m, cache, kv, [ids], [None])[0]))
    assert relative_error(*logits) < 1e-4  # the same products, summed in another order
    with pytest.raises(InputError, match="int8"):
        NumpyModel.from_checkpoint(tiny_llama, quantize="int8")


def test_quantize_int4_with_tied_embeddings(tiny_llama):
    """Where the head is the input embedding (SmolLM2), quantize="int4" stores that one matrix as Q8_0: the
    embedding lookups and the logits are those of its dequantized rows."""
    import dataclasses

    from smolvlm_fast.formats import int4 as int4_format
    loaded = NumpyModel.from_checkpoint(tiny_llama)
    config = dataclasses.replace(loaded.config, text=dataclasses.replace(loaded.config.text, tie_word_embeddings=True))
    weights = {n: w for n, w in loaded.weights.items() if n != "lm_head.weight"}
    model = NumpyModel(config, quantize_weights(weights, config, "int4"))
    assert isinstance(model.weights["model.embed_tokens.weight"], int4_format.Q8Weight)
    dense = NumpyModel(config, {n: int4_format.dequantize(w) for n, w in model.weights.items()})
    ids = np.random.default_rng(0).integers(3, 300, 9)
    logits = []
    for m in (model, dense):
        cache, kv = new_cache(m, [9], 16)
        logits.append(m.compute_logits(prefill(m, cache, kv, [ids], [None])[0]))
    assert relative_error(*logits) < 1e-4
