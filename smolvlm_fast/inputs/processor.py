"""SmolVLM's processor: text + images -> input ids and pixel arrays, exactly as transformers' Idefics3Processor /
SmolVLMProcessor with the PIL image processor (NumPy + PIL only).

Per image (uint8 [H, W, 3] from images.load_image):
  1. resize so the longest edge is `size.longest_edge` (LANCZOS; small images are upscaled unless
     upscale_small_images=False), the other edge rounded up to even, both capped at 4096;
  2. with do_image_splitting: resize both edges up to multiples of the tile size m = `max_image_size.longest_edge`,
     cut rows x cols tiles of m x m and append the whole image resized to m x m (the "global" image); an image that
     is m x m already is only the global image (rows = cols = 0);
     without splitting: resize to m x m;
  3. rescale by 1/255 and normalize with mean/std, in float32 exactly as transformers rounds;
  4. pad every prompt to the most images in the batch: pixel_values [B, N, 3, m, m] float32 (padding slots are all
     zero) and pixel_attention_mask [B, N, m, m] int64.
Each `<image>` in the text becomes, for a split image,
  for each row r, col c: <fake_token_around_image><row_r_col_c><image>*image_seq_len ... then "\\n" after each row,
  then "\\n<fake_token_around_image><global-img><image>*image_seq_len<fake_token_around_image>";
and for an unsplit image only the global part without the leading "\\n".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CheckpointError, InputError
from .images import load_image
from .tokenizer import (
    BatchFeature,
    Tokenizer,
    as_template_dict,
    normalize_conversations,
    read_chat_templates,
    to_tensor,
)

MAX_IMAGE_SIZE = 4096  # transformers caps both edges here after the longest-edge resize
MAX_GRID = 6  # <row_r_col_c> tokens exist for r, c in 1..6
XATTN_PROCESSOR = "SmolVLMFastXAttnProcessor"  # the factorized variant's (docs/xattn.md): one <image> token per image
MAX_IMAGES = 32  # images in one prompt: each is up to 6 x 6 + 1 frames through the vision encoder


# --- configuration -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The image processor settings (preprocessor_config.json, or processor_config.json's "image_processor")."""

    longest_edge: int | None = 4 * 364  # size.longest_edge; None when size is a fixed height/width
    fixed_size: tuple[int, int] | None = None  # size.height, size.width
    tile_size: int = 364  # max_image_size.longest_edge: the vision encoder's input size
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = int(Image.Resampling.LANCZOS)
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "lut", pixel_lut(self))

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ImageConfig":
        size, tile = d.get("size", {"longest_edge": cls.longest_edge}), d.get("max_image_size", {"longest_edge": 364})
        if not isinstance(tile, dict) or not isinstance(tile.get("longest_edge"), int) or tile["longest_edge"] <= 0:
            raise CheckpointError(f"{where}: max_image_size must be {{'longest_edge': positive int}}, got {tile!r}")
        longest, fixed = _parse_size(size, where)
        if not d.get("do_pad", True):
            raise CheckpointError(f"{where}: do_pad false is not supported (SmolVLM models take padded pixel_values)")
        return cls(
            longest_edge=longest, fixed_size=fixed, tile_size=tile["longest_edge"],
            do_resize=bool(d.get("do_resize", True)), do_image_splitting=bool(d.get("do_image_splitting", True)),
            do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=_three(d.get("image_mean", 0.5), "image_mean", where),
            image_std=_three(d.get("image_std", 0.5), "image_std", where),
            resample=_resample(d.get("resample", int(Image.Resampling.LANCZOS)), where),
        )


def _parse_size(size, where: str) -> tuple[int | None, tuple[int, int] | None]:
    if isinstance(size, dict) and isinstance(size.get("longest_edge"), int) and size["longest_edge"] > 0:
        return size["longest_edge"], None
    if isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
        return None, (size["height"], size["width"])
    raise CheckpointError(f"{where}: size must be {{'longest_edge': int}} or {{'height', 'width'}}, got {size!r}")


def _three(value, name: str, where: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise CheckpointError(f"{where}: {name} must have 3 values (RGB), got {value!r}")
    return tuple(float(v) for v in values)


def _resample(value, where: str) -> int:
    try:
        return int(Image.Resampling(value))
    except ValueError:
        raise CheckpointError(f"{where}: resample {value!r} is not a PIL resampling filter (0-5)") from None


def pixel_lut(cfg: ImageConfig) -> np.ndarray:
    """[3, 256] float32: the rescaled and normalized value of each uint8 level per channel, computed with
    transformers' arithmetic (float64 rescale, cast to float32, float32 normalize) so values match bit for bit."""
    levels = np.arange(256, dtype=np.uint8)
    x = levels.astype(np.float32)
    if cfg.do_rescale:
        x = (levels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if not cfg.do_normalize:
        return np.stack([x, x, x])
    mean, std = np.array(cfg.image_mean, np.float32), np.array(cfg.image_std, np.float32)
    return ((x[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)  # [3, 256]


# --- geometry (all on uint8 [H, W, 3]) ---------------------------------------------------------------------------


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """[H, W, 3] -> [height, width, 3] with PIL, as transformers resizes (a same-size resize is a copy)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Longest edge -> `longest`, the other by the aspect ratio (truncated, then rounded up to even), then both
    scaled below MAX_IMAGE_SIZE: transformers' _resize_output_size_rescale_to_max_len + _scale_below_upper_bound."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both edges up to multiples of `tile`, the short one from the long one's new size (resize_for_vision_encoder)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    # a 1-pixel-wide image can round to 0 (49 * (1 / 49) < 1), which PIL cannot resize to: one tile at least
    return max(height, tile), max(width, tile)


def split_tiles(image: np.ndarray, tile: int, resample: int) -> tuple[list[np.ndarray], int, int]:
    """[H, W, 3] (multiples of tile) -> (row-major tiles + the global image, each [tile, tile, 3], rows, cols);
    an image no larger than one tile is only the global image, with rows = cols = 0."""
    height, width = image.shape[:2]
    if height <= tile and width <= tile:
        return [image], 0, 0
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    tiles = [image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    return [*tiles, resize(image, tile, tile, resample)], rows, cols


def image_to_frames(image: np.ndarray, cfg: ImageConfig, *, splitting: bool, upscale: bool):
    """[H, W, 3] uint8 -> (frames [tile, tile, 3] uint8, rows, cols)."""
    image = resize_input(image, cfg, upscale=upscale)
    if not splitting:
        return [resize(image, cfg.tile_size, cfg.tile_size, cfg.resample)], 0, 0
    image = resize(image, *tile_multiple_size(*image.shape[:2], cfg.tile_size), cfg.resample)
    return split_tiles(image, cfg.tile_size, cfg.resample)


def resize_input(image: np.ndarray, cfg: ImageConfig, *, upscale: bool) -> np.ndarray:
    """The first resize: longest edge to size.longest_edge (or to the fixed height/width)."""
    if not cfg.do_resize:
        return image
    if cfg.fixed_size is not None:
        return resize(image, *cfg.fixed_size, cfg.resample)
    height, width = image.shape[:2]
    if not upscale and max(height, width) <= cfg.longest_edge:
        return image
    return resize(image, *longest_edge_size(height, width, cfg.longest_edge), cfg.resample)


def frames_to_pixels(frames: list[np.ndarray], lut: np.ndarray) -> list[np.ndarray]:
    """uint8 [h, w, 3] frames -> float32 [3, h, w] (rescaled, normalized) by table lookup."""
    return [np.stack([lut[c][frame[:, :, c]] for c in range(3)]) for frame in frames]


def pad_batch(samples: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, float32 [3, h, w] frames -> pixel_values [B, N, 3, H, W] float32 (zero padded) and
    pixel_attention_mask [B, N, H, W] int64 (1 on real pixels), N = most frames in a prompt."""
    frames = [f for sample in samples for f in sample]
    n, height, width = max(len(s) for s in samples), max(f.shape[1] for f in frames), max(f.shape[2] for f in frames)
    pixel_values = np.zeros((len(samples), n, 3, height, width), dtype=np.float32)
    pixel_mask = np.zeros((len(samples), n, height, width), dtype=np.int64)
    for b, sample in enumerate(samples):
        for i, frame in enumerate(sample):
            pixel_values[b, i, :, : frame.shape[1], : frame.shape[2]] = frame
            pixel_mask[b, i, : frame.shape[1], : frame.shape[2]] = 1
    return pixel_values, pixel_mask


# --- text ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokens:
    image: str = "<image>"
    fake: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"

    def prompt(self, rows: int, cols: int, seq_len: int) -> str:
        """The text one `<image>` expands to, for an image cut into rows x cols tiles (0 x 0: not split)."""
        global_part = f"{self.fake}{self.global_image}{self.image * seq_len}{self.fake}"
        if rows == 0 and cols == 0:
            return global_part
        tile_rows = ["".join(f"{self.fake}<row_{r}_col_{c}>{self.image * seq_len}" for c in range(1, cols + 1)) + "\n"
                     for r in range(1, rows + 1)]
        return "".join(tile_rows) + "\n" + global_part


def expand_image_tokens(text: str, marker: str, prompts: list[str]) -> str:
    """Replace the i-th `marker` in text by prompts[i]."""
    pieces = text.split(marker)
    return pieces[0] + "".join(p + piece for p, piece in zip(prompts, pieces[1:]))


def group_images(images, texts: list[str] | None, marker: str) -> list[list]:
    """One image, a flat list, or a list of lists per prompt -> a list per prompt. A flat list is split by the
    number of markers in each prompt, as Idefics3Processor does (what is left over forms an extra group)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)  # [N, H, W, C] -> N images
    elif not isinstance(images, (list, tuple)):
        return [[images]]
    if not images:
        raise InputError("images is an empty list")
    nested = [isinstance(group, (list, tuple)) for group in images]
    if all(nested):
        return [list(group) for group in images]
    if any(nested):
        raise InputError("images must be a list of images or a list of lists (one per prompt), not a mix")
    if texts is None:
        return [list(images)]
    starts = np.cumsum([0, *(t.count(marker) for t in texts)]).tolist()
    groups = [list(images[starts[i] : starts[i + 1]]) for i in range(len(texts))]
    return groups + ([list(images[starts[-1] :])] if len(images) > starts[-1] else [])


def check_image_counts(texts: list[str], groups: list[list] | None, marker: str, max_images: int = MAX_IMAGES) -> None:
    """More markers than images, or the other way round, or more than max_images images in a prompt: an InputError
    stating the counts (before any image is decoded)."""
    check_max_images(groups or [], max_images)
    in_text = [t.count(marker) for t in texts]
    if groups is None:
        if any(in_text):
            raise InputError(f"the text has {sum(in_text)} {marker} markers but no images were passed")
        return
    passed = [len(g) for g in groups]
    if sum(in_text) != sum(passed):
        raise InputError(f"the text has {sum(in_text)} {marker} markers but {sum(passed)} images were passed")
    if in_text != passed:
        raise InputError(f"{marker} markers per prompt {in_text} do not match images per prompt {passed}")


def check_max_images(groups: list[list], max_images: int) -> None:
    for i, group in enumerate(groups):
        if len(group) > max_images:
            raise InputError(f"prompt {i} has {len(group)} images, over the limit of {max_images} (max_images)")


# --- the processor -----------------------------------------------------------------------------------------------


class Processor:
    """Text + images -> model inputs, identical to transformers' SmolVLM processors."""

    def __init__(self, tokenizer: Tokenizer, image_config: ImageConfig, *, image_seq_len: int,
                 chat_template: str | dict[str, str] | None = None, upscale_small_images: bool = True,
                 processor_class: str | None = None, max_images: int = MAX_IMAGES, max_image_pixels: int | None = None):
        self.tokenizer = tokenizer
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
        proc = _read_json(path / "processor_config.json")
        image_dict, where = _image_processor_dict(path, proc)
        image_config = ImageConfig.from_dict(image_dict, where)
        if do_image_splitting is not None:
            image_config = replace(image_config, do_image_splitting=do_image_splitting)
        templates = _processor_chat_templates(path, proc) or tokenizer.chat_templates
        processor = cls(tokenizer, image_config, image_seq_len=_image_seq_len(path, proc), chat_template=templates,
                        upscale_small_images=upscale_small_images, processor_class=proc.get("processor_class"),
                        max_images=max_images, max_image_pixels=max_image_pixels)
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

    def __call__(self, text: str | list[str] | None = None, images=None, *, return_tensors: str | None = None,
                 padding: bool | str = False, padding_side: str | None = None, add_special_tokens: bool = True,
                 do_image_splitting: bool | None = None, upscale_small_images: bool | None = None) -> BatchFeature:
        """-> BatchFeature with input_ids, attention_mask (when text is given), pixel_values [B, N, 3, m, m] float32
        and pixel_attention_mask [B, N, m, m] int64 (when images are given)."""
        if text is None and images is None:
            raise InputError("pass text, images, or both")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a list of strings")
        groups = None if images is None else group_images(images, texts, self.tokens.image)
        if texts is not None:
            check_image_counts(texts, groups, self.tokens.image, self.max_images)
        out = BatchFeature()
        if groups is not None:
            pixel_values, pixel_mask, grids = self.process_images(groups, do_image_splitting, upscale_small_images)
            out.update(pixel_values=to_tensor(pixel_values, return_tensors or "np", "pixel_values"),
                       pixel_attention_mask=to_tensor(pixel_mask, return_tensors or "np", "pixel_attention_mask"))
            texts = None if texts is None else self._expand_texts(texts, grids)
        if texts is not None:
            encoded = self.tokenizer(texts, padding=padding, padding_side=padding_side, return_tensors=return_tensors,
                                     add_special_tokens=add_special_tokens)
            out = BatchFeature(**encoded, **out)
        return out

    def process_images(self, groups: list[list], do_image_splitting: bool | None = None,
                       upscale_small_images: bool | None = None):
        """Images per prompt -> (pixel_values [B, N, 3, m, m], pixel_attention_mask [B, N, m, m],
        (rows, cols) per image per prompt)."""
        cfg = self.image_config
        splitting = cfg.do_image_splitting if do_image_splitting is None else do_image_splitting
        upscale = self.upscale_small_images if upscale_small_images is None else upscale_small_images
        check_max_images(groups, self.max_images)
        samples, grids = [], []
        for group in groups:
            split = [image_to_frames(load_image(im, max_pixels=self.max_image_pixels), cfg, splitting=splitting,
                                     upscale=upscale) for im in group]
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
        prompt = self.tokenizer.render_chat(conversation, chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, tools=tools,
                                            documents=documents, **template_kwargs)
        if not tokenize:
            return prompt
        groups = conversation_images(conversation)
        first = prompt[0] if isinstance(prompt, list) else prompt
        bos = self.tokenizer.bos_token
        out = self(prompt, images=groups if any(groups) else None, return_tensors=return_tensors, padding=padding,
                   add_special_tokens=not (bos is not None and first.startswith(bos)))
        return out if return_dict else out["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=skip_special_tokens)


# --- helpers -----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _image_processor_dict(path: Path, proc: dict) -> tuple[dict, str]:
    """transformers 5 nests the image processor in processor_config.json; older saves use preprocessor_config.json."""
    if isinstance(proc.get("image_processor"), dict):
        return proc["image_processor"], str(path / "processor_config.json")
    legacy = path / "preprocessor_config.json"
    if legacy.is_file():
        return _read_json(legacy), str(legacy)
    raise CheckpointError(f"{path}: no image processor settings (processor_config.json 'image_processor' or "
                          "preprocessor_config.json)")


def _image_seq_len(path: Path, proc: dict) -> int:
    """processor_config.json's image_seq_len, else (image_size / patch_size)^2 / scale_factor^2 from config.json."""
    if isinstance(proc.get("image_seq_len"), int):
        return proc["image_seq_len"]
    config = _read_json(path / "config.json")
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
    legacy = _read_json(path / "chat_template.json").get("chat_template") or proc.get("chat_template")
    return read_chat_templates(path, {"chat_template": legacy}) if legacy else {}


def conversation_images(conversation) -> list[list]:
    """The images named in each conversation's content blocks, in order: a list per conversation. OpenAI-style
    {"type": "image_url", "image_url": {"url": ...}} blocks count as images too (see image_url_blocks_as_images)."""
    conversations, _ = normalize_conversations(image_url_blocks_as_images(conversation))
    groups = []
    for conv in conversations:
        blocks = [b for m in conv if isinstance(m.get("content"), list) for b in m["content"]]
        groups.append([_block_image(b, key) for b in blocks if isinstance(b, dict) and b.get("type") == "image"
                       for key in ("image", "url", "path", "base64") if key in b])
    return groups


def image_url_blocks_as_images(conversation):
    """The conversation (or list of them) with each OpenAI {"type": "image_url", "image_url": {"url": U}} (or
    "image_url": U) content block written as {"type": "image", "url": U}, the form the chat template renders."""
    if isinstance(conversation, dict):
        content = conversation.get("content")
        if not isinstance(content, list):
            return conversation
        return {**conversation, "content": [_image_block(b) for b in content]}
    if isinstance(conversation, (list, tuple)):
        return [image_url_blocks_as_images(c) for c in conversation]
    return conversation


def _image_block(block):
    if not (isinstance(block, dict) and block.get("type") == "image_url"):
        return block
    url = block.get("image_url")
    return {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}


def _block_image(block: dict, key: str):
    value = block[key]
    if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
        return f"data:image/png;base64,{value}"
    return value
