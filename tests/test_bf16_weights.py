"""Packed bf16 weights (formats/bf16.py), what a model in precision "bfloat16" keeps its decoder and LM head in:
packing bit for bit as the C++ packs and as torch rounds, row views and stacks, `linear` over them (C++ and the
NumPy fallback) against float64 within the float32 summation bound, and the model: its decoder held as bf16
(half the bytes), the fused C++ step equal to the free functions, and its logits and greedy tokens against
transformers float32 within what transformers' own bf16 gives (issue: "our bf16 error at most 2x transformers
bf16's")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor
from smolvlm_fast.cpu import linear as cpu_linear
from smolvlm_fast.cpu.weights import GATE_UP, QKV, row_slice, stack_rows
from smolvlm_fast.formats import bf16 as fb
from smolvlm_fast.formats.int4 import embedding_rows
from smolvlm_fast.models.smolvlm_numpy import NumpyModel

from .fixtures import build_tiny_vlm, load_hf_processor
from .test_cpu_bf16_gemm import bf16, check
from .test_model_numpy import new_cache, prefill
from .test_model_parity import cases, prompts

cpu = pytest.importorskip("smolvlm_fast._cpu", reason="the C++ extension is not built (pip install -e .)")

RNG = np.random.default_rng()  # replaced for each test by one from that test's seed (tests/conftest_seed.py)
SHAPES = [(1, 1), (17, 33), (40, 576), (5, 64), (48, 100)]


@pytest.mark.parametrize("N, K", SHAPES)
def test_pack_is_the_kernels_and_torchs(N, K):
    w = RNG.standard_normal((N, K), dtype=np.float32) * np.float32(RNG.uniform(0.01, 100))
    w.flat[RNG.integers(0, w.size)] = np.nan
    packed = fb.pack_bf16(w)
    np.testing.assert_array_equal(packed.packed, cpu.bf16_pack(w))
    finite = np.nan_to_num(w, nan=1.0)
    out = fb.dequantize_bf16(packed)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(w))
    np.testing.assert_array_equal(np.nan_to_num(out), np.nan_to_num(bf16(w).astype(np.float32)))
    rows = RNG.integers(0, N, 7)
    np.testing.assert_array_equal(embedding_rows(fb.pack_bf16(finite), rows), bf16(finite)[rows].astype(np.float32))
    np.testing.assert_array_equal(fb.round_bf16(finite), bf16(finite).astype(np.float32))


def test_rows_and_stacks():
    """Row views from a multiple of 16 share the packed data; other rows are copies; stacks end to end or repacked:
    all equal to slicing and stacking the dequantized matrices."""
    parts = [RNG.standard_normal((n, 40), dtype=np.float32) for n in (32, 16, 7)]
    stacked = stack_rows([fb.pack_bf16(p) for p in parts])
    assert isinstance(stacked, fb.Bf16Weight) and stacked.shape == (55, 40)
    np.testing.assert_array_equal(fb.dequantize_bf16(stacked), bf16(np.concatenate(parts)).astype(np.float32))
    odd = stack_rows([fb.pack_bf16(parts[2]), fb.pack_bf16(parts[0])])  # 7 rows first: repacked
    np.testing.assert_array_equal(fb.dequantize_bf16(odd), bf16(np.concatenate([parts[2], parts[0]])).astype(np.float32))
    view = row_slice(stacked, 32, 55)
    assert isinstance(view, fb.Bf16Weight) and np.shares_memory(view.packed, stacked.packed)
    np.testing.assert_array_equal(fb.dequantize_bf16(view), fb.dequantize_bf16(stacked)[32:55])
    copy = row_slice(stacked, 5, 20)
    np.testing.assert_array_equal(copy, fb.dequantize_bf16(stacked)[5:20])
    for bad in (np.zeros(3, np.uint16), np.zeros(16 * 64, np.float32)):
        with pytest.raises(ValueError, match="Bf16Weight"):
            fb.Bf16Weight(5, 40, bad)
    with pytest.raises(ValueError, match="pack_bf16"):
        fb.pack_bf16(np.zeros((0, 4), np.float32))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("M, N, K", [(1, 49, 576), (3, 17, 33), (40, 64, 100)])
def test_linear(native, M, N, K, monkeypatch):
    """linear(x, Bf16Weight, bias): bf16(x) @ bf16(W).T + bias in float32 sums, on the C++ kernel or, without the
    extension, BLAS over the dequantized rows."""
    if not native:
        monkeypatch.setattr(cpu_linear, "_cpu", None)
    x = RNG.standard_normal((M, K), dtype=np.float32)
    w = RNG.standard_normal((N, K), dtype=np.float32)
    bias = RNG.standard_normal(N, dtype=np.float32)
    check(cpu_linear.linear(x, fb.pack_bf16(w), bias), x, w, bias)
    assert cpu_linear.linear(x[:0], fb.pack_bf16(w)).shape == (0, N)


def test_bf16_model_holds_bf16_and_the_fused_step_is_the_free_functions(tiny_llama):
    """precision "bfloat16": the decoder's products and the head packed (about half the bytes of float32), the
    fused C++ step's logits equal to the free functions' over the same weights (the same bf16 products, attention
    and norms summed in another order)."""
    fused = NumpyModel.from_checkpoint(tiny_llama, precision="bfloat16")
    dense = NumpyModel.from_checkpoint(tiny_llama)
    for name in ("lm_head.weight", f"model.layers.1.{QKV}", f"model.layers.0.{GATE_UP}",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = fused.weights[name]
        assert isinstance(w, fb.Bf16Weight), name
        assert w.nbytes <= dense.weights[name].nbytes / 2 * 1.25, name  # padding to 16 rows, 32 columns
    assert fused.fused
    free = NumpyModel(fused.config, fused.weights, fused=False, precision="bfloat16")
    ids = RNG.integers(3, 300, 12)
    logits = []
    for m in (fused, free):
        cache, kv = new_cache(m, [12], 16)
        logits.append(m.compute_logits(prefill(m, cache, kv, [ids], [None])[0]))
    err = np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max()
    # x's rounding to bf16 can flip where the two paths' float32 inputs differ in their last bits: a few bf16 ulps
    assert err < 4 * 2.0**-8


CASES = ["small", "large_non_square_tiled", "greyscale", "two_images"]
NEW = 12  # greedy tokens per case


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Idefics3 whose weights are drawn narrower than the other tests' (std 0.1, not 0.3): at 0.3 a bf16
    rounding grows through the layers to ~10% of the logits' range, in transformers too."""
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_idefics3_narrow"), "idefics3", std=0.1)


@pytest.fixture(scope="module")
def runs(checkpoint):
    """Per case: the HF inputs, transformers float32's greedy answer, its teacher-forced logits, and the same
    from transformers bf16 (logits) and from ours in bfloat16 (both)."""
    import transformers
    cls = transformers.Idefics3ForConditionalGeneration
    fp32, bf = (cls.from_pretrained(checkpoint, dtype=d).eval() for d in (torch.float32, torch.bfloat16))
    ours = AutoModelForVision2Seq.from_pretrained(checkpoint, backend="numpy", dtype="bfloat16")
    assert ours.model.precision == "bfloat16"
    processor, hf_processor = AutoProcessor.from_pretrained(checkpoint), load_hf_processor(checkpoint, "idefics3")
    out = {}
    for case in CASES:
        images, texts = cases()[case]
        inputs = hf_processor(text=prompts(processor, texts, images)[0], images=images, return_tensors="pt")
        as_bf16 = dict(inputs, pixel_values=inputs["pixel_values"].bfloat16())
        with torch.no_grad():
            answer = fp32.generate(**inputs, max_new_tokens=NEW, do_sample=False)
            forced = dict(inputs, input_ids=answer, attention_mask=torch.ones_like(answer))
            logits = {"fp32": fp32(**forced).logits[0].double(),
                      "theirs": bf(**dict(forced, pixel_values=as_bf16["pixel_values"])).logits[0].double()}
        logits["ours"] = torch.as_tensor(ours(**forced).logits)[0].double()
        greedy = {"ours": torch.as_tensor(ours.generate(**inputs, max_new_tokens=NEW, do_sample=False))}
        out[case] = (inputs["input_ids"].shape[1], answer, logits, greedy)
    return out


@pytest.mark.parametrize("case", CASES)
def test_bf16_logits_within_twice_transformers_bf16(runs, case):
    """Over the prompt and float32's answer (teacher-forced): ours in bfloat16 within 2x transformers bf16's own
    error against float32, and far from float32's 1e-4 parity (it really computed in bf16)."""
    _, _, logits, _ = runs[case]
    scale = logits["fp32"].abs().max()
    ours, theirs = ((logits[k] - logits["fp32"]).abs().max() / scale for k in ("ours", "theirs"))
    assert 1e-4 < ours <= 2 * theirs, (float(ours), float(theirs))


@pytest.mark.parametrize("case", CASES)
def test_bf16_greedy_diverges_only_at_near_ties(runs, case):
    """Greedy tokens: where ours in bfloat16 first leaves float32's answer, float32's own margin between its token
    and ours is one that an error of 2x transformers bf16's (per logit, so 4x on a difference of two) can overturn.
    (Counting lost tokens against transformers bf16's failed on draws where one near-tie fell to ours and not to
    theirs: which of two bf16 paths a near-tie falls to is chance, not accuracy.)"""
    prompt_len, answer, logits, greedy = runs[case]
    ours, expected = greedy["ours"][0, prompt_len:].tolist(), answer[0, prompt_len:].tolist()
    step = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
    if step is None:
        return
    fp32 = logits["fp32"][prompt_len - 1 + step]                     # predicts token `step` after the same prefix
    margin = float(fp32[expected[step]] - fp32[ours[step]])
    their_error = float((logits["theirs"] - logits["fp32"]).abs().max())
    assert margin <= 4 * their_error, (case, step, margin, their_error)


def test_bf16_vlm_holds_its_vision_tower_once(checkpoint):
    """A VLM in bfloat16 packs its vision tower at load and lets the float32 layer weights, stem and connector
    go: its weights take about half of float32's bytes, its image features are those of the bf16 path over the
    untouched float32 weights, bit for bit, and a model made again over its weights still sees images."""
    from smolvlm_fast.cpu import vision
    from smolvlm_fast.models.vision_numpy import image_features_per_row

    bf = NumpyModel.from_checkpoint(checkpoint, precision="bfloat16")
    fp = NumpyModel.from_checkpoint(checkpoint)
    assert vision.layer_names(0)[0] not in bf.weights and vision.CONNECTOR not in bf.weights
    nbytes = lambda m: sum(w.nbytes for w in {id(w): w for w in m.weights.values()}.values())
    assert nbytes(bf) < 0.6 * nbytes(fp), (nbytes(bf), nbytes(fp))
    side = fp.config.vision.image_size
    pixels = RNG.standard_normal((1, 2, 3, side, side), dtype=np.float32)
    ours = bf.image_features_per_row(pixels)[0]
    untouched = image_features_per_row(dict(fp.weights), fp.config, pixels, precision="bfloat16")[0]
    np.testing.assert_array_equal(ours, untouched)
    again = NumpyModel(bf.config, dict(bf.weights), precision="bfloat16")
    np.testing.assert_array_equal(again.image_features_per_row(pixels)[0], ours)


def test_a_bf16_checkpoint_loads_straight_into_packed_bf16(tmp_path, monkeypatch):
    """precision bfloat16 over a BF16 checkpoint: every decoder product and the head are packed from the file's
    bits as they are read (no float32 copy of them), and equal, bit for bit, to packing the float32 load."""
    import torch as _torch

    from smolvlm_fast.cpu import weights as cpu_weights

    from .fixtures import build_tiny_llama
    path = build_tiny_llama(tmp_path / "bf16", dtype=_torch.bfloat16)
    packed_from_bits = []
    real = cpu_weights.pack_bf16_bits
    monkeypatch.setattr(cpu_weights, "pack_bf16_bits", lambda bits: packed_from_bits.append(bits.shape) or real(bits))
    bf = NumpyModel.from_checkpoint(path, precision="bfloat16")
    fp = NumpyModel.from_checkpoint(path)
    names = [*cpu_weights.decoder_linears(bf.config), "lm_head.weight"]
    assert len(packed_from_bits) == len(names)
    for name in names + [f"model.layers.0.{QKV}", f"model.layers.1.{GATE_UP}"]:
        assert isinstance(bf.weights[name], fb.Bf16Weight), name
        np.testing.assert_array_equal(fb.dequantize_bf16(bf.weights[name]), fp.weights[name], err_msg=name)


def test_a_bf16_vlm_checkpoint_widens_its_vision_tower_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The vision weights of a BF16 checkpoint reach the packing as their bits (Bf16Bits), each widened to float32
    only as its layer is packed, and nothing of them is left after: the image features equal those of the bf16
    path over the float32 load, bit for bit."""
    import torch as _torch

    from smolvlm_fast.cpu import vision
    from smolvlm_fast.models.vision_numpy import image_features_per_row

    from .fixtures import build_tiny_vlm
    path = build_tiny_vlm(tmp_path / "bf16", "idefics3", dtype=_torch.bfloat16, std=0.1)
    widened = []
    real = fb.Bf16Bits.float32
    monkeypatch.setattr(fb.Bf16Bits, "float32", lambda self: widened.append(self.shape) or real(self))
    bf = NumpyModel.from_checkpoint(path, precision="bfloat16")
    fp = NumpyModel.from_checkpoint(path)
    present = [n for n in vision.packed_names(bf.config.vision) if n in fp.weights]
    assert len(widened) == len(present) and not any(n in bf.weights for n in present)
    assert not any(isinstance(w, fb.Bf16Bits) for w in bf.weights.values())
    side = fp.config.vision.image_size
    pixels = RNG.standard_normal((1, 2, 3, side, side), dtype=np.float32)
    np.testing.assert_array_equal(bf.image_features_per_row(pixels)[0],
                                  image_features_per_row(dict(fp.weights), fp.config, pixels, precision="bfloat16")[0])


def test_quantize_int4_over_a_bf16_checkpoint_quantizes_as_it_reads(tmp_path, monkeypatch):
    """quantize="int4" over a BF16 checkpoint: each decoder linear and the head is quantized as it is read (from
    its own bits widened, never the whole decoder in float32 at once), equal, bit for bit, to quantizing the float32
    load afterwards."""
    import torch as _torch

    from smolvlm_fast.cpu import weights as cpu_weights
    from smolvlm_fast.formats import int4 as fi

    from .fixtures import build_tiny_llama
    path = build_tiny_llama(tmp_path / "bf16", dtype=_torch.bfloat16)
    left_float, real = [], cpu_weights.quantize_weights
    from smolvlm_fast.models import smolvlm_numpy

    def quantize_after_load(weights, config, method):
        left_float.extend(n for n in cpu_weights.quantized_names(config, method) if isinstance(weights[n], np.ndarray))
        return real(weights, config, method)
    monkeypatch.setattr(smolvlm_numpy, "quantize_weights", quantize_after_load)
    at_read = NumpyModel.from_checkpoint(path, quantize="int4")
    names = cpu_weights.quantized_names(at_read.config, "int4")
    assert left_float == []  # the loader handed over every one of them quantized already
    fp = NumpyModel.from_checkpoint(path)
    after = cpu_weights.quantize_weights(fp.weights, fp.config, "int4")
    for name in names:
        ours, theirs = at_read.weights[name], after[name]
        assert type(ours) is type(theirs) and type(ours) in (fi.Int4Weight, fi.Q8Weight), name
        np.testing.assert_array_equal(fi.dequantize(ours), fi.dequantize(theirs), err_msg=name)
