"""The fused C++ decoder serving the factorized variant (docs/xattn.md) with Llama blocks: the decoder runs as
segments (cpu_decoder.build_segments), one _cpu.Decoder per run of layers between cross-attention layers, with the
cross layers in NumPy between them. Checked against the NumPy free functions (NumpyModel(fused=False)) on random
checkpoints from init_random: prefill + 8 decode steps of a packed batch (one sequence with an image, one without),
cross layers after the first, a middle and the last decoder layer; a Decoder without final norm leaves the hidden
state x + residual of its layers; Phi blocks stay in NumPy.

Tolerance, relative to the largest logit: both sides run in float32 over the same weights and differ only in the
order of their sums (C++ vs NumPy products and attention). These std=0.3 weights amplify that rounding: over 50
runs of each case the median error was 2e-6 and the largest 3.1e-5, as large as with no cross layers at all
(1.4e-5), so RTOL = 1e-4 (as test_xattn_numpy.py). A skipped cross layer, one with another layer's weights, a
wrong slice of the KV caches or a final norm too many or too few moves the logits by 1e-2 or more.
"""
import numpy as np
import pytest

from smolvlm_fast.cpu import decoder as cpu_decoder
from smolvlm_fast import init_random
from smolvlm_fast.engine.cache import schedule_step
from smolvlm_fast.config import ModelConfig
from smolvlm_fast.models.smolvlm_numpy import NumpyModel, Step, decoder_layer
from smolvlm_fast.cpu.weights import text_prefix
from tests.test_xattn_numpy import PATCH, SIZE, Run, assert_varied, pixels

pytestmark = pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decode step")

RTOL = 1e-4
LAYERS = 5


def llama_variant(cross: tuple, arch: str = "llama") -> dict:
    return {
        "model_type": "smolvlm_fast_xattn",
        "vision_config": {"image_size": SIZE, "patch_size": PATCH, "patch_stem": "dwsep", "hidden_size": 24,
                          "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2},
        "text_config": {"architecture": arch, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16, "partial_rotary_factor": 0.5, "max_position_embeddings": 256,
                        **({"hidden_act": "gelu_new"} if arch == "phi" else {})},
        "cross_attention_layers": list(cross),
        "scale_factor": 1, "image_token_id": 260, "eos_token_id": 259,
    }


def checkpoint(tmp_path, cross: tuple, rng, arch: str = "llama"):
    seed = int(rng.integers(1 << 30))
    return init_random(llama_variant(cross, arch), tmp_path / "ckpt", seed=seed, std=0.3)


def assert_close(ours, ref):
    assert np.isfinite(ours).all()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("cross, quantize", [((0,), None), ((2,), None), ((LAYERS - 1,), None),
                                             ((0, 2, LAYERS - 1), None), ((1, 3), "int4")])
@pytest.mark.usefixtures("float32_kv_cache")  # compares products; the float16 cache: test_cpu_kv16.py
def test_fused_equals_free_functions(tmp_path, cross, quantize, rng):
    """A packed prefill (the image's sequence first or second), then 8 greedy decode steps of both sequences
    together: every logit of the fused model equals the free functions'."""
    path = checkpoint(tmp_path, cross, rng)
    fused, free = (NumpyModel.from_checkpoint(path, quantize=quantize, fused=f) for f in (None, False))
    assert fused.fused and not free.fused
    kv = free.cross_kv(free.image_features_per_row(pixels(rng))[0])
    image_seq = int(rng.integers(2))
    ids = {0: rng.integers(0, 256, 9), 1: rng.integers(0, 256, 6)}
    cross_of = {image_seq: kv}
    runs = Run(fused), Run(free)
    prefill, ref = (run.step(ids, cross_of) for run in runs)
    assert_close(prefill, ref)
    seen, lengths = [ref], [len(ids[0]), len(ids[1])]
    for _ in range(8):
        last = {s: [int(ref[end].argmax())] for s, end in enumerate(np.cumsum(lengths) - 1)}  # greedy, per sequence
        ours, ref = (run.step(last, cross_of) for run in runs)
        assert_close(ours, ref)
        seen.append(ref)
        lengths = [1, 1]
    assert_varied(np.concatenate(seen))
    without = Run(free).step(ids, {})  # [T, V]: the text-only sequence's rows as they were, the other's moved
    rows = [slice(0, 9), slice(9, 15)]
    assert_close(prefill[rows[1 - image_seq]], without[rows[1 - image_seq]])
    assert np.abs(without[rows[image_seq]] - seen[0][rows[image_seq]]).max() > 1e-2 * np.abs(seen[0]).max()


@pytest.mark.parametrize("layers", [range(0, LAYERS), range(0, 1), range(2, LAYERS), range(1, 3)])
def test_decoder_without_final_norm_leaves_the_hidden_state(tmp_path, layers, rng):
    """A segment's Decoder (final_norm None) over fresh random x: a prefill of two sequences, then a decode step;
    out comes x + residual after its layers, as decoder_layer computes it, and the same K/V in the cache."""
    model = NumpyModel.from_checkpoint(checkpoint(tmp_path, (1, 3), rng), fused=False)
    t, prefix = model.config.text, text_prefix(model.config)
    segment = cpu_decoder.build_decoder(model.weights, model.config, prefix, layers=layers, final_norm=False)
    assert len(segment) == len(layers)
    ours, ref = Run(model), Run(model)
    for new in ({0: 7, 1: 12}, {0: 1, 1: 1}):
        x = rng.standard_normal((sum(new.values()), t.hidden_size)).astype(np.float32)  # [T, D]
        meta = schedule_step(ours.cache, new)  # ref's cache arrays take the same slots
        kv_ours = [ours.kv[i] for i in layers]
        kv_ref = [ref.kv[i] for i in layers]
        got = cpu_decoder.step(segment, x.copy(), meta, kv_ours, model.rope(max(meta.seq_lens)))  # [T, D]
        step = Step.from_metadata(meta, model.rope(max(meta.seq_lens)), ours.cache.block_size, t.num_attention_heads)
        h, residual = x, None
        for i, kv in zip(layers, kv_ref):
            h, residual = decoder_layer(model.weights, f"{prefix}layers.{i}.", t, h, residual, step, kv)
        assert_close(got, h + residual)
        for (k, v), (k_ref, v_ref) in zip(kv_ours, kv_ref):
            written = ~np.isnan(k_ref)
            assert (written == ~np.isnan(k)).all()
            assert_close(k[written], k_ref[written])
            assert_close(v[written], v_ref[written])


def test_segments_and_their_checks(tmp_path, rng):
    """Segments split after each cross layer; the last holds the final norm unless a cross layer is last; Phi
    blocks stay on the NumPy path; a Decoder without final norm needs layers to know the hidden size."""
    from smolvlm_fast import _cpu

    config = ModelConfig.from_dict(llama_variant((0, 2)))
    model = NumpyModel.from_checkpoint(checkpoint(tmp_path, (0, 2), rng))
    segments = cpu_decoder.build_segments(model.weights, config, text_prefix(config))
    assert [layers for layers, _ in segments] == [range(0, 1), range(1, 3), range(3, LAYERS)]
    last = ModelConfig.from_dict(llama_variant((1, LAYERS - 1)))
    assert [r for r, _ in cpu_decoder.build_segments(model.weights, last, text_prefix(last))] == \
        [range(0, 2), range(2, LAYERS)]
    assert not NumpyModel.from_checkpoint(checkpoint(tmp_path / "phi", (0, 2), rng, arch="phi")).fused
    t = config.text
    with pytest.raises(ValueError, match="without final_norm"):
        _cpu.Decoder([], None, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
                     t.rotary_dim, 1e-5, 0.25)
