"""The image processor's settings (preprocessor_config.json, or processor_config.json's "image_processor") and
the uint8 -> float32 table that rescales and normalizes pixels as transformers does."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import CheckpointError


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
