"""The images and videos a chat names: OpenAI image_url (video_url) blocks rewritten as the image (video) blocks chat
templates render, and the images (videos) of each conversation collected in order."""

from __future__ import annotations

from .chat_template import normalize_conversations
from .image_budget import OPTION_KEYS


def conversation_images(conversation, kind: str = "image") -> list[list]:
    """The images (kind="video": the videos) named in each conversation's content blocks, in order: a list per
    conversation. OpenAI-style {"type": "image_url", "image_url": {"url": ...}} blocks count as images too, and
    "video_url" blocks as videos (see image_url_blocks_as_images)."""
    conversations, _ = normalize_conversations(image_url_blocks_as_images(conversation))
    groups = []
    for conv in conversations:
        blocks = [b for m in conv if isinstance(m.get("content"), list) for b in m["content"]]
        groups.append([_block_image(b, key) for b in blocks if isinstance(b, dict) and b.get("type") == kind
                       for key in (kind, "url", "path", "base64") if key in b])
    return groups


def conversation_image_options(conversation) -> list[list[dict]]:
    """Per conversation, per image (in conversation_images' order), its token budget options from its block:
    detail (OpenAI's image_url.detail), max_image_tiles, upscale (inputs/image_budget.py); {} when it names none."""
    conversations, _ = normalize_conversations(image_url_blocks_as_images(conversation))
    groups = []
    for conv in conversations:
        blocks = [b for m in conv if isinstance(m.get("content"), list) for b in m["content"]]
        groups.append([{k: b[k] for k in OPTION_KEYS if k in b} for b in blocks
                       if isinstance(b, dict) and b.get("type") == "image"
                       for key in ("image", "url", "path", "base64") if key in b])
    return groups


def conversation_videos(conversation) -> list[list]:
    """The videos named in each conversation ({"type": "video", "video" | "url" | "path": ...} blocks)."""
    return conversation_images(conversation, "video")


def has_videos(conversation) -> bool:
    return any(conversation_videos(conversation))


def image_url_blocks_as_images(conversation):
    """The conversation (or list of them) with each OpenAI {"type": "image_url", "image_url": {"url": U}} (or
    "image_url": U) content block written as {"type": "image", "url": U}, the form the chat template renders, and
    each {"type": "video_url", "video_url": {"url": U}} as {"type": "video", "url": U}."""
    if isinstance(conversation, dict):
        content = conversation.get("content")
        if not isinstance(content, list):
            return conversation
        return {**conversation, "content": [_image_block(b) for b in content]}
    if isinstance(conversation, (list, tuple)):
        return [image_url_blocks_as_images(c) for c in conversation]
    return conversation


def _image_block(block):
    kind = block.get("type") if isinstance(block, dict) else None
    if kind not in ("image_url", "video_url"):
        return block
    url = block.get(kind)
    if not isinstance(url, dict):
        return {"type": kind.removesuffix("_url"), "url": url}
    detail = url.get("detail") if kind == "image_url" else None  # OpenAI's token budget of an image
    return {"type": kind.removesuffix("_url"), "url": url.get("url"), **({"detail": detail} if detail else {})}


def _block_image(block: dict, key: str):
    value = block[key]
    if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
        return f"data:{'video/mp4' if block.get('type') == 'video' else 'image/png'};base64,{value}"
    return value
