"""Our Tokenizer against transformers' AutoTokenizer on the same saved files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from smolvlm_fast.errors import CheckpointError, InputError
from smolvlm_fast.inputs.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "The train leaves at 10:45 and costs 2024.50.",
    "",
    "  leading spaces, trailing  \n\n newlines\t tabs",
    "Unicode: émigré, naïve, 東京, 🙂 and ∑.",
    "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:",
    "<fake_token_around_image><row_1_col_2><image><image><global-img><fake_token_around_image>",
    "<|im_end|><|endoftext|> plain <not_a_token>",
]

CHATS = {
    "vlm": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ],
    "llama": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Tell me a story about 3 robots."},
        {"role": "assistant", "content": "Once upon a time"},
    ],
}


@pytest.fixture(scope="module", params=["tiny_idefics3", "tiny_llama"])
def pair(request):
    """(kind, transformers AutoTokenizer, our Tokenizer), loaded from the same dir."""
    from transformers import AutoTokenizer

    path = request.getfixturevalue(request.param)
    kind = "llama" if request.param == "tiny_llama" else "vlm"
    return kind, AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches(pair, text):
    _, ref, ours = pair
    for add in (True, False):
        assert ours.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add)
    assert dict(ours(text)) == dict(ref(text))


def test_batch_padding_matches(pair):
    _, ref, ours = pair
    for side in ("left", "right"):
        for return_tensors in ("pt", "np"):
            expected = ref(TEXTS, padding=True, padding_side=side, return_tensors=return_tensors)
            got = ours(TEXTS, padding=True, padding_side=side, return_tensors=return_tensors)
            for key in ("input_ids", "attention_mask"):
                assert type(got[key]) is type(expected[key])
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
                assert got[key].dtype == expected[key].dtype
    assert dict(ours(TEXTS)) == dict(ref(TEXTS))  # unpadded lists
    assert dict(ours(TEXTS, padding="longest")) == dict(ref(TEXTS, padding="longest"))


def test_decode_matches(pair):
    _, ref, ours = pair
    batch = ref(TEXTS, padding=True)["input_ids"]
    for skip in (False, True):
        expected = ref.batch_decode(batch, skip_special_tokens=skip)
        assert ours.batch_decode(batch, skip_special_tokens=skip) == expected
        assert ours.batch_decode(torch.tensor(batch), skip_special_tokens=skip) == expected
        for ids in batch:
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(np.array(ids), skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(batch[0][-1]) == ref.decode(batch[0][-1])


def test_special_tokens_match(pair):
    _, ref, ours = pair
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name)
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id")
    assert ours.sep_token is None and ours.sep_token_id is None
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.padding_side == ref.padding_side == "left"
    tokens = ["<image>", "<end_of_utterance>", "<row_6_col_6>", "<global-img>", "Hello", "<nope>"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<image>") == ref.convert_tokens_to_ids("<image>")
    assert ours.get_vocab() == ref.get_vocab()


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches(pair, add_generation_prompt):
    kind, ref, ours = pair
    chat = CHATS[kind]
    kwargs = dict(add_generation_prompt=add_generation_prompt)
    expected_text = ref.apply_chat_template(chat, tokenize=False, **kwargs)
    assert ours.apply_chat_template(chat, tokenize=False, **kwargs) == expected_text
    assert dict(ours.apply_chat_template(chat, **kwargs)) == dict(ref.apply_chat_template(chat, **kwargs))
    ids = ours.apply_chat_template(chat, return_dict=False, **kwargs)
    assert ids == ref.apply_chat_template(chat, return_dict=False, **kwargs)
    batch = [chat, chat[:1]]
    expected = ref.apply_chat_template(batch, padding=True, return_tensors="pt", **kwargs)
    got = ours.apply_chat_template(batch, padding=True, return_tensors="pt", **kwargs)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_continue_final_message_matches(pair):
    kind, ref, ours = pair
    chat = CHATS[kind][:2]
    kwargs = dict(tokenize=False, continue_final_message=True)
    assert ours.apply_chat_template(chat, **kwargs) == ref.apply_chat_template(chat, **kwargs)


def test_template_sees_special_tokens_and_kwargs(pair):
    _, ref, ours = pair
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}="
                "{{ m['content'] | default('none') | tojson }}{% endfor %}"
                "{{ eos_token }}|{{ extra }}|{{ raise_exception is defined }}")
    chat = [{"role": "user", "content": "quote \" and <tag> é"}, {"role": "assistant", "content": None}]
    kwargs = dict(chat_template=template, tokenize=False, extra=[1, 2])
    assert ours.apply_chat_template(chat, **kwargs) == ref.apply_chat_template(chat, **kwargs)


def test_template_errors_are_raised():
    import jinja2

    ours = Tokenizer(_tiny_backend(), chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    with pytest.raises(InputError, match="no chat template"):
        Tokenizer(_tiny_backend()).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="empty conversation"):
        ours.apply_chat_template([], tokenize=False)


def _tiny_backend():
    from tests.fixtures import train_backend_tokenizer

    return train_backend_tokenizer()


def test_legacy_layout(tiny_idefics3, tmp_path):
    """transformers 4 style files: chat template and additional_special_tokens in tokenizer_config.json, plus
    special_tokens_map.json with AddedToken dicts and add_bos_token (ignored when tokenizer.json exists)."""
    from transformers import AutoTokenizer

    shutil.copy(tiny_idefics3 / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tiny_idefics3 / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = config.pop("extra_special_tokens")
    config["chat_template"] = (tiny_idefics3 / "chat_template.jinja").read_text()
    config["add_bos_token"] = True
    config["tokenizer_class"] = "GPT2Tokenizer"
    del config["bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False}}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ref, ours = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(tmp_path)
    assert ours.bos_token == ref.bos_token == "<|im_start|>"
    assert ours.encode(TEXTS[1]) == ref.encode(TEXTS[1])
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    chat = CHATS["vlm"]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)


def test_bad_files(tmp_path, tiny_idefics3):
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load .*tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(tiny_idefics3 / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[broken")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_arguments(tiny_idefics3):
    ours = Tokenizer.from_pretrained(tiny_idefics3)
    with pytest.raises(InputError, match="different lengths"):
        ours(["a", "a longer text"], return_tensors="pt")
    with pytest.raises(InputError, match="padding_side"):
        ours(["a", "b c"], padding=True, padding_side="middle")
    with pytest.raises(InputError, match="text must be a string"):
        ours([1, 2])
    with pytest.raises(InputError, match="return_tensors"):
        ours("a", return_tensors="tf")
