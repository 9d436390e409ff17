"""The one check of a request at the border, before it joins a batch: a prompt in the vocabulary, room in the
context and the KV cache, images only for a VLM and as many <image> tokens as its images fill. Engine.add_request
makes it (and LLM.check, for the server, is the same call), so that a bad request fails alone and never reaches a
step it would fail with its neighbours."""
from __future__ import annotations

from ..errors import InputError, check_image_tokens
from .sequence import ImageInput, Request


def check_requests(model, requests: list[Request]) -> None:
    """Every request fits the context, and its <image> tokens match its image features."""
    for i, r in enumerate(requests):
        try:
            check_request(model, r)
        except InputError as e:
            raise InputError(f"request {i}: {e}") from None


def check_request(model, r: Request, capacity: int | None = None) -> None:
    """One request at the border: a prompt in the vocabulary, room in the context (and in a cache of `capacity`
    tokens), images only for a VLM and as many <image> tokens as its images give features."""
    config = model.config
    limit = config.text.max_position_embeddings
    if not r.prompt_ids:
        raise InputError("the prompt is empty")
    if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= config.text.vocab_size:
        raise InputError(f"prompt token ids must be in [0, {config.text.vocab_size}), got values in "
                         f"[{min(r.prompt_ids)}, {max(r.prompt_ids)}]")
    needed = len(r.prompt_ids) + max(r.params.max_new_tokens, 1)
    if needed > limit:
        raise InputError(f"prompt of {len(r.prompt_ids)} tokens + max_new_tokens "
                         f"{r.params.max_new_tokens} exceeds the model's context of {limit} tokens")
    if capacity is not None and needed > capacity:
        raise InputError(f"prompt of {len(r.prompt_ids)} tokens + max_new_tokens {r.params.max_new_tokens} "
                         f"needs more than the whole KV cache ({capacity} tokens): raise num_blocks")
    if (r.images or r.image_features is not None) and not config.is_vlm:
        raise InputError("this is a text-only model; it cannot take images (use a SmolVLM checkpoint)")
    if config.is_vlm:
        n_features = sum(image_token_count(config, im) for im in request_images(r))
        markers = r.prompt_ids.count(config.image_token_id)
        if not config.is_xattn:
            check_image_tokens(markers, n_features)
        elif markers * config.image_seq_len != n_features:  # cross-attention: one <image> token per image
            raise InputError(f"the prompt has {markers} <image> token(s) but its images give "
                             f"{n_features / config.image_seq_len:g} image(s): one <image> per image")


def request_images(r: Request) -> list[ImageInput]:
    if r.images and r.image_features is not None:
        raise InputError("pass a request's images either as images or as image_features, not both")
    return list(r.images) if r.image_features is None else [ImageInput(features=r.image_features)]


def image_token_count(config, image: ImageInput) -> int:
    """The <image> tokens one image fills: its feature rows, or image_seq_len per frame. Checks the image's shape
    against the model at the border, so that a bad one never reaches a step it would fail with its neighbours."""
    if image.features is not None:
        shape = tuple(getattr(image.features, "shape", ()))
        if len(shape) != 2 or shape[1] != config.text.hidden_size or shape[0] == 0:
            raise InputError(f"image features must be [tokens > 0, {config.text.hidden_size}] (the text hidden size), "
                             f"got shape {shape}")
        return int(shape[0])
    shape = getattr(image.pixel_values, "shape", None)
    if shape is None or len(shape) != 4:
        raise InputError(f"an image's pixel_values must be [frames, channels, height, width], got shape {shape}")
    v = config.vision
    if shape[1] != v.num_channels or shape[2] < v.patch_size or shape[3] < v.patch_size:
        raise InputError(f"an image's pixel_values {tuple(shape)} must have {v.num_channels} channels and be at "
                         f"least one {v.patch_size}x{v.patch_size} patch")
    config.check_image_size(int(shape[2]), int(shape[3]))
    mask = image.pixel_attention_mask
    if mask is not None and tuple(mask.shape) != (shape[0], shape[2], shape[3]):
        raise InputError(f"pixel_attention_mask {tuple(mask.shape)} does not match pixel_values {tuple(shape)}")
    return int(shape[0]) * config.image_seq_len
