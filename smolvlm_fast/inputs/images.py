"""Image loading: anything a user passes as an image -> an RGB uint8 array [H, W, 3].

Follows transformers (image_transforms.convert_to_rgb, image_utils.load_image) so that pixel values match:
- a PIL image with transparency (RGBA, LA, PA, or a palette/greyscale image with a `transparency` entry) is
  composited onto white; any other mode is converted with PIL's `convert("RGB")`;
- a path is opened, turned upright by its EXIF orientation and converted with `convert("RGB")` — transformers does
  not composite transparency for paths (it drops the alpha channel), and neither do we, so results stay identical;
- an array is HWC or CHW (channels-first wins when both ends look like channels, as in transformers) with 1, 3 or 4
  channels; 4 channels are composited onto white with rounding, as transformers does for uint8 arrays.

Where we differ from transformers, on purpose:
- 16-bit images (PIL modes 'I;16*', 'I', 'F', uint16 arrays) are scaled to 8 bits (v / 257 for 16-bit data);
  transformers' `convert("RGB")` clips them at 255, which turns most 16-bit photos white.
- float arrays in [0, 1] are scaled by 255 and rounded to uint8 here; transformers rescales them by 1/255 a second
  time unless the caller passes do_rescale=False.

Hostile files (paths and data URIs come from anyone who can reach a server):
- only ALLOWED_FORMATS are tried (Image.open(formats=...)): Pillow never runs another plugin on the bytes, so an EPS
  never reaches Ghostscript and PSD, ICO, PDF or SVG files are refused as unreadable;
- width x height from the header, before any pixel is decoded, must be at most max_pixels (MAX_IMAGE_PIXELS by
  default; a PIL image passed in is checked too, arrays and tensors are already decoded and are not);
- a truncated or corrupt file is an InputError, never a half-decoded image (LOAD_TRUNCATED_IMAGES stays off);
- GIF, TIFF and WebP animations give their first frame.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from .files import local_file

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow plugin names; JPEG includes MPO photos
# 40 million pixels (an 8K frame is 33 M) decode to 120 MB of RGB: well under Pillow's own bomb warning (89.5 M) and
# error (179 M). The server's --max-image-pixels default is the same. Raise it per call (max_pixels) or here.
MAX_IMAGE_PIXELS = 40_000_000


def load_image(image, *, max_pixels: int | None = None) -> np.ndarray:
    """A PIL image, a path (str / Path), a `data:image/...;base64,` URI, or an array/tensor -> [H, W, 3] uint8.
    An image file or PIL image of more than max_pixels (default MAX_IMAGE_PIXELS) pixels is an InputError."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, Image.Image):
        check_pixels(image.size, "PIL image", max_pixels)  # a lazily opened image is not decoded yet
        return _pil_to_rgb(image, composite_alpha=True, where="PIL image")
    if isinstance(image, (str, Path)):
        return _load_source(image, max_pixels)
    if _is_tensor(image):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()  # numpy has no bfloat16
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        return _array_to_rgb(np.asarray(image))
    raise InputError(f"unsupported image type {type(image).__name__}: pass a PIL image, a path or an array")


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


# --- paths and data URIs ---------------------------------------------------------------------------------------


def _load_source(source, max_pixels: int) -> np.ndarray:
    text = str(source)
    if isinstance(source, str) and text.startswith("data:image/"):
        where = f"image data URI ({text[:40]}...)"
        return _pil_to_rgb(_open_data_uri(text, where, max_pixels), composite_alpha=False, where=where)
    path, where = local_file(source, "image")
    return _pil_to_rgb(open_image(path, where, "read", max_pixels), composite_alpha=False, where=where)


def _open_data_uri(uri: str, where: str, max_pixels: int) -> Image.Image:
    try:
        data = base64.b64decode(uri.split(",", 1)[1], validate=False)
    except (IndexError, binascii.Error, ValueError) as e:
        raise InputError(f"cannot decode {where}: {e}") from None
    return open_image(io.BytesIO(data), where, "decode", max_pixels)


def open_image(fp, where: str, verb: str, max_pixels: int) -> Image.Image:
    """Decode a path or file object as one of ALLOWED_FORMATS (first frame), upright by its EXIF orientation, once its
    header says it has at most max_pixels pixels. Every failure is an InputError 'cannot {verb} {where}: why'."""
    try:
        with Image.open(fp, formats=ALLOWED_FORMATS) as image:
            check_pixels(image.size, where, max_pixels)  # the header alone gives the size: nothing is decoded yet
            image.load()
            return ImageOps.exif_transpose(image)  # a new image: usable after the file is closed
    except InputError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked inside Image.open
        raise InputError(f"{where} has more pixels than the limit of {max_pixels:,} pixels (max_image_pixels): "
                         f"{e}") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot {verb} {where}: not a {', '.join(ALLOWED_FORMATS)} image, or a corrupt one") from None
    except Exception as e:  # noqa: BLE001  decoders raise OSError, SyntaxError, struct.error ... on hostile bytes
        raise InputError(f"cannot {verb} {where}: {type(e).__name__}: {e}") from None


def check_pixels(size: tuple[int, int], where: str, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(f"{where} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,} pixels (max_image_pixels)")


# --- PIL images --------------------------------------------------------------------------------------------------


def _pil_to_rgb(image: Image.Image, *, composite_alpha: bool, where: str) -> np.ndarray:
    """PIL image -> [H, W, 3] uint8, transparency composited onto white when composite_alpha."""
    if image.width == 0 or image.height == 0:
        raise InputError(f"{where}: image has zero size ({image.width}x{image.height})")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return _array_to_rgb(_high_bit_depth_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16")))
    try:
        if composite_alpha and _has_alpha(image):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: cannot convert {image.mode} image to RGB: {e}") from None


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _high_bit_depth_to_uint8(a: np.ndarray, *, sixteen_bit: bool = False) -> np.ndarray:
    """16-bit pixels -> v / 257; 32-bit integer pixels the same when any exceeds 255 (else taken as 8-bit values);
    float pixels x 255 when all are in [0, 1] (else taken as 8-bit values). Rounded and clipped to uint8."""
    if np.issubdtype(a.dtype, np.floating):
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
    elif sixteen_bit or a.max(initial=0) > 255:
        a = a / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# --- arrays ------------------------------------------------------------------------------------------------------


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """[H, W] / [H, W, C] / [C, H, W] array, C in (1, 3, 4) -> [H, W, 3] uint8."""
    if a.size == 0:
        raise InputError(f"image array has zero size (shape {a.shape})")
    a = _channels_last(a)  # [H, W, C]
    a = _to_uint8(a)
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)  # [H, W, 1] -> [H, W, 3]
    if a.shape[-1] == 4:
        return _composite_on_white(a)
    return np.ascontiguousarray(a)


def _channels_last(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return a[:, :, None]  # [H, W] -> [H, W, 1]
    if a.ndim != 3:
        raise InputError(f"image array must have 2 or 3 dimensions, got shape {a.shape}")
    if a.shape[0] in (1, 3, 4):
        return np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if a.shape[-1] in (1, 3, 4):
        return a
    raise InputError(f"image array shape {a.shape}: expected 1, 3 or 4 channels first or last")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """uint8 stays; bool -> 0/255; floats in [0, 1] are scaled by 255; uint16 (and wider ints above 255) by 1/257."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return _float_to_uint8(a)
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0:
            raise InputError(f"image array has negative values (min {a.min()})")
        return _high_bit_depth_to_uint8(a, sixteen_bit=a.dtype == np.uint16)
    raise InputError(f"image array has unsupported dtype {a.dtype}")


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    if not np.isfinite(a).all():
        raise InputError("image array has NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0 and np.array_equal(a, np.rint(a)):
        return a.astype(np.uint8)
    raise InputError(f"float image array values in [{lo}, {hi}]: expected [0, 1] (or whole numbers in [0, 255])")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 -> [H, W, 3] uint8, as transformers' convert_to_rgb does for arrays."""
    alpha = rgba[..., 3:4] / 255  # [H, W, 1] float64
    composite = alpha * rgba[..., :3] + (1 - alpha) * 255
    return np.round(composite).astype(np.uint8)
