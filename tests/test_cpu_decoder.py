"""The fused C++ decoder step (smolvlm_fast.cpu.decoder, csrc/cpu/decoder_step.cpp) against the NumPy model's own
free-function decoder: same weights, same cache, same metadata; prefill (whole, in chunks, after a cached prefix,
mixed with decoding sequences, with image features) and decode; float32, int4, Q8_0 and the real GGUF's mix."""
import numpy as np
import pytest

from smolvlm_fast.cpu import decoder as cpu_decoder
from smolvlm_fast.engine.cache import PagedCache, schedule_step
from smolvlm_fast.models.smolvlm_numpy import NumpyModel
from smolvlm_fast.cpu.weights import row_slice

pytestmark = pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decode step")


def run_steps(model: NumpyModel, prompts: list[list[int]], steps: int, block_size: int, fused: bool,
              poison: bool = True):
    """Prefill each prompt alone, then decode them together greedily for `steps` steps; returns the logits of
    every decode step [steps, S, V] (the first row: the prefills' last tokens) and the tokens. Cache slots no
    sequence owns hold NaN (poison): a read past a sequence's keys shows up in the logits."""
    model.fused = fused
    cache = PagedCache(num_blocks=64, block_size=block_size)
    kv = model.allocate_kv_cache(64, block_size)
    if poison:
        for k, v in kv:
            k.fill(np.nan)
            v.fill(np.nan)
    first = []
    for seq_id, ids in enumerate(prompts):
        meta = schedule_step(cache, {seq_id: len(ids)})
        first.append(model.compute_logits(model.forward(np.array(ids), meta, kv)[-1:])[0])
    last = [int(row.argmax()) for row in first]
    all_logits, tokens = [np.stack(first)], [last]
    for _ in range(steps):
        meta = schedule_step(cache, {s: 1 for s in range(len(prompts))})
        logits = model.compute_logits(model.forward(np.array(last), meta, kv))  # [S, V]
        last = logits.argmax(-1).tolist()
        all_logits.append(logits)
        tokens.append(last)
    return np.stack(all_logits), tokens


def assert_same_decode(model, prompts, steps, block_size, rtol=1e-5):
    fused_logits, fused_tokens = run_steps(model, prompts, steps, block_size, fused=True)
    numpy_logits, numpy_tokens = run_steps(model, prompts, steps, block_size, fused=False)
    assert np.isfinite(fused_logits).all()
    scale = np.abs(numpy_logits).max()
    assert np.abs(fused_logits - numpy_logits).max() <= rtol * scale
    assert fused_tokens == numpy_tokens


def prompts_for(block_size: int, seed: int, vocab: int = 300):
    rng = np.random.default_rng(seed)
    # lengths end on a block edge, one past it, one short of it, and one much longer than the others
    lengths = [block_size, block_size + 1, 2 * block_size - 1, 6 * block_size + 3, 1]
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("block_size", [4, 16])
def test_fused_equals_numpy_float32(tiny_llama, block_size):
    model = NumpyModel.from_checkpoint(tiny_llama)
    assert_same_decode(model, prompts_for(block_size, seed=block_size), steps=2 * block_size + 1,
                       block_size=block_size)


@pytest.mark.usefixtures("float32_kv_cache")  # compares products; the float16 cache: test_cpu_kv16.py
def test_fused_equals_numpy_int4(tiny_llama):
    model = NumpyModel.from_checkpoint(tiny_llama, quantize="int4")
    assert_same_decode(model, prompts_for(16, seed=1), steps=20, block_size=16)


def test_fused_of_a_vlm_text_model(tiny_idefics3):
    model = NumpyModel.from_checkpoint(tiny_idefics3)
    assert_same_decode(model, prompts_for(16, seed=2, vocab=420), steps=8, block_size=16)


def test_fused_with_qkv_bias(tiny_llama):
    model = NumpyModel.from_checkpoint(tiny_llama)
    rng = np.random.default_rng(3)
    t = model.config.text
    width = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    for i in range(t.num_hidden_layers):
        model.weights[f"model.layers.{i}.self_attn.qkv_proj.bias"] = rng.standard_normal(width).astype(np.float32)
    assert_same_decode(model, prompts_for(16, seed=3), steps=6, block_size=16)


@pytest.mark.usefixtures("float32_kv_cache")  # compares products; the float16 cache: test_cpu_kv16.py
def test_fused_on_the_real_gguf(smollm2_gguf):
    """Q4_1 layers and the Q8_0 tied embedding, as shipped."""
    model = NumpyModel.from_checkpoint(smollm2_gguf)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(10, 49000, n).tolist() for n in (5, 37)]
    assert_same_decode(model, prompts, steps=6, block_size=16, rtol=2e-5)


# ---------------------------------------------------------------- checks at the border


@pytest.fixture(scope="module")
def decoder_and_step(tiny_llama):
    model = NumpyModel.from_checkpoint(tiny_llama)
    decoder = cpu_decoder.build_decoder(model.weights, model.config, "model.")
    t = model.config.text
    kv = model.allocate_kv_cache(4, 16)
    args = dict(x=np.zeros((1, t.hidden_size), np.float32), kv_caches=kv, positions=np.array([3], np.int32),
                slot_mapping=np.array([3], np.int32), block_tables=np.array([[0, 1]], np.int32),
                seq_lens=np.array([4], np.int32), cos_sin=model.rope(8))
    return decoder, args


def test_a_good_step_runs(decoder_and_step):
    decoder, args = decoder_and_step
    x = np.random.default_rng(0).standard_normal(args["x"].shape).astype(np.float32)
    decoder.step(**{**args, "x": x})
    assert np.isfinite(x).all()


@pytest.mark.parametrize("change, message", [
    (dict(positions=np.array([8], np.int32)), "outside the cos/sin table"),
    (dict(positions=np.array([3], np.int64)), "positions must be int32"),
    (dict(slot_mapping=np.array([64], np.int32)), "not a cache slot"),
    (dict(block_tables=np.array([[0, 9]], np.int32), seq_lens=np.array([20], np.int32)), "not a block id"),
    (dict(seq_lens=np.array([33], np.int32)), "seq_lens"),
    (dict(seq_lens=np.array([0], np.int32)), "seq_lens"),
    (dict(x=np.zeros((1, 5), np.float32)), "x must have shape"),
    (dict(x=np.zeros((1, 128), np.float32)[:, ::2]), "C-contiguous"),
    (dict(kv_caches=[]), "pairs"),
    (dict(query_start_loc=np.array([0, 2], np.int32)), "query_start_loc must run from 0"),
    (dict(x=np.zeros((2, 64), np.float32), positions=np.array([2, 3], np.int32),
          slot_mapping=np.array([2, 3], np.int32), query_start_loc=np.array([0, 2], np.int32),
          seq_lens=np.array([1], np.int32)), "2 new tokens for seq_lens 1"),
    (dict(x=np.zeros((2, 64), np.float32), positions=np.array([2, 3], np.int32),
          slot_mapping=np.array([2, 3], np.int32)), "without query_start_loc"),
])
def test_bad_step_arguments_raise(decoder_and_step, change, message):
    decoder, args = decoder_and_step
    args = {**args, **change}
    with pytest.raises(ValueError, match=message):
        decoder.step(**args)


def test_bad_weights_raise(tiny_llama):
    from smolvlm_fast import _cpu
    model = NumpyModel.from_checkpoint(tiny_llama)
    t = model.config.text
    weights = dict(model.weights)
    weights["model.layers.0.mlp.down_proj.weight"] = weights["model.layers.0.mlp.down_proj.weight"][:, :-1]
    with pytest.raises(ValueError, match="layer 0 down"):
        cpu_decoder.build_decoder(weights, model.config, "model.")
    quantized = NumpyModel.from_checkpoint(tiny_llama, quantize="int4")
    weights = dict(quantized.weights)
    down = weights["model.layers.1.mlp.down_proj.weight"]
    weights["model.layers.1.mlp.down_proj.weight"] = row_slice(down, 0, down.N - 1)  # one row short, still int4
    with pytest.raises(ValueError, match=r"layer 1 down: has shape \[63, 128\]"):
        cpu_decoder.build_decoder(weights, quantized.config, "model.")
    with pytest.raises(ValueError, match="bad shape"):
        _cpu.Decoder([], np.ones(t.hidden_size, np.float32), t.intermediate_size, 9, 4, t.head_dim, t.head_dim,
                     1e-5, 0.1)
