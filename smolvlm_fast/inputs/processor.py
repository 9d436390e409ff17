"""SmolVLM's processor: text + images -> input ids and pixel arrays, exactly as transformers' Idefics3Processor /
SmolVLMProcessor with the PIL image processor (NumPy + PIL only).

The jobs live apart: image_config.py (the saved settings), tiling.py (an image -> frames -> pixel arrays),
image_tokens.py (image counts and the `<image>` expansion), video_config.py, video.py and video_tokens.py (a video
-> sampled frames, each an unsplit image, and the `<video>` expansion, as SmolVLMProcessor), conversation.py (the
images and videos a chat names), and the tokenizer; this module ties them together and reads a checkpoint's
processor files.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from .batch_feature import BatchFeature, to_tensor
from .chat_template import as_template_dict, read_chat_templates
from .conversation import conversation_images, conversation_videos, has_videos, image_url_blocks_as_images
from .files import read_json
from .image_budget import ImageBudget
from .image_config import ImageConfig
from .image_tokens import (
    MAX_GRID,
    MAX_IMAGES,
    ImageTokens,
    check_image_counts,
    check_max_images,
    expand_image_tokens,
    group_images,
)
from .images import load_image
from .tiling import MAX_IMAGE_SIZE, frames_to_pixels, image_to_frames, pad_batch
from .tokenizer import Tokenizer
from .video import SampledVideo, Video, load_video
from .video_config import VideoConfig, require_video, video_processor_dict
from .video_tokens import MAX_VIDEOS, VIDEO_CHAT_TEMPLATE, VIDEO_TOKEN, check_video_count, split_markers, video_prompt

XATTN_PROCESSOR = "SmolVLMFastXAttnProcessor"  # the factorized variant's (docs/xattn.md): one <image> token per image


# --- the processor -----------------------------------------------------------------------------------------------


class Processor:
    """Text + images -> model inputs, identical to transformers' SmolVLM processors."""

    def __init__(self, tokenizer: Tokenizer, image_config: ImageConfig, *, image_seq_len: int,
                 chat_template: str | dict[str, str] | None = None, upscale_small_images: bool = True,
                 processor_class: str | None = None, max_images: int = MAX_IMAGES, max_image_pixels: int | None = None,
                 video_config: VideoConfig | None = None, max_videos: int = MAX_VIDEOS):
        self.tokenizer = tokenizer
        self.video_config = video_config  # None: the checkpoint takes no video
        self.max_videos = max_videos  # per prompt
        self.max_images = max_images  # per prompt
        self.max_image_pixels = max_image_pixels  # per image file; None: images.MAX_IMAGE_PIXELS
        self.image_config = image_config
        self.image_seq_len = image_seq_len
        self.upscale_small_images = upscale_small_images
        self.processor_class = processor_class
        self.tokens = ImageTokens(**{k: getattr(tokenizer, name, default) for k, name, default in (
            ("image", "image_token", "<image>"), ("fake", "fake_image_token", "<fake_token_around_image>"),
            ("global_image", "global_image_token", "<global-img>"))})
        self.chat_templates = as_template_dict(chat_template)

    @classmethod
    def from_pretrained(cls, path, *, upscale_small_images: bool = True, do_image_splitting: bool | None = None,
                        max_images: int = MAX_IMAGES, max_image_pixels: int | None = None):
        """Load from a checkpoint dir: tokenizer files, processor_config.json / preprocessor_config.json, chat template.
        upscale_small_images=False keeps images smaller than size.longest_edge at their size (fewer tiles, faster;
        not what transformers does). do_image_splitting overrides the saved setting. max_images (per prompt) and
        max_image_pixels (per image file, default images.MAX_IMAGE_PIXELS) bound what one prompt may cost."""
        path = Path(path)
        tokenizer = Tokenizer.from_pretrained(path)
        proc = read_json(path / "processor_config.json")
        image_dict, where = _image_processor_dict(path, proc)
        image_config = ImageConfig.from_dict(image_dict, where)
        if do_image_splitting is not None:
            image_config = replace(image_config, do_image_splitting=do_image_splitting)
        templates = _processor_chat_templates(path, proc) or tokenizer.chat_templates
        video_config = VideoConfig.from_dict(*video_processor_dict(path, proc))
        processor = cls(tokenizer, image_config, image_seq_len=_image_seq_len(path, proc), chat_template=templates,
                        upscale_small_images=upscale_small_images, processor_class=proc.get("processor_class"),
                        max_images=max_images, max_image_pixels=max_image_pixels, video_config=video_config)
        processor._check_grid_tokens(path)
        return processor

    def _check_grid_tokens(self, path: Path) -> None:
        """The largest tile grid this config can make must have its <row_r_col_c> token in the vocabulary."""
        cfg = self.image_config
        if not cfg.do_image_splitting or cfg.longest_edge is None:
            return
        n = math.ceil(min(cfg.longest_edge, MAX_IMAGE_SIZE) / cfg.tile_size)
        if n > 1 and (n > MAX_GRID or self.tokenizer.backend.token_to_id(f"<row_{n}_col_{n}>") is None):
            raise CheckpointError(f"{path}: size.longest_edge {cfg.longest_edge} / max_image_size {cfg.tile_size} "
                                  f"needs a {n}x{n} tile grid, but <row_{n}_col_{n}> is not in the vocabulary")

    @property
    def image_token(self) -> str:
        return self.tokens.image

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.tokens.image)

    # --- __call__ ----------------------------------------------------------------------------------------------

    def __call__(self, images=None, text: str | list[str] | None = None, *, videos=None,
                 return_tensors: str | None = None, padding: bool | str = False, padding_side: str | None = None,
                 add_special_tokens: bool = True, do_image_splitting: bool | None = None,
                 upscale_small_images: bool | None = None, max_image_tiles: int | None = None) -> BatchFeature:
        """-> BatchFeature with input_ids, attention_mask (when text is given), pixel_values [B, N, 3, m, m] float32
        and pixel_attention_mask [B, N, m, m] int64 (when images are given). Images come first, as in transformers'
        processors: `processor(images, text)` or `processor(images=..., text=...)`. max_image_tiles caps each
        image's tile grid (inputs/image_budget.py; None, the default, is transformers' own). videos (with text: one
        `<video>` marker each): see call_with_videos."""
        if videos is not None:
            return self.call_with_videos(images, text, videos, return_tensors=return_tensors, padding=padding,
                                         padding_side=padding_side, add_special_tokens=add_special_tokens)
        if text is None and images is None:
            raise InputError("pass text, images, or both")
        texts = self._texts(images, text)
        groups = None if images is None else group_images(images, texts, self.tokens.image)
        if texts is not None:
            check_image_counts(texts, groups, self.tokens.image, self.max_images)
        out = BatchFeature()
        if groups is not None:
            budget = ImageBudget(max_image_tiles=max_image_tiles, upscale=upscale_small_images)  # checks them
            pixel_values, pixel_mask, grids = self.process_images(groups, do_image_splitting, budget.upscale,
                                                                  budget.max_image_tiles)
            out.update(pixel_values=to_tensor(pixel_values, return_tensors or "np", "pixel_values"),
                       pixel_attention_mask=to_tensor(pixel_mask, return_tensors or "np", "pixel_attention_mask"))
            texts = None if texts is None else self._expand_texts(texts, grids)
        if texts is not None:
            encoded = self.tokenizer(texts, padding=padding, padding_side=padding_side, return_tensors=return_tensors,
                                     add_special_tokens=add_special_tokens)
            out = BatchFeature(**encoded, **out)
        return out

    def encode(self, text: str, images: list, videos: list | None = None, budgets=None
               ) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        """One prompt's text (one `<image>` marker per image, one `<video>` per video) -> (token ids with each
        marker expanded, one (pixel_values [frames, 3, m, m] float32, pixel_attention_mask [frames, m, m] int64)
        pair per image and per video frame, in the order of the markers). Each image is processed alone, so its
        frames carry no padding from the prompt's other images; each video frame is an image of its own (one frame,
        so a second question about the video finds every frame in the engine's feature cache). BOS is added by the
        tokenizer only when the text does not already start with it (a chat template writes it).
        budgets: per image its ImageBudget (or what ImageBudget.of takes), or one for all; None: transformers'."""
        text, per_image = self.expand_prompt(text, images, videos, budgets)
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))), per_image

    def expand_prompt(self, text: str, images: list, videos: list | None = None, budgets=None
                      ) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
        """(text with every marker expanded, the (pixel_values, pixel_attention_mask) pairs of encode)."""
        if not isinstance(text, str):
            raise InputError(f"a prompt's text must be a string, got {type(text).__name__}")
        images, videos = list(images or []), list(videos or [])
        check_image_counts([text], [images] if images else None, self.tokens.image, self.max_images)
        check_video_count(text, len(videos), self.max_videos)
        budgets = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets] * len(images)
        if len(budgets) != len(images):
            raise InputError(f"{len(budgets)} image budgets for {len(images)} images")
        pieces = split_markers(text, self.tokens.image)
        media = {"image": iter(zip(images, map(ImageBudget.of, budgets))), "video": iter(videos)}
        per_image = []
        for k in range(1, len(pieces), 2):
            if pieces[k] == VIDEO_TOKEN:
                pieces[k] = self._video_media(next(media["video"]), per_image)
            else:
                image, budget = next(media["image"])
                pixel_values, pixel_mask, grids = self.process_images(
                    [[image]], budget.splitting(self.image_config.do_image_splitting), budget.upscale,
                    budget.max_image_tiles)  # [1, n, 3, m, m], [1, n, m, m]
                per_image.append((pixel_values[0], pixel_mask[0]))
                pieces[k] = self.image_text(*grids[0][0])
        return "".join(pieces), per_image

    def _video_media(self, video, per_image: list) -> str:
        """Append a video's frames to per_image, one [1, 3, m, m] image each; -> its `<video>` expansion."""
        cfg = require_video(self.video_config)
        sampled = load_video(video, cfg, max_pixels=self.max_image_pixels)
        for frame in frames_to_pixels(sampled.frames, cfg.lut):  # [3, m, m] float32
            per_image.append((frame[None], np.ones((1, *frame.shape[1:]), np.int64)))
        return video_prompt(sampled.timestamps, sampled.duration, self.tokens, self.image_seq_len)

    def call_with_videos(self, images, text, videos, *, return_tensors=None, padding=False, padding_side=None,
                         add_special_tokens=True) -> BatchFeature:
        """processor(text=..., videos=...) as SmolVLMProcessor: the videos (a path, frames, a Video, or a list of
        them) spread over the prompts by their `<video>` markers, images by their `<image>` markers; pixel_values
        [B, N, 3, m, m] hold each prompt's frames in marker order (transformers keeps videos and images apart and
        cannot take both in one call)."""
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise InputError("videos need text with a <video> marker per video")
        video_groups = _split_by_markers(as_video_list(videos), texts, VIDEO_TOKEN, "videos")
        image_groups = _split_by_markers(_flat_images(images), texts, self.tokens.image, "images")
        expanded, samples = [], []
        for t, ims, vids in zip(texts, image_groups, video_groups):
            t, per_image = self.expand_prompt(t, ims, vids)
            expanded.append(t)
            samples.append([frame for pixels, _ in per_image for frame in pixels])  # [3, m, m] each
        pixel_values, pixel_mask = pad_batch(samples)
        encoded = self.tokenizer(expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors,
                                 add_special_tokens=add_special_tokens)
        return BatchFeature(**encoded, pixel_values=to_tensor(pixel_values, return_tensors or "np", "pixel_values"),
                            pixel_attention_mask=to_tensor(pixel_mask, return_tensors or "np", "pixel_attention_mask"))

    def _texts(self, images, text) -> list[str] | None:
        """text as a list of prompts (None without text); a prompt passed first, in the (text, images) order of
        this package's earlier versions, is refused with the order to use."""
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        valid = texts is None or all(isinstance(t, str) for t in texts)
        if (texts is None or not valid) and _looks_like_prompt(images, self.tokens.image):
            raise InputError(f"the first argument is images, as in transformers; this looks like a prompt (it has "
                             f"{self.tokens.image}): call processor(images, text) or pass text=...")
        if not valid:
            raise InputError("text must be a string or a list of strings")
        return texts

    def process_images(self, groups: list[list], do_image_splitting: bool | None = None,
                       upscale_small_images: bool | None = None, max_image_tiles: int | None = None):
        """Images per prompt -> (pixel_values [B, N, 3, m, m], pixel_attention_mask [B, N, m, m],
        (rows, cols) per image per prompt)."""
        cfg = self.image_config
        splitting = cfg.do_image_splitting if do_image_splitting is None else do_image_splitting
        upscale = self.upscale_small_images if upscale_small_images is None else upscale_small_images
        check_max_images(groups, self.max_images)
        samples, grids = [], []
        for group in groups:
            split = [image_to_frames(load_image(im, max_pixels=self.max_image_pixels), cfg, splitting=splitting,
                                     upscale=upscale, max_tiles=max_image_tiles) for im in group]
            samples.append([p for frames, _, _ in split for p in frames_to_pixels(frames, cfg.lut)])
            grids.append([(rows, cols) for _, rows, cols in split])
        if not any(samples):
            raise InputError("images contains only empty lists")
        pixel_values, pixel_mask = pad_batch(samples)
        return pixel_values, pixel_mask, grids

    def _expand_texts(self, texts: list[str], grids: list[list[tuple[int, int]]]) -> list[str]:
        return [expand_image_tokens(t, self.tokens.image, [self.image_text(r, c) for r, c in g])
                for t, g in zip(texts, grids)]

    def image_text(self, rows: int, cols: int) -> str:
        """The text one `<image>` marker expands to, for an image cut into rows x cols tiles."""
        if self.processor_class == XATTN_PROCESSOR:  # images reach the text by cross-attention: <image> stays one token
            return self.tokens.image
        return self.tokens.prompt(rows, cols, self.image_seq_len)

    # --- chat and decoding -------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_tensors: str | None = None, return_dict: bool = False, padding: bool | str = False,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            tools=None, documents=None, **template_kwargs):
        """As transformers' processor: the prompt text by default; with tokenize=True the images named in the
        conversation ({"type": "image", "image" | "url" | "path" | "base64": ...}) are processed too, and a
        BatchFeature (return_dict=True) or the input ids are returned."""
        conversation = image_url_blocks_as_images(conversation)
        template = self.chat_templates.get(chat_template, chat_template) or self.chat_template
        if chat_template is None and has_videos(conversation):
            template = VIDEO_CHAT_TEMPLATE  # as SmolVLMProcessor.apply_chat_template: the template that renders <video>
        prompt = self.tokenizer.render_chat(conversation, chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, tools=tools,
                                            documents=documents, **template_kwargs)
        if not tokenize:
            return prompt
        groups, videos = conversation_images(conversation), conversation_videos(conversation)
        first = prompt[0] if isinstance(prompt, list) else prompt
        bos = self.tokenizer.bos_token
        out = self(images=groups if any(groups) else None, text=prompt, return_tensors=return_tensors,
                   padding=padding, add_special_tokens=not (bos is not None and first.startswith(bos)),
                   videos=[v for group in videos for v in group] if any(videos) else None)
        return out if return_dict else out["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=skip_special_tokens)


# --- helpers -----------------------------------------------------------------------------------------------------


def as_video_list(videos) -> list:
    """One video (a path, a Video, a [T, H, W, C] array, or a list of frames) or a list of videos -> a list."""
    kinds = (str, Path, Video, SampledVideo)
    if isinstance(videos, kinds) or getattr(videos, "ndim", 0) == 4:
        return [videos]
    if isinstance(videos, (list, tuple)) and videos:
        is_video = [isinstance(v, (*kinds, list, tuple)) or getattr(v, "ndim", 0) == 4 for v in videos]
        return list(videos) if all(is_video) else [list(videos)]  # a list of frames is one video
    raise InputError(f"videos must be a video (a path, frames, a Video) or a list of them, got {videos!r:.60}")


def _flat_images(images) -> list:
    """images in any form the processor takes (one, a list, a list per prompt) -> one flat list."""
    return [] if images is None else [im for group in group_images(images, None, "") for im in group]


def _split_by_markers(items: list, texts: list[str], marker: str, name: str) -> list[list]:
    """A flat list spread over the prompts by their marker counts (the counts must add up)."""
    counts = [t.count(marker) for t in texts]
    if sum(counts) != len(items):
        raise InputError(f"the text has {sum(counts)} {marker} markers but {len(items)} {name} were passed")
    starts = np.cumsum([0, *counts]).tolist()
    return [items[starts[i]:starts[i + 1]] for i in range(len(texts))]


def _looks_like_prompt(images, marker: str) -> bool:
    """A string (or list of strings) with the image marker passed as images: a caller of the old (text, images)
    order, which would otherwise fail later as an image path that does not exist."""
    texts = [images] if isinstance(images, str) else images if isinstance(images, (list, tuple)) else []
    return bool(texts) and all(isinstance(t, str) for t in texts) and any(marker in t for t in texts)


def _image_processor_dict(path: Path, proc: dict) -> tuple[dict, str]:
    """transformers 5 nests the image processor in processor_config.json; older saves use preprocessor_config.json."""
    if isinstance(proc.get("image_processor"), dict):
        return proc["image_processor"], str(path / "processor_config.json")
    legacy = path / "preprocessor_config.json"
    if legacy.is_file():
        return read_json(legacy), str(legacy)
    raise CheckpointError(f"{path}: no image processor settings (processor_config.json 'image_processor' or "
                          "preprocessor_config.json)")


def _image_seq_len(path: Path, proc: dict) -> int:
    """processor_config.json's image_seq_len, else (image_size / patch_size)^2 / scale_factor^2 from config.json."""
    if isinstance(proc.get("image_seq_len"), int):
        return proc["image_seq_len"]
    config = read_json(path / "config.json")
    try:
        vision = config["vision_config"]
        return int((vision["image_size"] // vision["patch_size"]) ** 2 / config.get("scale_factor", 2) ** 2)
    except (KeyError, TypeError, ZeroDivisionError):
        raise CheckpointError(f"{path}: image_seq_len is not in processor_config.json and cannot be computed from "
                              "config.json (vision_config.image_size, patch_size, scale_factor)") from None


def _processor_chat_templates(path: Path, proc: dict) -> dict[str, str]:
    """chat_template.jinja (and additional_chat_templates/), chat_template.json, or processor_config.json's."""
    templates = read_chat_templates(path, {})
    if templates:
        return templates
    legacy = read_json(path / "chat_template.json").get("chat_template") or proc.get("chat_template")
    return read_chat_templates(path, {"chat_template": legacy}) if legacy else {}
