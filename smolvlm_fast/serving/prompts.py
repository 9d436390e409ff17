"""A prompt in any form LLM takes -> (prompt token ids, one engine ImageInput per image).

The forms: a string (tokenized as it is: not chat-templated), token ids, a chat (a list of {"role", "content"}
messages, images and videos in the content blocks; the chat template applies), a dict {"prompt": text with one
<image> marker per image and one <video> per video, "images": [...], "videos": [...]} or {"prompt_token_ids": [...]}.
The processor does the image work (Processor.encode: the marker count, the tiles, a video's frames, each marker's
expansion, BOS); here each image (each video frame) gets its content hash, computed off the engine's thread.

The processor or tokenizer functions take is an inputs.processor.Processor (a VLM), a tokenizer (a text-only
model) or None (token ids only).
"""
from __future__ import annotations

import numpy as np

from ..engine.sequence import ImageInput, Request, image_digest
from ..errors import InputError
from ..inputs.image_budget import OPTION_KEYS, ImageBudget


def encode(prompt, processor, budget: ImageBudget | None = None) -> tuple[list[int], list[ImageInput]]:
    """(prompt token ids, images) of a string, token ids, chat messages or a prompt dict. budget: the images' token
    budget where the prompt does not set one (a dict's detail / max_image_tiles / upscale keys, an image block's)."""
    budget = budget or ImageBudget()
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return [int(t) for t in prompt["prompt_token_ids"]], []
    if isinstance(prompt, dict) and "prompt" in prompt:
        images = list(prompt.get("images") or [])
        own = ImageBudget.of({k: prompt[k] for k in OPTION_KEYS if k in prompt}).over(budget)
        return encode_text(prompt["prompt"], images, processor, list(prompt.get("videos") or []),
                           [own] * len(images))
    if isinstance(prompt, str):
        return encode_text(prompt, [], processor)
    if is_chat(prompt):
        return encode_chat(prompt, processor, budget)
    if isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(t, (int, np.integer)) for t in prompt):
        return [int(t) for t in prompt], []
    raise InputError(f"a prompt must be a string, token ids, chat messages or a dict, got {type(prompt).__name__}")


def encode_chat(messages, processor, budget: ImageBudget | None = None) -> tuple[list[int], list[ImageInput]]:
    """Chat messages through the checkpoint's chat template (with the generation prompt) -> ids and images, each
    image with its block's token budget over `budget`."""
    from ..inputs.conversation import (conversation_image_options, conversation_images, conversation_videos,
                                       image_url_blocks_as_images)

    if processor is None:
        raise InputError("chat prompts need a tokenizer: pass tokenizer= to LLM")
    messages = image_url_blocks_as_images(messages)
    images, videos = conversation_images(messages)[0], conversation_videos(messages)[0]
    _check_can_take(processor, images + videos)
    budgets = [ImageBudget.of(o).over(budget or ImageBudget()) for o in conversation_image_options(messages)[0]]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return encode_text(text, images, processor, videos, budgets)


def encode_text(text: str, images: list, processor, videos: list | None = None, budgets: list | None = None
                ) -> tuple[list[int], list[ImageInput]]:
    """Text with one <image> marker per image (one <video> per video) -> token ids (each marker expanded as the
    processor does, each image within its budget: None, transformers' own) and one ImageInput per image and per
    video frame, its frames and a hash of its pixels."""
    if processor is None:
        raise InputError("text prompts need a tokenizer: pass tokenizer= to LLM, or pass token ids")
    videos = list(videos or [])
    _check_can_take(processor, images + videos)
    if not is_processor(processor):  # a text-only model's tokenizer
        if not isinstance(text, str):
            raise InputError(f"a prompt's text must be a string, got {type(text).__name__}")
        bos = getattr(processor, "bos_token", None)
        return processor.encode(text, add_special_tokens=not (bos and text.startswith(bos))), []
    ids, per_image = processor.encode(text, images, videos, budgets)
    return ids, [ImageInput(pixels, mask, content_hash=image_digest(pixels)) for pixels, mask in per_image]


def with_video(question, video) -> list[dict]:
    """A question about a video (a path, frames, a Video) -> the chat asking it: the video, then the text."""
    if not isinstance(question, str):
        raise InputError(f"video= goes with one question (a string), got {type(question).__name__}")
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]


def is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) and "role" in m
                                                                      for m in prompt)


def as_prompt_list(prompts) -> list:
    """One prompt (a string, a dict, a Request, token ids or one chat) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict, Request)) or is_chat(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        return [prompts]
    return list(prompts)


def is_processor(processor) -> bool:
    """A VLM's processor (it takes images), not a text-only model's tokenizer."""
    from ..inputs.processor import Processor

    return isinstance(processor, Processor)


def _check_can_take(processor, images: list) -> None:
    if images and not is_processor(processor):
        raise InputError("this is a text-only model (no image processor); it cannot take images or videos")
