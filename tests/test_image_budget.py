"""The image token budget (inputs/image_budget.py): detail auto / low / high, max_image_tiles and upscale=False.

With the released 256M / 500M settings (longest edge 2,048, tiles of 512, 64 tokens a tile) and the tiny
checkpoint's tokenizer: "auto" is transformers' processor exactly; the other modes give the token counts they
promise; a capped image is the image transformers makes with the lowered longest edge."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from smolvlm_fast.errors import InputError
from smolvlm_fast.inputs.image_budget import ImageBudget
from smolvlm_fast.inputs.image_config import ImageConfig
from smolvlm_fast.inputs.processor import Processor
from smolvlm_fast.inputs.tiling import capped_size
from smolvlm_fast.inputs.tokenizer import Tokenizer

TILE, LONGEST, TOKENS = 512, 2048, 64  # SmolVLM-256M / 500M-Instruct's processor
PROMPT = "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"


@pytest.fixture(scope="module")
def released(tiny_idefics3):
    """(transformers' processor, ours) with the released image settings."""
    return hf_processor(tiny_idefics3, LONGEST), ours(tiny_idefics3)


def hf_processor(path, longest: int, splitting: bool = True):
    from transformers import AutoTokenizer, Idefics3ImageProcessorPil, Idefics3Processor
    images = Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": TILE},
                                       do_image_splitting=splitting)
    return Idefics3Processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(path),
                             image_seq_len=TOKENS)


def ours(path, splitting: bool = True):
    config = ImageConfig(longest_edge=LONGEST, tile_size=TILE, do_image_splitting=splitting)
    return Processor(Tokenizer.from_pretrained(path), config, image_seq_len=TOKENS)


def photo(rng, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_tokens(processor: Processor, image, budget=None) -> int:
    ids, _ = processor.encode(PROMPT, [image], budgets=budget)
    return ids.count(processor.image_token_id)


def test_auto_is_transformers(released, rng):
    """A 386 x 386 photo: 4 x 4 tiles + the global view, 1,088 tokens, ids and pixels as transformers makes them;
    "auto" and no budget at all are the same call."""
    hf, processor = released
    image = photo(rng, 386, 386)
    want = hf(text=PROMPT, images=[image])
    for budget in (None, "auto", {"detail": "auto"}, ImageBudget()):
        ids, [(pixels, mask)] = processor.encode(PROMPT, [image], budgets=budget)
        assert ids == want["input_ids"][0]
        np.testing.assert_allclose(pixels, want["pixel_values"][0], rtol=0, atol=1e-6)
        assert np.array_equal(mask, want["pixel_attention_mask"][0])
    assert image_tokens(processor, image) == 17 * TOKENS == 1088


@pytest.mark.parametrize(("size", "budget", "tiles"), [
    ((386, 386), "low", 0),
    ((386, 386), {"upscale": False}, 0),          # stays 386: one tile, so only the global view
    ((700, 900), {"upscale": False}, 4),          # no upscale, then up to tile multiples: 2 x 2
    ((386, 386), {"max_image_tiles": 4}, 4),      # 2,048 -> 1,536 (3 x 3) -> 1,024: 2 x 2
    ((386, 386), {"max_image_tiles": 8}, 4),      # 3 x 3 would be 9
    ((386, 386), {"max_image_tiles": 9}, 9),
    ((386, 386), {"max_image_tiles": 1}, 0),      # one tile is the global view alone
    ((386, 386), {"max_image_tiles": 0}, 0),
    ((1024, 1536), {"max_image_tiles": 5}, 4),    # 3 x 4, 2 x 3 -> longest 1,024: 2 x 2
    ((1024, 1536), {"detail": "low", "max_image_tiles": 9}, 0),
    ((20, 3000), {"max_image_tiles": 2}, 2),      # a strip: 1 x 4 -> 1 x 2
], ids=lambda v: str(v).replace(" ", ""))
def test_token_counts(released, rng, size, budget, tiles):
    _, processor = released
    expected = (tiles + 1) * TOKENS if tiles else TOKENS
    assert image_tokens(processor, photo(rng, *size), budget) == expected


def test_capped_image_is_transformers_at_the_lower_edge(tiny_idefics3, released, rng):
    """max_image_tiles=4 on a square photo is transformers' processor with longest_edge 1,024: same ids, same
    pixels (the tiles really are the image at that size, not a crop)."""
    _, processor = released
    image = photo(rng, 386, 386)
    want = hf_processor(tiny_idefics3, 1024)(text=PROMPT, images=[image])
    ids, [(pixels, _)] = processor.encode(PROMPT, [image], budgets={"max_image_tiles": 4})
    assert ids == want["input_ids"][0]
    np.testing.assert_allclose(pixels, want["pixel_values"][0], rtol=0, atol=1e-6)


def test_high_splits_where_the_checkpoint_does_not(tiny_idefics3, rng):
    processor = ours(tiny_idefics3, splitting=False)
    image = photo(rng, 386, 386)
    assert image_tokens(processor, image) == image_tokens(processor, image, "low") == TOKENS
    want = hf_processor(tiny_idefics3, LONGEST, splitting=True)(text=PROMPT, images=[image])
    assert processor.encode(PROMPT, [image], budgets="high")[0] == want["input_ids"][0]


def test_one_budget_per_image(released, rng):
    _, processor = released
    images = [photo(rng, 386, 386), photo(rng, 386, 386)]
    ids, per_image = processor.encode("<image><image>Compare.", images, budgets=["low", None])
    assert [p.shape[0] for p, _ in per_image] == [1, 17]
    assert ids.count(processor.image_token_id) == 18 * TOKENS
    with pytest.raises(InputError, match="2 image budgets for 1 images"):
        processor.encode(PROMPT, images[:1], budgets=["low", "high"])


def test_call_takes_max_image_tiles(released, rng):
    hf, processor = released
    image = photo(rng, 386, 386)
    assert processor([image], PROMPT, max_image_tiles=4)["pixel_values"].shape[1] == 5
    assert processor([image], PROMPT)["pixel_values"].shape[1] == 17 == hf(text=PROMPT, images=[image])[
        "pixel_values"].shape[1]


@pytest.mark.parametrize("bad", [
    "medium", {"detail": "LOW"}, {"max_image_tiles": -1}, {"max_image_tiles": "3"}, {"max_image_tiles": True},
    {"max_image_tiles": 2.0}, {"upscale": "no"}, {"tiles": 3}, 7, ["low"],
], ids=repr)
def test_bad_budgets_are_clear_errors(bad):
    with pytest.raises(InputError, match="detail|max_image_tiles|upscale|image option"):
        ImageBudget.of(bad)


def test_over_takes_what_a_request_leaves_open():
    engine = ImageBudget(detail="low", max_image_tiles=4, upscale=False)
    assert ImageBudget().over(engine) == engine
    assert ImageBudget(detail="high", max_image_tiles=9).over(engine) == ImageBudget("high", 9, False)


@pytest.mark.parametrize("max_tiles", range(0, 13))
def test_capped_size_is_the_largest_that_fits(max_tiles, rng):
    """Over random sizes: the capped size fits (or is one tile, the global view alone), and every longest edge
    between it and the uncapped size, in steps of a tile, would not."""
    import math

    from smolvlm_fast.inputs.tiling import longest_edge_size, tile_multiple_size

    def tiles(h, w):
        h, w = tile_multiple_size(h, w, TILE)
        return 0 if h <= TILE and w <= TILE else (h // TILE) * (w // TILE)

    for _ in range(50):
        h, w = (int(x) for x in rng.integers(1, 4096, 2))
        ch, cw = capped_size(h, w, TILE, max_tiles)
        assert tiles(ch, cw) <= max_tiles or max(ch, cw) <= TILE, (h, w, ch, cw)
        if (ch, cw) == (h, w):
            assert tiles(h, w) <= max_tiles or max(h, w) <= TILE
            continue
        top = math.ceil(max(h, w) / TILE) * TILE
        for edge in range(max(ch, cw) + TILE, top + 1, TILE):
            if edge < top:
                assert tiles(*longest_edge_size(h, w, edge)) > max_tiles, (h, w, edge)
        assert tiles(h, w) > max_tiles


# ---------------------------------------------------------------- through LLM, the server and the commands
# The tiny checkpoint: tiles of 64, longest edge 192, 16 tokens a tile; a 90 x 60 picture is 3 x 2 tiles + 1.

def tiny_picture(seed: int) -> Image.Image:
    return photo(np.random.default_rng(seed), 60, 90)


def prompt_image_tokens(llm, prompt) -> int:
    ids, _ = llm.encode(prompt)
    return ids.count(llm.model.config.image_token_id)


@pytest.fixture(scope="module")
def tiny_llm(tiny_idefics3):
    from smolvlm_fast.serving.llm import LLM
    llm = LLM(tiny_idefics3, backend="numpy", ignore_eos=True)
    yield llm
    llm.shutdown()


def test_llm_prompt_and_block_options(tiny_llm):
    image = tiny_picture(0)
    as_dict = {"prompt": "User:<image>What?", "images": [image]}
    assert prompt_image_tokens(tiny_llm, as_dict) == 7 * 16
    assert prompt_image_tokens(tiny_llm, {**as_dict, "detail": "low"}) == 16
    assert prompt_image_tokens(tiny_llm, {**as_dict, "max_image_tiles": 4}) == 5 * 16
    chat = [{"role": "user", "content": [{"type": "image", "image": image, "detail": "low"},
                                         {"type": "image_url", "image_url": {"url": image_data_url(image),
                                                                             "detail": "low"}},
                                         {"type": "image", "image": image},
                                         {"type": "text", "text": "Three?"}]}]
    assert prompt_image_tokens(tiny_llm, chat) == 16 + 16 + 7 * 16
    with pytest.raises(InputError, match="detail must be one of"):
        tiny_llm.encode({**as_dict, "detail": "tiny"})


def test_llm_defaults_and_what_a_prompt_overrides(tiny_idefics3):
    from smolvlm_fast.serving.llm import LLM
    llm = LLM(tiny_idefics3, backend="numpy", image_detail="low")
    image = tiny_picture(1)
    assert prompt_image_tokens(llm, {"prompt": "<image>?", "images": [image]}) == 16
    assert prompt_image_tokens(llm, {"prompt": "<image>?", "images": [image], "detail": "high"}) == 7 * 16
    llm.shutdown()
    with pytest.raises(InputError, match="max_image_tiles must be an int >= 0"):
        LLM(tiny_idefics3, backend="numpy", max_image_tiles=-2)


def image_data_url(image: Image.Image) -> str:
    import base64
    import io
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_server_image_url_detail(tiny_llm):
    """OpenAI's image_url.detail through the real openai client: "low" costs 16 image tokens where "auto" costs
    112, and the answer is what LLM gives the same chat block; an unknown detail is a 400."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from smolvlm_fast import SamplingParams
    from smolvlm_fast.serving.server.app import create_app
    from tests.server_harness import running

    url = image_data_url(tiny_picture(2))

    def chat(detail):
        part = {"url": url, **({"detail": detail} if detail else {})}
        return [{"role": "user", "content": [{"type": "image_url", "image_url": part},
                                             {"type": "text", "text": "What?"}]}]

    with running(create_app(tiny_llm, model_name="tiny")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        usage = {d: client.chat.completions.create(model="tiny", messages=chat(d), max_tokens=3).usage.prompt_tokens
                 for d in (None, "auto", "low", "high")}
        assert usage[None] == usage["auto"] == usage["high"]
        assert usage[None] - usage["low"] > 6 * 16  # six tiles of 16 image tokens, and their row/col markers
        answer = client.chat.completions.create(model="tiny", messages=chat("low"), max_tokens=4, temperature=0)
        block = [{"role": "user", "content": [{"type": "image", "url": url, "detail": "low"},
                                              {"type": "text", "text": "What?"}]}]
        assert answer.choices[0].message.content == tiny_llm.generate(block, SamplingParams(max_new_tokens=4))[0].text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=chat("tiny"), max_tokens=2)


def test_command_flags(monkeypatch):
    from smolvlm_fast import cli
    args = cli.build_parser().parse_args(["generate", "hi", "--detail", "low", "--max-image-tiles", "4",
                                          "--no-upscale"])
    assert cli.image_budget_of(args) == ImageBudget("low", 4, False)
    for command in (["caption", "dir"], ["serve"]):
        args = cli.build_parser().parse_args([*command, "--detail", "high"])
        assert cli.image_budget_of(args) == ImageBudget("high")
    args = cli.build_parser().parse_args(["generate", "hi", "--max-image-tiles", "-1"])
    with pytest.raises(InputError):
        cli.image_budget_of(args)
