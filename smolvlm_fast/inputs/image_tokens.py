"""The text side of images: how many images go with each prompt, and the tokens each `<image>` marker expands to.

Each `<image>` in the text becomes, for a split image,
  for each row r, col c: <fake_token_around_image><row_r_col_c><image>*image_seq_len ... then "\\n" after each row,
  then "\\n<fake_token_around_image><global-img><image>*image_seq_len<fake_token_around_image>";
and for an unsplit image only the global part without the leading "\\n".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

MAX_GRID = 6  # <row_r_col_c> tokens exist for r, c in 1..6
MAX_IMAGES = 32  # images in one prompt: each is up to 6 x 6 + 1 frames through the vision encoder


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
