"""The NumPy backend of the factorized variant (model_type smolvlm_fast_xattn, docs/xattn.md): small random
checkpoints of every tensor in weights.layout.tensor_shapes, loaded with NumpyModel.from_checkpoint and driven
through the engine's cache helpers (PagedCache, schedule_step). Checked: decode with the request's cached cross
K/V equals recomputing the whole prefix; a packed batch (one sequence with images, one without) equals each
alone; the three patch stems equal a direct convolution; Phi and Llama blocks with partial rotary; a text-only
request skips the cross layers; bad inputs raise InputError; int4 loading; the C++ decoder with partial rotary.

Tolerances, relative to the largest logit: both sides of each comparison run in float32 over the same weights and
differ only in the order of their sums (paged decode vs prefill attention, packed vs alone BLAS blocking, C++ vs
NumPy, int4 products by another kernel, the reference's float64 RoPE angles). The largest error seen over 15 runs
of every test was 1.3e-5 (these random weights amplify rounding ~100x), so RTOL = 1e-4; a real fault (a skipped
cross layer, a wrong RoPE row, a K/V row of another sequence) moves the logits by 1e-2 or more.
"""
import json

import numpy as np
import pytest
import safetensors.numpy

from smolvlm_fast.cpu import decoder as cpu_decoder
from smolvlm_fast.formats import int4 as int4_format
from smolvlm_fast.engine.cache import PagedCache, schedule_step
from smolvlm_fast.config import ModelConfig
from smolvlm_fast.errors import InputError
from smolvlm_fast.models.batch import SequenceImages
from smolvlm_fast.models.smolvlm_numpy import NumpyModel
from smolvlm_fast.models.vision_numpy import stem_embeddings
from smolvlm_fast.cpu.ops import apply_rope, rope_table
from smolvlm_fast.formats.layout import tensor_shapes

RTOL = 1e-4
IMAGE_TOKEN, SIZE, PATCH = 5, 32, 8


def xattn_config(arch="phi", stem="dwsep", groups=1, cross=(0, 2), scale=1, tie=False, factor=0.5) -> dict:
    return {
        "model_type": "smolvlm_fast_xattn",
        "vision_config": {"image_size": SIZE, "patch_size": PATCH, "num_channels": 3, "patch_stem": stem,
                          "groups": groups, "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"},
        "text_config": {"architecture": arch, "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
                        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "partial_rotary_factor": factor, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                        "layer_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": tie,
                        **({} if arch == "llama" else {"hidden_act": "gelu_new"})},
        "cross_attention_layers": list(cross),
        "scale_factor": scale,
        "image_token_id": IMAGE_TOKEN,
        "eos_token_id": 100,
    }


def random_tensors(config: dict, rng) -> dict:
    """Every tensor the layout names: norms' weights 1 + N(0, 0.1), gates +-(0.5..0.9), the rest N(0, 0.3) (with
    smaller weights the embeddings dominate, and greedy decoding of a tied model repeats one token)."""
    tensors = {}
    for name, shape in tensor_shapes(ModelConfig.from_dict(config)).items():
        if name.endswith("_gate"):
            w = rng.choice([-1, 1]) * rng.uniform(0.5, 0.9, shape)
        elif "norm" in name and name.endswith(".weight"):
            w = 1 + 0.1 * rng.standard_normal(shape)
        else:
            w = 0.3 * rng.standard_normal(shape)
        tensors[name] = w.astype(np.float32)
    return tensors


def write_checkpoint(path, config: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    return path


def build(tmp_path, rng, **kwargs) -> tuple[NumpyModel, dict, dict]:
    """A random checkpoint of the variant on disk (weights drawn from rng), loaded: (model, config dict, tensors)."""
    config = xattn_config(**kwargs)
    tensors = random_tensors(config, rng)
    return NumpyModel.from_checkpoint(write_checkpoint(tmp_path / "ckpt", config, tensors)), config, tensors


def pixels(rng, n=1) -> np.ndarray:
    return rng.uniform(-1, 1, (1, n, 3, SIZE, SIZE)).astype(np.float32)  # [1, n, C, S, S]


def prompt(rng, n_images=1, length=11) -> np.ndarray:
    ids = rng.integers(6, 100, length)
    ids[1:1 + n_images] = IMAGE_TOKEN  # one <image> token per image, embedded as an ordinary token
    return ids


class Run:
    """Sequences over one paged cache whose unowned slots hold NaN (a read past a sequence's keys shows)."""

    def __init__(self, model: NumpyModel, block_size=4, num_blocks=64):
        self.model, self.cache = model, PagedCache(num_blocks, block_size)
        self.kv = model.allocate_kv_cache(num_blocks, block_size)
        for k, v in self.kv:
            k.fill(np.nan)
            v.fill(np.nan)

    def step(self, new: dict, cross: dict) -> np.ndarray:
        """new: seq id -> its new token ids, packed in that order; cross: seq id -> cross_kv (or absent) ->
        the logits of every packed token [T, V]."""
        meta = schedule_step(self.cache, {s: len(ids) for s, ids in new.items()})
        images = [None if cross.get(s) is None else SequenceImages(kept=cross[s]) for s in new]
        hidden = self.model.forward(np.concatenate([np.asarray(ids) for ids in new.values()]), meta, self.kv, images)
        return self.model.compute_logits(hidden)


def full_logits(model, ids, cross_kv) -> np.ndarray:
    """The whole sequence in one prefill on a fresh cache: [len(ids), V]."""
    return Run(model, num_blocks=-(-len(ids) // 4)).step({0: ids}, {0: cross_kv})


def assert_varied(logits):
    """The rows' top tokens differ: the random model is not so flat that equal greedy tokens mean nothing."""
    assert len(set(np.asarray(logits).argmax(-1).tolist())) > 1, "the random model is too flat for this test"


def assert_close(ours, ref):
    assert np.isfinite(ours).all()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"relative error {err:.2e}"


def features_and_kv(model, rng, n_images=1):
    features = model.image_features_per_row(pixels(rng, n_images))[0]  # [n_images * seq, H]
    return features, model.cross_kv(features)


# ---------------------------------------------------------------- (a) decode with cached cross K/V


@pytest.mark.parametrize("arch, stem, groups", [("phi", "dwsep", 1), ("llama", "grouped", 3), ("llama", "conv", 1)])
def test_decode_equals_recomputing_the_prefix(tmp_path, arch, stem, groups, rng):
    """Prompt prefilled in two chunks, then 8 greedy decode steps, all with the cross K/V computed once; each
    step's logits equal a fresh prefill of the whole sequence so far (its last row)."""
    model, _, _ = build(tmp_path, rng, arch=arch, stem=stem, groups=groups, scale=2 if stem == "conv" else 1)
    _, cross = features_and_kv(model, rng, n_images=2)
    ids = prompt(rng, n_images=2, length=13)
    run = Run(model)
    run.step({0: ids[:6]}, {0: cross})  # a prefill chunk, then the rest after the cached prefix
    logits = run.step({0: ids[6:]}, {0: cross})[-1]
    tokens = list(ids)
    for _ in range(8):
        full = full_logits(model, tokens, cross)
        assert_close(logits, full[-1])
        tokens.append(int(logits.argmax()))
        logits = run.step({0: [tokens[-1]]}, {0: cross})[0]
    assert_varied(full)


# ---------------------------------------------------------------- (b) packed batch


@pytest.mark.parametrize("arch", ["phi", "llama"])
@pytest.mark.parametrize("image_first", [True, False])
def test_packed_batch_equals_each_alone(tmp_path, arch, image_first, rng):
    """One sequence with an image and one text-only, prefilled and decoded together, give the logits each
    gives alone."""
    model, _, _ = build(tmp_path, rng, arch=arch, stem="grouped", groups=3)
    _, cross = features_and_kv(model, rng)
    seqs = {0: prompt(rng, length=9), 1: rng.integers(6, 100, 14)}
    kvs = {0: cross, 1: None}
    order = [0, 1] if image_first else [1, 0]
    together = Run(model)
    logits = together.step({s: seqs[s] for s in order}, kvs)
    ends = np.cumsum([len(seqs[s]) for s in order])
    alone = {s: Run(model) for s in order}
    for s, start, end in zip(order, ends - [len(seqs[s]) for s in order], ends):
        assert_close(logits[start:end], alone[s].step({s: seqs[s]}, kvs))
    last = {s: int(logits[e - 1].argmax()) for s, e in zip(order, ends)}
    for _ in range(5):  # decode steps: one token per sequence, packed
        logits = together.step({s: [last[s]] for s in order}, kvs)
        for row, s in enumerate(order):
            assert_close(logits[row], alone[s].step({s: [last[s]]}, kvs)[0])
        last = {s: int(logits[row].argmax()) for row, s in enumerate(order)}


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_chunked_prefill_equals_whole(tmp_path, arch, monkeypatch, rng):
    """A long prompt's MLPs (Phi's, Llama's and the cross layers') run MLP_ROWS tokens at a time and its attention
    (self and cross) in query chunks under MAX_SCORES: with both tiny, the logits stay those of one piece."""
    from smolvlm_fast.models import smolvlm_numpy as model_numpy
    from smolvlm_fast.cpu import ops as numpy_ops

    model, _, _ = build(tmp_path, rng, arch=arch)
    _, cross = features_and_kv(model, rng, n_images=2)
    ids = prompt(rng, n_images=2, length=23)
    whole = full_logits(model, ids, cross)
    monkeypatch.setattr(model_numpy, "MLP_ROWS", 5)
    monkeypatch.setattr(numpy_ops, "MAX_SCORES", 4 * 40)
    monkeypatch.setattr(numpy_ops, "_cpu", None)  # the NumPy attention, which is what chunks its queries
    assert_close(full_logits(model, ids, cross), whole)


# ---------------------------------------------------------------- (c) patch stems


def direct_conv(x, weight, bias, groups):
    """x [C, S, S], weight [D, C/groups, P, P] -> [(S/P)^2, D]: the stride-P conv, one patch and group at a time."""
    C, S, _ = x.shape
    D, Cg, P, _ = weight.shape
    Dg, n = D // groups, S // P
    out = np.zeros((n * n, D), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            patch = x[:, i * P:(i + 1) * P, j * P:(j + 1) * P].astype(np.float64)  # [C, P, P]
            for g in range(groups):
                w = weight[g * Dg:(g + 1) * Dg].astype(np.float64)  # [D/g, C/g, P, P]
                out[i * n + j, g * Dg:(g + 1) * Dg] = (w * patch[g * Cg:(g + 1) * Cg]).sum(axis=(1, 2, 3))
    return out + bias


@pytest.mark.parametrize("stem, groups", [("conv", 1), ("grouped", 3), ("dwsep", 1)])
def test_patch_stems_equal_a_direct_convolution(tmp_path, stem, groups, rng):
    model, _, w = build(tmp_path, rng, stem=stem, groups=groups)
    x = pixels(rng, 2)[0]  # [2, C, S, S]
    ours = stem_embeddings(model.weights, model.config.vision, x)  # [2, N, D]
    p = "model.vision_model.embeddings."
    for image, out in zip(x, ours):
        if stem == "dwsep":
            depthwise = direct_conv(image, w[p + "patch_embedding.depthwise.weight"],
                                    w[p + "patch_embedding.depthwise.bias"], groups=3)  # [N, C]
            ref = depthwise @ w[p + "patch_embedding.pointwise.weight"].T + w[p + "patch_embedding.pointwise.bias"]
        else:
            ref = direct_conv(image, w[p + "patch_embedding.weight"], w[p + "patch_embedding.bias"], groups)
        ref += w[p + "position_embedding.weight"]  # row-major patches, one position each
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1, 2])
def test_image_features_rows(tmp_path, scale, rng):
    """(S/P)^2 / scale^2 rows of text-hidden-size features per real image; all-zero padding images give none;
    an image's features do not depend on its batch neighbours."""
    model, _, _ = build(tmp_path, rng, stem="conv", scale=scale)
    batch = pixels(rng, 2).repeat(2, axis=0)  # [2, 2, C, S, S]
    batch[1, 1] = 0
    first, second = model.image_features_per_row(batch)
    per_image = (SIZE // PATCH) ** 2 // scale**2
    assert first.shape == (2 * per_image, 64) and second.shape == (per_image, 64)
    assert first.dtype == np.float32 and np.isfinite(first).all()
    assert_close(second, first[:per_image])
    assert model.image_features_per_row(0 * batch) == [None, None]


# ---------------------------------------------------------------- (d) partial rotary


def test_partial_rope_rotates_the_leading_features_only(rng):
    """rope_table(R) with R < head_dim: rotate-half on features [0, R) of each head, the rest untouched."""
    T, H, Dh, R = 7, 3, 16, 8
    x = rng.standard_normal((T, H, Dh)).astype(np.float32)
    positions = rng.integers(0, 100, T)
    out = apply_rope(x, rope_table(R, 100, 10000.0), positions)
    angle = positions[:, None] * 10000.0 ** (-np.arange(0, R, 2) / R)  # [T, R/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]  # [T, 1, R/2]
    x1, x2 = x[..., :R // 2], x[..., R // 2:R]
    ref = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], axis=-1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)  # float32 angles up to 100 rad: ~1e-5 off
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(x, rope_table(R, 100, 10000.0), positions, rotary_dim=Dh)


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_logits_follow_relative_positions(tmp_path, arch, rng):
    """RoPE (partial, factor 0.5) makes attention see position differences only: the same tokens prefilled
    after a cached prefix equal them prefilled alone at positions shifted by hand (StepMetadata positions);
    a rotary table of the wrong width would break this."""
    model, _, _ = build(tmp_path, rng, arch=arch)
    ids = rng.integers(6, 100, 9)
    ref = full_logits(model, ids, None)
    run = Run(model, block_size=4, num_blocks=8)
    meta = schedule_step(run.cache, {0: len(ids)})
    meta.positions = [p + 13 for p in meta.positions]  # every position shifted: same differences
    model.rope(64)  # the table grows with the sequence lengths; these positions are past them
    assert_close(model.compute_logits(model.forward(ids, meta, run.kv)), ref)


@pytest.mark.skipif(not cpu_decoder.available(), reason="smolvlm_fast._cpu has no fused decode step")
def test_fused_llama_with_partial_rotary(tmp_path, rng):
    """Without cross layers a Llama variant runs in the C++ decoder, its partial rotary included, with the
    NumPy free functions' logits; Phi blocks or cross layers never take the C++ step."""
    model, config, tensors = build(tmp_path, rng, arch="llama", cross=())
    assert model.fused
    numpy_model = NumpyModel(model.config, tensors, fused=False)
    seqs = {0: rng.integers(6, 100, 10), 1: rng.integers(6, 100, 3)}
    fused, free = Run(model), Run(numpy_model)
    assert_close(fused.step(seqs, {}), free.step(seqs, {}))
    for _ in range(4):
        assert_close(fused.step({0: [7], 1: [9]}, {}), free.step({0: [7], 1: [9]}, {}))
    assert not build(tmp_path / "phi", rng, arch="phi", cross=())[0].fused
    # Llama with cross layers: C++ segments (test_xattn_numpy_fused)
    assert build(tmp_path / "x", rng, arch="llama")[0].fused


# ---------------------------------------------------------------- (e) text-only requests


@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_text_only_request_skips_the_cross_layers(tmp_path, arch, rng):
    """A sequence without images gives what the same weights give with no cross layers at all; with an image
    (and only then) the cross layers change its logits."""
    model, config, tensors = build(tmp_path, rng, arch=arch)
    plain_config = {**config, "cross_attention_layers": []}
    plain_tensors = {n: t for n, t in tensors.items() if ".cross_layers." not in n}
    plain = NumpyModel.from_checkpoint(write_checkpoint(tmp_path / "plain", plain_config, plain_tensors))
    ids = prompt(rng)
    ref = full_logits(plain, ids, None)
    assert_close(full_logits(model, ids, None), ref)
    _, cross = features_and_kv(model, rng)
    assert np.abs(full_logits(model, ids, cross) - ref).max() > 1e-2 * np.abs(ref).max()


# ---------------------------------------------------------------- (f) bad inputs, loading


def test_the_model_derives_its_image_kv_once(tmp_path, rng):
    """Given a sequence's image features, the model computes their cross K/V at its first step and keeps them with
    the sequence: the same logits as handing it the K/V, and the later steps reuse them."""
    model, _, _ = build(tmp_path, rng)
    features, cross = features_and_kv(model, rng)
    ids = prompt(rng)
    run, images = Run(model), SequenceImages.of(features)
    meta = schedule_step(run.cache, {0: len(ids)})
    derived = model.compute_logits(model.forward(ids, meta, run.kv, [images]))
    assert_close(derived, full_logits(model, ids, cross))
    kept = images.kept
    assert all(np.array_equal(k, k2) and np.array_equal(v, v2) for (k, v), (k2, v2) in zip(kept, cross))
    model.forward(np.array([7]), schedule_step(run.cache, {0: 1}), run.kv, [images])
    assert images.kept is kept


def test_bad_inputs(tmp_path, rng):
    model, _, _ = build(tmp_path, rng)
    for shape in ((1, 1, 3, 2 * SIZE, 2 * SIZE), (1, 1, 3, SIZE, SIZE + PATCH), (1, 1, 1, SIZE, SIZE),
                  (3, SIZE, SIZE)):
        with pytest.raises(InputError):
            model.image_features_per_row(rng.uniform(-1, 1, shape))
    features, cross = features_and_kv(model, rng)
    with pytest.raises(InputError, match="image features must be"):
        model.cross_kv(features[:, :10])
    run = Run(model)
    ids = prompt(rng)
    meta = schedule_step(run.cache, {0: len(ids)})
    with pytest.raises(InputError, match="2 entries for a step of 1"):
        model.forward(ids, meta, run.kv, [SequenceImages(kept=cross), None])
    with pytest.raises(InputError, match="1 layers, the model has 2 cross layers"):
        model.forward(ids, meta, run.kv, [SequenceImages(kept=cross[:1])])
    with pytest.raises(InputError, match="image features must be"):  # the model derives its K/V from bad features
        model.forward(ids, meta, run.kv, [SequenceImages.of(features[:, :10])])


@pytest.mark.usefixtures("float32_kv_cache")  # compares products; the float16 cache: test_cpu_kv16.py
@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_quantize_int4(tmp_path, arch, rng):
    """quantize="int4" makes every decoder linear int4, Phi's and the cross layers' included, and the model computes
    what the same weights dequantized give (the LM head becomes Q8_0; the vision encoder stays float)."""
    build(tmp_path, rng, arch=arch)
    model = NumpyModel.from_checkpoint(tmp_path / "ckpt", quantize="int4")
    w = model.weights
    names = ["self_attn.dense.weight", "mlp.fc1.weight", "mlp.fc2.weight"] if arch == "phi" else \
        ["self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"]
    names = ["model.text_model.layers.2." + n for n in names + ["self_attn.qkv_proj.weight"]]
    names += ["model.text_model.cross_layers.1.cross_attn." + n for n in ("q_proj.weight", "k_proj.weight")]
    names += ["model.text_model.cross_layers.0.mlp." + n for n in ("gate_up_proj.weight", "down_proj.weight")]
    assert all(isinstance(w[n], int4_format.Int4Weight) for n in names)
    assert isinstance(w["lm_head.weight"], int4_format.Q8Weight)
    dense = NumpyModel(model.config, {n: int4_format.dequantize(t) for n, t in w.items()})
    features, cross = features_and_kv(model, rng)
    ids = prompt(rng)
    assert_close(full_logits(model, ids, cross), full_logits(dense, ids, dense.cross_kv(features)))


# ---------------------------------------------------------------- against the independent PyTorch reference


@pytest.mark.parametrize("arch, stem, groups, scale, tie", [("phi", "dwsep", 1, 1, True),
                                                            ("llama", "grouped", 3, 2, False)])
def test_matches_the_pytorch_reference(tmp_path, arch, stem, groups, scale, tie, rng):
    """tests/xattn_reference.py (written from docs/xattn.md alone, whole sequence recomputed every step): the same
    layout, full-prefill logits within 1e-4 of the largest, and 16 greedy tokens identical to ours decoded over the
    paged cache with the cross K/V computed once; a text-only prompt too."""
    torch = pytest.importorskip("torch")
    from . import xattn_reference

    config = xattn_config(arch=arch, stem=stem, groups=groups, scale=scale, tie=tie)
    tensors = random_tensors(config, rng)
    assert {n: t.shape for n, t in tensors.items()} == xattn_reference.tensor_shapes(config)  # one layout, twice
    model = NumpyModel.from_checkpoint(write_checkpoint(tmp_path, config, tensors))
    reference = xattn_reference.XAttnReference(config, {n: torch.from_numpy(t) for n, t in tensors.items()})
    images = pixels(rng, 2)  # [1, 2, C, S, S]
    for ids, pix in ((prompt(rng, n_images=2, length=12), images), (rng.integers(6, 100, 10), None)):
        cross = None if pix is None else model.cross_kv(model.image_features_per_row(pix)[0])
        with torch.no_grad():
            ref_logits = reference.logits(ids.tolist(), None if pix is None else torch.from_numpy(pix[0])).numpy()
        assert_close(full_logits(model, ids, cross), ref_logits)
        assert_varied(ref_logits)
        run = Run(model)
        logits = run.step({0: ids}, {0: cross})[-1]
        tokens = []
        for _ in range(16):
            tokens.append(int(logits.argmax()))
            logits = run.step({0: [tokens[-1]]}, {0: cross})[0]
        with torch.no_grad():
            assert tokens == reference.greedy(ids.tolist(), None if pix is None else torch.from_numpy(pix[0]), 16)
