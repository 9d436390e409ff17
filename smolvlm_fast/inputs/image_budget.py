"""How many image tokens an image may cost: OpenAI's `detail` and two knobs of our own, checked at the border.

transformers' SmolVLM processor upscales an image so its longest edge is `size.longest_edge` (2,048 on SmolVLM-256M
and -500M, 1,536 on 2.2B) and cuts it into tiles of the encoder's size plus one global view: a 386 x 386 photo
becomes 4 x 4 tiles + 1, 1,088 image tokens on SmolVLM-256M. That is the default here too ("auto": exactly what
transformers does), and the ways to pay less change the model's input, so they are always the caller's choice:

  detail "low"       one global view of the image, never split (64 tokens on 256M / 500M)
  detail "high"      split as transformers splits, even where the checkpoint's own setting is not to
  max_image_tiles N  at most N tiles besides the global view: the longest edge is lowered a tile at a time until the
                     grid fits (0 or 1: the global view only)
  upscale False      no upscaling past the image's own size before it is cut (a small image gives few tiles)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

DETAILS = ("auto", "low", "high")
OPTION_KEYS = ("detail", "max_image_tiles", "upscale")  # in an image's content block, or a prompt dict


@dataclass(frozen=True)
class ImageBudget:
    detail: str = "auto"
    max_image_tiles: int | None = None  # None: no cap
    upscale: bool | None = None         # None: the processor's setting (upscale_small_images, True by default)

    def __post_init__(self):
        if self.detail not in DETAILS:
            raise InputError(f"detail must be one of {', '.join(map(repr, DETAILS))}, got {self.detail!r}")
        tiles = self.max_image_tiles
        if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 0):
            raise InputError(f"max_image_tiles must be an int >= 0 (or None: no cap), got {tiles!r}")
        if self.upscale is not None and not isinstance(self.upscale, bool):
            raise InputError(f"upscale must be true or false, got {self.upscale!r}")

    @classmethod
    def of(cls, value) -> "ImageBudget":
        """None (the default budget), an ImageBudget, a detail string, or a dict of its fields (detail,
        max_image_tiles, upscale) -> an ImageBudget."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(detail=value)
        if isinstance(value, dict):
            unknown = set(value) - set(OPTION_KEYS)
            if unknown:
                raise InputError(f"unknown image option(s) {sorted(unknown)}: use detail, max_image_tiles, upscale")
            return cls(**{k: v for k, v in value.items() if v is not None})
        raise InputError(f"image options must be a detail string or a dict, got {type(value).__name__}")

    def over(self, default: "ImageBudget") -> "ImageBudget":
        """This budget with the fields it leaves at their defaults taken from `default` (a request over the
        engine's own settings)."""
        return ImageBudget(detail=default.detail if self.detail == "auto" else self.detail,
                           max_image_tiles=default.max_image_tiles if self.max_image_tiles is None
                           else self.max_image_tiles,
                           upscale=default.upscale if self.upscale is None else self.upscale)

    def processor_options(self) -> dict:
        """As keywords of a Processor call (do_image_splitting None: the checkpoint's own)."""
        return {"do_image_splitting": {"auto": None, "low": False, "high": True}[self.detail],
                "upscale_small_images": self.upscale, "max_image_tiles": self.max_image_tiles}

    def llm_options(self) -> dict:
        """As keywords of LLM (serving/llm.py)."""
        return {"image_detail": self.detail, "max_image_tiles": self.max_image_tiles, "upscale_images": self.upscale}

    @classmethod
    def of_flags(cls, args) -> "ImageBudget":
        """From the commands' --detail, --max-image-tiles and --no-upscale (cli.add_image_flags)."""
        return cls(args.detail, args.max_image_tiles, False if args.no_upscale else None)

    def splitting(self, checkpoint_splits: bool) -> bool:
        """Whether the image is cut into tiles: the checkpoint's setting for "auto"."""
        return {"auto": checkpoint_splits, "low": False, "high": True}[self.detail]
