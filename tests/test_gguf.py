"""GGUF reading (formats/gguf.py, gguf_reader.py, gguf_tokenizer.py): the real SmolLM2-135M-Instruct Q4_1 file against transformers' GGUF loader,
and small GGUF files written here with gguf.GGUFWriter for each tensor type and each kind of bad file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # gguf-py writes the test files (and smolvlm_fast's GGUF reader needs it)
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from smolvlm_fast.config import ModelConfig  # noqa: E402
from smolvlm_fast.errors import CheckpointError  # noqa: E402
from smolvlm_fast.formats import int4 as int4_format  # noqa: E402
from smolvlm_fast.formats.gguf import load_gguf, load_gguf_tokenizer, load_gguf_weights, raw_rows  # noqa: E402
from smolvlm_fast.formats.gguf_reader import SUPPORTED_TYPES, open_gguf  # noqa: E402
from smolvlm_fast.formats.gguf_tokenizer import BYTE_TO_CHAR  # noqa: E402

from tests.conftest_gguf import smollm2_gguf  # noqa: E402, F401  (until tests/conftest.py imports it)

# --- a tiny llama in GGUF, written as llama.cpp's converter writes one -------------------------------------------

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 2, 4, 2, 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TOKENS = SPECIALS + list(BYTE_TO_CHAR.values()) + [m.replace(" ", "") for m in MERGES] + ["<think>"]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS) - 1) + [4]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF rotate-half order -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (q, HIDDEN), f"blk.{i}.attn_k.weight": (kv, HIDDEN),
                   f"blk.{i}.attn_v.weight": (kv, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, q),
                   f"blk.{i}.ffn_gate.weight": (INTER, HIDDEN), f"blk.{i}.ffn_up.weight": (INTER, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, INTER)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def stored(w: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    return quantize(w, qtype)


def write_gguf(path: Path, qtype: Q = Q.F32, *, arch: str = "llama", tied: bool = True, add_bos: bool = False,
               pre: str = "smollm", weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF: 2-D weights in qtype, norms in F32. Returns the weights (GGUF names, HF order)."""
    weights = weights if weights is not None else hf_weights(tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    for name, value in weights.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            value = llama_cpp_permute(value, HEADS if "attn_q" in name else KV_HEADS)
        if value.ndim == 1:
            w.add_tensor(name, value)
        else:
            data = stored(value, qtype)
            w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def to_hf(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.weight"
    return f"{HF_NAMES[parts[0]]}.weight"


# --- tensor types ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_dequantize_each_type(tmp_path, qtype):
    """Every tensor comes back float32 in HF order and shape, equal to the gguf package's dequantization."""
    weights = write_gguf(tmp_path / "tiny.gguf", qtype)
    tensors = load_gguf(tmp_path / "tiny.gguf").tensors
    assert set(tensors) == {to_hf(n) for n in weights}
    for name, w in weights.items():
        got = tensors[to_hf(name)]
        expected = w if w.ndim == 1 else dequantize(stored(w, qtype), qtype)
        assert got.dtype == np.float32 and got.shape == w.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        if qtype in (Q.F32, Q.F16):  # lossless (F16: to half precision)
            np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_q4_blocks_stay_whole(tmp_path, qtype):
    """raw_rows gives the 4-bit blocks as stored (q/k rows reordered whole), decodable by the layout in facts.md:
    fp16 d (+ fp16 m), 16 bytes whose low nibbles are elements 0-15 and high nibbles 16-31."""
    write_gguf(tmp_path / "tiny.gguf", qtype)
    ckpt = load_gguf(tmp_path / "tiny.gguf")
    reader = open_gguf(tmp_path / "tiny.gguf")
    config = ModelConfig.from_dict(ckpt.config)
    for t in reader.tensors:
        if t.name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
            rows, got_type = raw_rows(reader, t, config)
            assert got_type == qtype and rows.dtype == np.uint8
            blocks = rows.reshape(rows.shape[0], -1, 18 if qtype == Q.Q4_0 else 20)
            d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
            nibbles = blocks[..., -16:]
            q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1).astype(np.float32)
            if qtype == Q.Q4_0:
                w = (q - 8) * d
            else:
                w = q * d + blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
            np.testing.assert_allclose(w.reshape(rows.shape[0], -1), ckpt.tensors[to_hf(t.name)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_one_weight_loop_keeps_or_dequantizes(tmp_path, qtype):
    """keep_quantized=True (the NumPy and int4 paths) and False (the float torch path) walk the same tensors: the
    same names, Q4 kept as int4, Q8_0 as q8, the rest float32, and the kept blocks decode to the float weights."""
    write_gguf(tmp_path / "tiny.gguf", qtype)
    dense = load_gguf(tmp_path / "tiny.gguf").tensors
    _, kept = load_gguf_weights(tmp_path / "tiny.gguf", keep_quantized=True)
    assert set(kept) == set(dense)
    kept_as = {Q.Q4_0: int4_format.Int4Weight, Q.Q4_1: int4_format.Int4Weight, Q.Q8_0: int4_format.Q8Weight}
    kind = kept_as.get(qtype, np.ndarray)
    for name, w in kept.items():
        assert isinstance(w, kind if dense[name].ndim == 2 else np.ndarray), name
        np.testing.assert_allclose(int4_format.dequantize(w), dense[name], rtol=0, atol=1e-6, err_msg=name)


def test_untied_output_and_config(tmp_path):
    weights = write_gguf(tmp_path / "tiny.gguf", Q.F32, tied=False)
    ckpt = load_gguf(tmp_path / "tiny.gguf")
    np.testing.assert_array_equal(ckpt.tensors["lm_head.weight"], weights["output.weight"])
    assert ckpt.config == {
        "model_type": "llama", "vocab_size": len(TOKENS), "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }


# --- tokenizer ---------------------------------------------------------------------------------------------------


def test_tokenizer_from_metadata(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    tok = load_gguf_tokenizer(tmp_path / "tiny.gguf")
    ids = tok.encode("hello world<|im_end|><think>")
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld", "<|im_end|>", "<think>"]
    assert tok.decode(ids) == "hello world<|im_end|><think>"
    assert tok.decode(ids, skip_special_tokens=True) == "hello world<think>"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                          "<|im_end|>", "<|endoftext|>")
    assert tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n"


def test_tokenizer_add_bos(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", add_bos=True)
    tok = load_gguf_tokenizer(tmp_path / "tiny.gguf")
    assert tok.encode("hello") == [1, TOKENS.index("hello")]
    assert tok.encode("hello", add_special_tokens=False) == [TOKENS.index("hello")]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_tokenizer_equals_transformers_conversion(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    write_gguf(tmp_path / "tiny.gguf", pre=pre)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    tok = load_gguf_tokenizer(tmp_path / "tiny.gguf")
    for text in ["hello world", "hello  world\n\n12345 hello", "<|im_start|>hello<think> world<|im_end|>", "wörld!?"]:
        assert tok.encode(text) == ref(text)["input_ids"], text


# --- bad files ---------------------------------------------------------------------------------------------------


def test_unsupported_tensor_type(tmp_path):
    weights = hf_weights(tied=True)
    write_gguf(tmp_path / "q5.gguf", Q.Q5_0, weights=weights)
    with pytest.raises(CheckpointError, match=r"q5\.gguf: tensor 0 'token_embd\.weight': type Q5_0 is not supported"):
        load_gguf(tmp_path / "q5.gguf")


def test_wrong_architecture(tmp_path):
    write_gguf(tmp_path / "g.gguf", arch="gpt2")
    with pytest.raises(CheckpointError, match=r"g\.gguf: general\.architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "g.gguf")


def test_bad_magic(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(CheckpointError, match=r"bad\.gguf: not a GGUF file"):
        load_gguf(tmp_path / "bad.gguf")


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.gguf: cannot open"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.gguf: not a GGUF file"):
        load_gguf(tmp_path / "empty.gguf")


@pytest.mark.parametrize("keep", [0.3, 0.99], ids=["in-header", "in-tensors"])
def test_truncated_file(tmp_path, keep):
    write_gguf(tmp_path / "full.gguf", Q.Q8_0)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*truncated"):
        load_gguf(tmp_path / "cut.gguf")


def test_missing_tensor(tmp_path):
    weights = hf_weights(tied=True)
    del weights["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "m.gguf", weights=weights)
    with pytest.raises(CheckpointError, match=r"m\.gguf: missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(tmp_path / "m.gguf")


def test_unexpected_tensor(tmp_path):
    weights = hf_weights(tied=True) | {"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)}
    write_gguf(tmp_path / "r.gguf", weights=weights)
    with pytest.raises(CheckpointError, match=r"r\.gguf: unexpected tensor rope_freqs\.weight"):
        load_gguf(tmp_path / "r.gguf")


# --- the real SmolLM2-135M-Instruct Q4_1 file, against transformers ----------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def transformers_tensors(smollm2_gguf) -> dict:
    """transformers' own GGUF loader (dequantize + its q/k reverse permutation) for the same file.

    `LlamaForCausalLM.from_pretrained(dir, gguf_file=...)` needs accelerate, so the loader is called directly
    with a model on the meta device (it only reads the parameter names from it)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(smollm2_gguf))["config"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == ("llama", 30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (c["vocab_size"], c["tie_word_embeddings"], c["bos_token_id"], c["eos_token_id"]) == (49152, True, 1, 2)


def test_smollm2_tensors_equal_transformers(smollm2, transformers_tensors):
    assert set(smollm2.tensors) == set(transformers_tensors)
    assert "lm_head.weight" not in smollm2.tensors
    for name, ours in smollm2.tensors.items():
        ref = transformers_tensors[name].numpy()
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        assert float(np.abs(ours - ref).max()) <= 1e-6, name


TEXTS = ["Hello world!", "The year 2024 had 366 days.\n\n1. first\n2. second", "  leading spaces, tabs\tand  ",
         "héllo wörld — 世界 🙂", "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2  # square"]


def test_smollm2_tokenizer_equals_transformers(smollm2, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok = smollm2.tokenizer
    for text in TEXTS:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"]), text
    for chat in ([{"role": "user", "content": "What is 2+2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        expected = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.chat_template == ref.chat_template
