"""init_random checks its arguments before it writes anything."""
import pytest

from smolvlm_fast import InputError, init_random
from tests.test_xattn import xattn_config


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"std": float("nan")}, {"seed": 1.5}])
def test_bad_arguments_are_an_input_error(tmp_path, kwargs):
    with pytest.raises(InputError):
        init_random(xattn_config(), tmp_path / "ck", **kwargs)


def test_config_that_is_not_a_dict_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        init_random("config.json", tmp_path / "ck")


@pytest.mark.parametrize("token", [257, 5000])
def test_bad_image_token_id_leaves_no_half_checkpoint(tmp_path, token):
    with pytest.raises(InputError):
        init_random({**xattn_config(), "image_token_id": token}, tmp_path / "ck")
    # config.json and model.safetensors are already written when the tokenizer check fails
    assert not (tmp_path / "ck" / "config.json").exists()
