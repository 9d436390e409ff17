"""config.json fields of smolvlm_fast_xattn that cannot work are refused as a CheckpointError naming the field, never
let through or raised as a bare Python exception."""
import json

import pytest

from smolvlm_fast import CheckpointError, ModelConfig
from tests.test_xattn import xattn_config


def config_with(change) -> dict:
    config = json.loads(json.dumps({**xattn_config(), "image_token_id": 260}))
    change(config)
    return config


@pytest.mark.parametrize("change, field", [
    (lambda c: c["vision_config"].update(patch_stem="strided"), "patch_stem"),
    (lambda c: c["vision_config"].update(patch_stem="grouped", groups=2), "groups"),
    (lambda c: c["vision_config"].update(image_size=30), "image_size"),
    (lambda c: c["text_config"].update(architecture="gpt2"), "architecture"),
    (lambda c: c["text_config"].update(partial_rotary_factor=0.1), "partial_rotary_factor"),
    (lambda c: c.update(cross_attention_layers=[1, 0]), "cross_attention_layers"),
    (lambda c: c.update(cross_attention_layers=[2]), "cross_attention_layers"),
    (lambda c: c.update(cross_attention_layers="1"), "cross_attention_layers"),
    (lambda c: c["text_config"].update(hidden_act="relu"), "hidden_act"),
    (lambda c: c.pop("image_token_id"), "image_token_id"),
    # image 32 / patch 8 = 4 patches a side: pixel shuffle by 0, 3 or -2 cannot work (ZeroDivisionError later)
    (lambda c: c.update(scale_factor=0), "scale_factor"),
    (lambda c: c.update(scale_factor=3), "scale_factor"),
    (lambda c: c.update(scale_factor=-2), "scale_factor"),
    # ZeroDivisionError / ValueError instead of CheckpointError
    (lambda c: c["vision_config"].update(patch_size=0), "patch_size"),
    (lambda c: c["text_config"].update(partial_rotary_factor="half"), "partial_rotary_factor"),
    (lambda c: c["text_config"].update(partial_rotary_factor=float("nan")), "partial_rotary_factor"),
    # <image> outside the vocabulary: every request with an image is refused as out-of-vocab
    (lambda c: c.update(image_token_id=5000), "image_token_id"),
    (lambda c: c.update(image_token_id=-1), "image_token_id"),
    # 4 query heads over 3 KV heads: GQA cannot group them
    (lambda c: c["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    # a cross-attention model with no cross-attention layer: every image silently ignored
    (lambda c: c.pop("cross_attention_layers"), "cross_attention_layers"),
    # the encoder always runs gelu_tanh: another activation would give silently wrong features
    (lambda c: c["vision_config"].update(hidden_act="relu"), "hidden_act"),
])
def test_bad_xattn_config_is_refused_naming_the_field(change, field):
    with pytest.raises(CheckpointError, match=field):
        ModelConfig.from_dict(config_with(change))
