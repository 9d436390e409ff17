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
    ids, _ = processor.encode(PROMPT, [image], budget)
    return ids.count(processor.image_token_id)


def test_auto_is_transformers(released, rng):
    """A 386 x 386 photo: 4 x 4 tiles + the global view, 1,088 tokens, ids and pixels as transformers makes them;
    "auto" and no budget at all are the same call."""
    hf, processor = released
    image = photo(rng, 386, 386)
    want = hf(text=PROMPT, images=[image])
    for budget in (None, "auto", {"detail": "auto"}, ImageBudget()):
        ids, [(pixels, mask)] = processor.encode(PROMPT, [image], budget)
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
    ids, [(pixels, _)] = processor.encode(PROMPT, [image], {"max_image_tiles": 4})
    assert ids == want["input_ids"][0]
    np.testing.assert_allclose(pixels, want["pixel_values"][0], rtol=0, atol=1e-6)


def test_high_splits_where_the_checkpoint_does_not(tiny_idefics3, rng):
    processor = ours(tiny_idefics3, splitting=False)
    image = photo(rng, 386, 386)
    assert image_tokens(processor, image) == image_tokens(processor, image, "low") == TOKENS
    want = hf_processor(tiny_idefics3, LONGEST, splitting=True)(text=PROMPT, images=[image])
    assert processor.encode(PROMPT, [image], "high")[0] == want["input_ids"][0]


def test_one_budget_per_image(released, rng):
    _, processor = released
    images = [photo(rng, 386, 386), photo(rng, 386, 386)]
    ids, per_image = processor.encode("<image><image>Compare.", images, ["low", None])
    assert [p.shape[0] for p, _ in per_image] == [1, 17]
    assert ids.count(processor.image_token_id) == 18 * TOKENS
    with pytest.raises(InputError, match="2 image budgets for 1 images"):
        processor.encode(PROMPT, images[:1], ["low", "high"])


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
    """Over random sizes: the cap holds, and one more tile of longest edge would break it (unless the size was
    already within the cap)."""
    import math

    from smolvlm_fast.inputs.tiling import longest_edge_size, tile_multiple_size

    def tiles(h, w):
        h, w = tile_multiple_size(h, w, TILE)
        return 0 if h <= TILE and w <= TILE else (h // TILE) * (w // TILE)

    for _ in range(50):
        h, w = (int(x) for x in rng.integers(1, 4096, 2))
        ch, cw = capped_size(h, w, TILE, max_tiles)
        assert tiles(ch, cw) <= max(max_tiles, 0) or max(ch, cw) <= TILE
        if (ch, cw) != (h, w):
            bigger = math.ceil(max(ch, cw) / TILE) * TILE + TILE
            if bigger <= math.ceil(max(h, w) / TILE) * TILE:
                assert tiles(*longest_edge_size(h, w, bigger)) > max_tiles
