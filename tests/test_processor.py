"""Our Processor against transformers' Idefics3Processor / SmolVLMProcessor (PIL image backend) on the same files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm_fast.errors import InputError
from smolvlm_fast.inputs.images import load_image
from smolvlm_fast.inputs.processor import Processor
from tests.fixtures import IMAGE_SEQ_LEN, load_hf_processor

MODEL_TYPES = ["idefics3", "smolvlm"]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def pair(request):
    """(model_type, transformers processor, our processor), both loaded from the same saved dir."""
    path = request.getfixturevalue(f"tiny_{request.param}")
    return request.param, load_hf_processor(path, request.param), Processor.from_pretrained(path)


def assert_same(ref_out, our_out):
    """Same keys in the same order; ids identical; pixel values within 1e-6 (in practice bit-identical)."""
    assert list(our_out.keys()) == list(ref_out.keys())
    for key, ref in ref_out.items():
        ours = our_out[key]
        if isinstance(ref, list):
            assert ours == ref, key
            continue
        ref, ours = np.asarray(ref), np.asarray(ours)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (key, ours.dtype, ref.dtype, ours.shape, ref.shape)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6, err_msg=key)


def both(pair, text, images=None, **kwargs):
    _, ref, ours = pair
    return ref(text=text, images=images, **kwargs), ours(images, text, **kwargs)


# --- parity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_rgb", "large_rgb", "grey_image", "rgba_image", "palette_image",
                                  "palette_transparent_image"])
def test_single_image_matches_transformers(pair, name, request):
    image = request.getfixturevalue(name)
    assert_same(*both(pair, "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:", [image]))


def test_tensors_match_transformers(pair, large_rgb):
    ref, ours = both(pair, "<image>What is this?", [large_rgb], return_tensors="pt")
    assert isinstance(ours["input_ids"], torch.Tensor) and ours["pixel_values"].dtype == torch.float32
    assert ours["pixel_attention_mask"].dtype == ref["pixel_attention_mask"].dtype
    assert_same({k: v.numpy() for k, v in ref.items()}, {k: v.numpy() for k, v in ours.items()})


def test_tiled_image_layout(pair, large_rgb):
    _, _, ours = pair
    out = ours([large_rgb], "<image>")
    assert out["pixel_values"].shape == (1, 7, 3, 64, 64)  # 2 x 3 tiles + global
    text = ours.decode(out["input_ids"][0])
    assert text.count("<image>") == 7 * IMAGE_SEQ_LEN
    assert "<row_2_col_3>" in text and "<row_3_col_1>" not in text
    fake, image = "<fake_token_around_image>", "<image>"
    assert text.endswith(f"\n\n{fake}<global-img>{image * IMAGE_SEQ_LEN}{fake}")


def test_two_images_in_one_prompt(pair, large_rgb, small_rgb):
    assert_same(*both(pair, "Compare <image> with <image>, please.", [large_rgb, small_rgb]))


def test_batch_of_two_prompts_left_padded(pair, large_rgb, small_rgb, rgba_image):
    texts = ["<image>Describe", "Short <image> and a longer prompt with <image> in it"]
    ref, ours = both(pair, texts, [[small_rgb], [large_rgb, rgba_image]], padding=True, padding_side="left",
                     return_tensors="np")
    assert_same(ref, ours)
    assert ours["attention_mask"][0, 0] == 0 and ours["attention_mask"][0, -1] == 1  # left padding
    assert not ours["pixel_values"][0, 10:].any()  # prompt 0 has 10 frames, the rest is padding


def test_flat_image_list_is_split_by_prompt(pair, large_rgb, small_rgb, rgba_image):
    model_type, ref, ours = pair
    texts = ["<image>Describe", "Short <image> and <image>"]
    nested = ours([[small_rgb], [large_rgb, rgba_image]], texts, padding=True)
    flat = ours([small_rgb, large_rgb, rgba_image], texts, padding=True)
    assert_same(nested, flat)
    if model_type == "idefics3":  # SmolVLMProcessor in transformers rejects a flat list across several prompts
        assert_same(ref(text=texts, images=[small_rgb, large_rgb, rgba_image], padding=True), flat)


def test_text_only(pair):
    ref, ours = both(pair, ["Hello there, how are you?", "Hi"], padding=True)
    assert_same(ref, ours)
    assert_same(*both(pair, "A single prompt"))


def test_images_only(pair, large_rgb, small_rgb):
    _, ref, ours = pair
    assert_same(ref(images=[large_rgb, small_rgb]), ours(images=[large_rgb, small_rgb]))


def test_without_image_splitting(pair, large_rgb, small_rgb):
    ref, ours = both(pair, "<image> and <image>", [large_rgb, small_rgb], do_image_splitting=False)
    assert_same(ref, ours)
    assert ours["pixel_values"].shape == (1, 2, 3, 64, 64)


# --- argument order (drop-in for transformers' processors) -----------------------------------------------------


def test_images_first_positional_and_keyword_match_transformers(pair, large_rgb, small_rgb):
    _, ref, ours = pair
    text, images = "Compare <image> with <image>.", [large_rgb, small_rgb]
    expected = ref(images, text)  # transformers' order: images, then text
    assert_same(expected, ours(images, text))
    assert_same(expected, ours(images=images, text=text))
    assert_same(expected, ours(text=text, images=images))
    assert_same(ref(images=images), ours(images))


def test_old_text_first_order_is_refused_clearly(pair, small_rgb):
    _, _, ours = pair
    with pytest.raises(InputError, match="first argument is images"):
        ours("<image> What is this?")
    with pytest.raises(InputError, match="first argument is images"):
        ours("<image> What is this?", [small_rgb])


# --- encode: one prompt for the engine -----------------------------------------------------------------------


def test_encode_matches_call(pair, large_rgb, small_rgb):
    """encode's ids are __call__'s; each image's pixels are those of __call__ on that image alone (no padding)."""
    _, _, ours = pair
    text = "<|im_start|>User:<image>Compare with <image><end_of_utterance>\nAssistant:"
    ids, per_image = ours.encode(text, [large_rgb, small_rgb])
    assert ids == ours([large_rgb, small_rgb], text)["input_ids"][0]
    assert len(per_image) == 2
    for image, (pixel_values, pixel_mask) in zip([large_rgb, small_rgb], per_image):
        alone = ours([image], "<image>")
        np.testing.assert_array_equal(pixel_values, alone["pixel_values"][0])
        np.testing.assert_array_equal(pixel_mask, alone["pixel_attention_mask"][0])
        assert pixel_values.dtype == np.float32 and pixel_values.ndim == 4 and pixel_mask.shape == (
            pixel_values.shape[0], *pixel_values.shape[2:])


def test_encode_text_only_and_bos(pair):
    _, _, ours = pair
    assert ours.encode("Hello there", []) == (ours.tokenizer.encode("Hello there"), [])
    bos = ours.tokenizer.bos_token
    if bos is not None:  # a prompt that already starts with BOS gets no second one
        assert ours.encode(bos + "Hi", [])[0] == ours.tokenizer.encode(bos + "Hi", add_special_tokens=False)


def test_encode_checks_image_counts(pair, small_rgb):
    _, _, ours = pair
    with pytest.raises(InputError, match=r"2 <image> markers but 1 images"):
        ours.encode("<image> and <image>", [small_rgb])
    with pytest.raises(InputError, match=r"1 <image> markers but no images"):
        ours.encode("<image>", [])
    with pytest.raises(InputError, match="must be a string"):
        ours.encode(["<image>"], [small_rgb])


# --- chat template -----------------------------------------------------------------------------------------------

CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat on a chair."}]},
    {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image"}]},
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    _, ref, ours = pair
    expected = ref.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt) == expected
    assert expected.startswith("<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant: A cat")


def test_chat_template_tokenized_with_images(pair, large_rgb, small_rgb):
    _, ref, ours = pair
    chat = [{"role": "user", "content": [{"type": "image", "image": large_rgb}, {"type": "text", "text": "Hi"},
                                         {"type": "image", "image": small_rgb}]}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    assert_same(ref.apply_chat_template(chat, **kwargs), ours.apply_chat_template(chat, **kwargs))


# --- image input forms -------------------------------------------------------------------------------------------


def test_image_as_path_array_and_tensor(pair, large_rgb, tmp_path):
    _, ref, ours = pair
    path = tmp_path / "large.png"
    large_rgb.save(path)
    expected = ref(text="<image>x", images=[large_rgb])
    hwc = np.asarray(large_rgb)
    for image in (path, str(path), hwc, hwc.transpose(2, 0, 1), torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
                  hwc.astype(np.float32) / 255):
        assert_same(expected, ours([image], "<image>x"))


def test_data_uri_and_bfloat16_tensor(large_rgb, tmp_path):
    import base64

    path = tmp_path / "large.png"
    large_rgb.save(path)
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    np.testing.assert_array_equal(load_image(uri), np.asarray(large_rgb))
    tensor = torch.from_numpy(np.asarray(large_rgb).copy()).to(torch.bfloat16) / 255
    assert load_image(tensor).shape == (170, 300, 3)
    with pytest.raises(InputError, match="cannot decode image data URI"):
        load_image("data:image/png;base64,AAAA")


def test_rgba_path_matches_transformers(pair, rgba_image, tmp_path):
    """transformers drops the alpha channel of a file (convert('RGB')) instead of compositing: so do we."""
    _, ref, ours = pair
    path = tmp_path / "rgba.png"
    rgba_image.save(path)
    assert_same(ref(text="<image>", images=[str(path)]), ours([path], "<image>"))


def test_rgba_array_matches_transformers(pair, rgba_image):
    _, ref, ours = pair
    array = np.asarray(rgba_image)
    assert_same(ref(text="<image>", images=[array]), ours([array], "<image>"))


def test_sixteen_bit_image_is_scaled_not_clipped(grey_image):
    """transformers clips 16-bit images at 255 (mostly white); we scale them to 8 bits."""
    eight = np.asarray(grey_image)
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    np.testing.assert_array_equal(load_image(sixteen), load_image(grey_image))
    np.testing.assert_array_equal(load_image(eight.astype(np.uint16) * 257), load_image(grey_image))
    dark = Image.fromarray(np.full((4, 4), 514, np.uint16))  # 16-bit data is scaled even when it is all dark
    assert dark.mode == "I;16" and (load_image(dark) == 2).all()


# --- options -----------------------------------------------------------------------------------------------------


def test_no_upscaling_of_small_images(tiny_idefics3, small_rgb, large_rgb):
    default = Processor.from_pretrained(tiny_idefics3)
    no_upscale = Processor.from_pretrained(tiny_idefics3, upscale_small_images=False)
    assert default([small_rgb], "<image>")["pixel_values"].shape[1] == 10  # 40x30 -> 192x144 -> 3 x 3 + 1
    out = no_upscale([small_rgb], "<image>")
    assert out["pixel_values"].shape[1] == 1  # only the global image
    assert len(out["input_ids"][0]) == IMAGE_SEQ_LEN + 3
    assert_same(default([large_rgb], "<image>"), no_upscale([large_rgb], "<image>"))  # large images are unchanged
    assert default([small_rgb], "<image>", upscale_small_images=False)["pixel_values"].shape[1] == 1


def test_batch_feature_to(pair, small_rgb):
    _, _, ours = pair
    out = ours([small_rgb], "<image>", return_tensors="pt").to(torch.bfloat16)
    assert out.pixel_values.dtype == torch.bfloat16
    assert out.input_ids.dtype == torch.int64 and out.pixel_attention_mask.dtype == torch.int64
    out = out.to("cpu", dtype=torch.float16)
    assert out.pixel_values.dtype == torch.float16 and out.input_ids.device.type == "cpu"


def test_attributes_and_decode(pair):
    _, ref, ours = pair
    assert ours.image_seq_len == ref.image_seq_len == IMAGE_SEQ_LEN
    assert ours.image_token_id == ref.image_token_id
    ids = ref(text=["hello<end_of_utterance>", "world"], padding=True)["input_ids"]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[0]) == ref.decode(ids[0])


def test_fixture_model_generates_varied_tokens(pair, large_rgb, request):
    """The tiny checkpoint's widened weights give non-flat logits: 16 greedy tokens are not one repeated token."""
    from transformers import AutoModelForImageTextToText

    model_type, _, ours = pair
    model = AutoModelForImageTextToText.from_pretrained(request.getfixturevalue(f"tiny_{model_type}")).eval()
    inputs = ours([large_rgb], ours.apply_chat_template(CHAT[:1], add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert len(set(out[0, inputs["input_ids"].shape[1] :].tolist())) > 4


def _copy_checkpoint(src, dst, edit_processor_config):
    import json
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((dst / "processor_config.json").read_text())
    edit_processor_config(config, dst)
    (dst / "processor_config.json").write_text(json.dumps(config))
    return dst


def test_legacy_processor_layout(tiny_idefics3, tmp_path, large_rgb):
    """transformers 4 layout: preprocessor_config.json, chat_template.json, image_seq_len from config.json."""
    import json

    def to_legacy(config, dst):
        (dst / "preprocessor_config.json").write_text(json.dumps(config.pop("image_processor")))
        del config["image_seq_len"]
        template = (dst / "chat_template.jinja").read_text()
        (dst / "chat_template.jinja").unlink()
        (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}))

    legacy = Processor.from_pretrained(_copy_checkpoint(tiny_idefics3, tmp_path / "legacy", to_legacy))
    current = Processor.from_pretrained(tiny_idefics3)
    assert legacy.image_seq_len == IMAGE_SEQ_LEN
    assert legacy.apply_chat_template(CHAT) == current.apply_chat_template(CHAT)
    assert_same(current([large_rgb], "<image>"), legacy([large_rgb], "<image>"))


@pytest.mark.parametrize("key, value, message", [
    ("max_image_size", {"height": 64}, "max_image_size must be"),
    ("size", {"shortest_edge": 10}, "size must be"),
    ("image_mean", [0.5, 0.5], "image_mean must have 3 values"),
    ("resample", 9, "resample 9"),
    ("do_pad", False, "do_pad false"),
    ("size", {"longest_edge": 64 * 7}, "7x7 tile grid"),
])
def test_bad_processor_config(tiny_idefics3, tmp_path, key, value, message):
    from smolvlm_fast.errors import CheckpointError

    path = _copy_checkpoint(tiny_idefics3, tmp_path / "bad", lambda c, _: c["image_processor"].update({key: value}))
    with pytest.raises(CheckpointError, match=message):
        Processor.from_pretrained(path)


# --- errors ------------------------------------------------------------------------------------------------------


def test_more_markers_than_images(pair, small_rgb):
    _, _, ours = pair
    with pytest.raises(InputError, match=r"2 <image> markers but 1 images"):
        ours([small_rgb], "<image> and <image>")


def test_more_images_than_markers(pair, small_rgb):
    _, _, ours = pair
    with pytest.raises(InputError, match=r"1 <image> markers but 2 images"):
        ours([small_rgb, small_rgb], "<image>")


def test_markers_without_images(pair):
    _, _, ours = pair
    with pytest.raises(InputError, match=r"1 <image> markers but no images"):
        ours(text="<image> hello")


def test_markers_per_prompt_mismatch(pair, small_rgb):
    _, _, ours = pair
    with pytest.raises(InputError, match=r"per prompt \[1, 0\] do not match images per prompt \[0, 1\]"):
        ours([[], [small_rgb]], ["<image>", "no image"])


def test_missing_file(pair, tmp_path):
    _, _, ours = pair
    with pytest.raises(InputError, match="not found: .*missing.png"):
        ours([tmp_path / "missing.png"], "<image>")


def test_unreadable_file(pair, tmp_path):
    _, _, ours = pair
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read image file .*garbage.png"):
        ours([str(path)], "<image>")


def test_truncated_file(pair, tmp_path, large_rgb):
    _, _, ours = pair
    path = tmp_path / "cut.png"
    large_rgb.save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="cut.png"):
        ours([path], "<image>")


@pytest.mark.parametrize("image", [Image.new("RGB", (0, 0)), np.zeros((0, 10, 3), np.uint8), np.zeros((5, 0, 3))])
def test_zero_sized_image(pair, image):
    _, _, ours = pair
    with pytest.raises(InputError, match="zero size"):
        ours([image], "<image>")


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 5, 6, 7)), "shape"),
    (np.full((10, 10, 3), 2.5), r"values in \[2.5, 2.5\]"),
    (np.zeros((10, 10, 2)), "channels"),
    ("https://example.com/cat.png", "URLs are not fetched"),
    (12, "unsupported image type int"),
])
def test_bad_image_inputs(image, message):
    with pytest.raises(InputError, match=message):
        load_image(image)


def test_package_imports_without_transformers_or_torch():
    code = ("import sys, smolvlm_fast; before = 'torch' in sys.modules; "
            "import smolvlm_fast.inputs.tokenizer, smolvlm_fast.inputs.processor, smolvlm_fast.inputs.images; "
            "assert 'transformers' not in sys.modules; assert before or 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
