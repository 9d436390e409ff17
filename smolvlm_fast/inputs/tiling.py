"""An image -> its frames -> pixel arrays, as transformers' Idefics3 / SmolVLM image processor (PIL backend) does.

Per image (uint8 [H, W, 3] from images.load_image):
  1. resize so the longest edge is `size.longest_edge` (LANCZOS; small images are upscaled unless
     upscale_small_images=False), the other edge rounded up to even, both capped at 4096;
  2. with do_image_splitting: resize both edges up to multiples of the tile size m = `max_image_size.longest_edge`,
     cut rows x cols tiles of m x m and append the whole image resized to m x m (the "global" image); an image that
     is m x m already is only the global image (rows = cols = 0);
     without splitting: resize to m x m;
  3. rescale by 1/255 and normalize with mean/std, in float32 exactly as transformers rounds (ImageConfig.lut);
  4. pad every prompt to the most images in the batch: pixel_values [B, N, 3, m, m] float32 (padding slots are all
     zero) and pixel_attention_mask [B, N, m, m] int64.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .image_config import ImageConfig

MAX_IMAGE_SIZE = 4096  # transformers caps both edges here after the longest-edge resize


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """[H, W, 3] -> [height, width, 3] with PIL, as transformers resizes (a same-size resize is a copy)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def aspect_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Longest edge -> `longest`, the other by the aspect ratio, truncated, then rounded up to even, at least 1
    (transformers' _resize_output_size_rescale_to_max_len; its video processor's get_resize_output_image_size)."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """aspect_size, then both edges scaled below MAX_IMAGE_SIZE (transformers' _scale_below_upper_bound)."""
    height, width = aspect_size(height, width, longest)
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


def image_to_frames(image: np.ndarray, cfg: ImageConfig, *, splitting: bool, upscale: bool,
                    max_tiles: int | None = None):
    """[H, W, 3] uint8 -> (frames [tile, tile, 3] uint8, rows, cols). max_tiles (inputs/image_budget.py): at most
    that many split tiles, the longest edge lowered a tile at a time until the grid fits (None: no cap)."""
    if not splitting or max_tiles == 0:
        return [resize(resize_input(image, cfg, upscale=upscale), cfg.tile_size, cfg.tile_size, cfg.resample)], 0, 0
    size = input_size(*image.shape[:2], cfg, upscale=upscale)
    if max_tiles is not None:
        size = capped_size(*size, cfg.tile_size, max_tiles)
    image = resize(resize(image, *size, cfg.resample), *tile_multiple_size(*size, cfg.tile_size), cfg.resample)
    return split_tiles(image, cfg.tile_size, cfg.resample)


def capped_size(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(height, width), or the largest longest-edge resize of it (a multiple of the tile, down to one tile) whose
    tile grid has at most max_tiles tiles."""
    def tiles(h, w):
        h, w = tile_multiple_size(h, w, tile)
        return 0 if h <= tile and w <= tile else (h // tile) * (w // tile)  # one tile: only the global view

    longest, size = math.ceil(max(height, width) / tile) * tile, (height, width)
    while tiles(*size) > max_tiles and longest > tile:
        longest -= tile
        size = longest_edge_size(height, width, longest)  # from the uncapped size, not the last try
    return size


def resize_input(image: np.ndarray, cfg: ImageConfig, *, upscale: bool) -> np.ndarray:
    """The first resize: longest edge to size.longest_edge (or to the fixed height/width)."""
    return resize(image, *input_size(*image.shape[:2], cfg, upscale=upscale), cfg.resample)


def input_size(height: int, width: int, cfg: ImageConfig, *, upscale: bool) -> tuple[int, int]:
    """The size of the first resize: longest edge to size.longest_edge (or the fixed height/width; the image's
    own size without do_resize, or when it is no larger and upscale is off)."""
    if not cfg.do_resize:
        return height, width
    if cfg.fixed_size is not None:
        return cfg.fixed_size
    if not upscale and max(height, width) <= cfg.longest_edge:
        return height, width
    return longest_edge_size(height, width, cfg.longest_edge)


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
