"""The cross-attention variant at the engine's border: an image the vision encoder cannot take (wrong size for the
fixed-size encoder, or precomputed features of the wrong width) is refused when the request is added, so it never
reaches a step where it would fail its neighbours with it."""
import numpy as np
import pytest

from smolvlm_fast import InputError, SamplingParams, init_random
from smolvlm_fast.engine.engine import Engine
from smolvlm_fast.engine.sequence import ImageInput, Request
from smolvlm_fast.models.smolvlm_numpy import NumpyModel
from tests.test_xattn import xattn_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = init_random(xattn_config(), tmp_path_factory.mktemp("phi"), seed=4, std=0.3)
    return NumpyModel.from_checkpoint(path)


def run_with_a_bad_neighbour(model, bad: Request):
    engine = Engine(model, num_blocks=32, block_size=16)
    good = engine.add_request(Request(list(range(1, 20)), SamplingParams(max_new_tokens=4)))
    try:
        engine.add_request(bad)
    except InputError:
        pass  # refused at the border: fine
    while engine.has_unfinished():
        try:
            engine.step()
        except Exception as e:  # noqa: BLE001 -- what LLM._step does
            engine.fail_last_step(f"{type(e).__name__}: {e}")
    return good


def test_wrong_size_image_does_not_fail_its_neighbour(model):
    marker = model.config.image_token_id
    bad = Request([1, 2, marker, 3], SamplingParams(max_new_tokens=4),
                  images=[ImageInput(pixel_values=np.full((1, 3, 48, 48), 0.5, np.float32))])  # encoder takes 32x32
    good = run_with_a_bad_neighbour(model, bad)
    assert good.finish_reason == "length", good.error


def test_wrong_size_image_is_refused_at_the_border(model):
    marker = model.config.image_token_id
    engine = Engine(model, num_blocks=32, block_size=16)
    with pytest.raises(InputError, match="32x32"):
        engine.add_request(Request([1, 2, marker, 3], SamplingParams(max_new_tokens=4),
                                   images=[ImageInput(pixel_values=np.full((1, 3, 48, 48), 0.5, np.float32))]))


def test_features_of_the_wrong_width_do_not_fail_their_neighbour(model):
    marker, n = model.config.image_token_id, model.config.image_seq_len
    bad = Request([1, 2, marker, 3], SamplingParams(max_new_tokens=4),
                  image_features=np.zeros((n, model.config.text.hidden_size + 1), np.float32))
    good = run_with_a_bad_neighbour(model, bad)
    assert good.finish_reason == "length", good.error
