"""Hostile image files, made in memory with PIL or by hand: what anyone who can reach the server may send.

Each is a Hostile(name, data, error, expected): the file name carries an image extension (an upload or a folder would
name a PSD "photoshop.png" just as well), `error` is the pattern the InputError must match (None: the image is
processed), and `expected` is the [H, W, 3] uint8 image load_image must give (within atol) when it is processed.
The bombs are header-only: tiny files whose header claims more pixels than the limit, with one row of pixel data, so
decoding one would fail as truncated instead of with the limit's message.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

LIMIT = "limit of 40,000,000 pixels"  # images.MAX_IMAGE_PIXELS, as the error writes it
NOT_ALLOWED = "not a JPEG, PNG, WEBP, GIF, BMP, TIFF image"
TRUNCATED = "(?i)truncated"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    error: str | None = None
    expected: np.ndarray | None = None
    atol: int = 0


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def quadrants() -> np.ndarray:
    """[16, 32, 3]: red, green / blue, white quadrants, so that any rotation or flip is visible."""
    a = np.empty((16, 32, 3), np.uint8)
    a[:8, :16], a[:8, 16:], a[8:, :16], a[8:, 16:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    return a


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height 8-bit grey pixels, followed by one row of them (a few hundred bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # depth 8, grey, deflate, filter 0, no interlace
    row = zlib.compress(b"\0" * (width + 1), 9)  # filter byte + one row
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", row) + png_chunk(b"IEND", b"")


def header_only_gif(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen (the image size Pillow reports) is width x height."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def psd(width: int = 4, height: int = 2) -> bytes:
    """A minimal Photoshop file: 8-bit greyscale, one channel, raw (what Pillow's PSD plugin would open)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, height, width, 8, 1)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(width * height)


def exif_rotated(fmt: str, **options) -> bytes:
    """The quadrants stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(quadrants()), fmt, exif=exif, **options)


def truncated(fmt: str) -> bytes:
    data = encode(Image.fromarray(noise(64, 64)), fmt)
    return data[: len(data) // 2]  # cut inside the pixel data, after a valid header


def sixteen_bit() -> tuple[bytes, np.ndarray]:
    values = np.arange(0, 65536, 257 * 5, dtype=np.uint16).reshape(4, -1)[:, :12]  # [4, 12], 0 .. 65535
    grey = np.rint(values / 257).astype(np.uint8)
    return encode(Image.fromarray(values), "PNG"), np.repeat(grey[:, :, None], 3, axis=-1)


def palette_transparent() -> tuple[bytes, np.ndarray]:
    """Mode P with a tRNS entry for colour 0 (black). A file gives what transformers gives, the palette colours
    (convert('RGB')), not white: see test_palette_transparency."""
    index = np.tile(np.arange(4, dtype=np.uint8), (6, 2))  # [6, 8]
    image = Image.fromarray(index, "P")
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    image.putpalette([v for rgb in palette for v in rgb])
    return encode(image, "PNG", transparency=0), np.array(palette, np.uint8)[index]


def animated_gif() -> tuple[bytes, np.ndarray]:
    first, second = np.zeros((6, 10, 3), np.uint8), np.full((6, 10, 3), 255, np.uint8)
    first[:, :5] = (255, 0, 0)
    data = encode(Image.fromarray(first), "GIF", save_all=True, append_images=[Image.fromarray(second)], duration=50)
    return data, first


def mpo() -> bytes:
    """A phone camera's multi-picture JPEG (Pillow's JPEG plugin opens it as MPO)."""
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    return encode(red, "MPO", save_all=True, append_images=[blue])


def hostile_images() -> list[Hostile]:
    upright = np.rot90(quadrants(), k=-1)  # orientation 6 displays the stored image turned 90 degrees clockwise
    one, strip = noise(1, 1, 1), noise(1, 5000, 2)
    grey16, grey16_rgb = sixteen_bit()
    palette, palette_rgb = palette_transparent()
    gif, gif_first = animated_gif()
    bmp = noise(7, 9, 3)
    return [
        Hostile("one_pixel.png", encode(Image.fromarray(one), "PNG"), expected=one),
        Hostile("strip_1x5000.png", encode(Image.fromarray(strip), "PNG"), expected=strip),
        Hostile("strip_5000x1.png", encode(Image.fromarray(strip.transpose(1, 0, 2)), "PNG"),
                expected=strip.transpose(1, 0, 2)),
        Hostile("gray16.png", grey16, expected=grey16_rgb),
        Hostile("cmyk.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
                expected=np.full((16, 16, 3), (255, 0, 0), np.uint8), atol=4),
        Hostile("palette_transparent.png", palette, expected=palette_rgb),
        Hostile("exif_rotated.jpg", exif_rotated("JPEG", quality=95, subsampling=0), expected=upright, atol=8),
        Hostile("exif_rotated.webp", exif_rotated("WEBP", lossless=True), expected=upright),
        Hostile("exif_rotated.tiff", exif_rotated("TIFF"), expected=upright),
        Hostile("animated.gif", gif, expected=gif_first),
        Hostile("phone_mpo.jpg", mpo(), expected=np.full((16, 16, 3), (255, 0, 0), np.uint8), atol=4),
        Hostile("plain.bmp", encode(Image.fromarray(bmp), "BMP"), expected=bmp),
        Hostile("bomb_30000x30000.png", header_only_png(30000, 30000), LIMIT),  # past Pillow's own error limit
        Hostile("bomb_7000x7000.png", header_only_png(7000, 7000), LIMIT),  # under Pillow's warning, over ours
        Hostile("bomb_65535x65535.gif", header_only_gif(65535, 65535), LIMIT),
        Hostile("truncated.jpg", truncated("JPEG"), TRUNCATED),
        Hostile("truncated.png", truncated("PNG"), TRUNCATED),
        Hostile("photoshop.png", psd(), NOT_ALLOWED),
        Hostile("icon.png", encode(Image.new("RGB", (16, 16)), "ICO"), NOT_ALLOWED),
        Hostile("postscript.jpg", EPS, NOT_ALLOWED),
        Hostile("document.png", encode(Image.new("RGB", (16, 16)), "PDF"), NOT_ALLOWED),
        Hostile("vector.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>',
                NOT_ALLOWED),
        Hostile("notes.jpg", b"this is not an image\n" * 4, NOT_ALLOWED),
        Hostile("empty.png", b"", NOT_ALLOWED),
    ]
