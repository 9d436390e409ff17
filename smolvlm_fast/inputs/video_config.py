"""The video processor's settings, read as transformers' SmolVLMVideoProcessor reads them.

Where they live: processor_config.json's "video_processor" (transformers 5 saves), else video_preprocessor_config.json,
else preprocessor_config.json (the released SmolVLM2 checkpoints: one file for the image and the video processor).
A released file has `video_sampling` {"fps", "max_frames", "video_size"}; SmolVLMVideoProcessor takes fps and
max_frames (as num_frames) from it, and its video_size, except that a `size` beside it wins (transformers:
`kwargs["video_sampling"]["video_size"] = kwargs["size"]`). A transformers 5 save has fps, num_frames and size at
the top level. A checkpoint with neither fps nor num_frames (SmolVLM v1, Idefics3) takes no video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from .files import read_json
from .image_config import _three

LANCZOS = 1  # PIL's number for it; the one filter the video path implements (inputs/lanczos.py)
VIDEO_MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE for videos: the first resize's longest edge at most this


@dataclass(frozen=True)
class VideoConfig:
    fps: float = 1.0              # frames sampled per second of video
    max_frames: int = 64          # at most this many (num_frames)
    longest_edge: int = 4 * 364   # the first resize: the longest edge to this
    frame_size: int = 364         # then every frame to frame_size x frame_size (max_image_size), never tiled
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "lut", video_lut(self))

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "VideoConfig | None":
        """The settings, or None when the dict names no sampling (a processor without video)."""
        sampling = d.get("video_sampling")
        if isinstance(sampling, dict):
            fps, frames, size = sampling.get("fps"), sampling.get("max_frames"), d.get("size", sampling.get("video_size"))
        else:
            fps, frames, size = d.get("fps"), d.get("num_frames"), d.get("size", {"longest_edge": 4 * 364})
        if fps is None and frames is None:
            return None
        return cls(fps=_positive(fps, "fps", where, float), max_frames=_positive(frames, "max_frames", where, int),
                   longest_edge=_longest_edge(size, "size (video_size)", where),
                   frame_size=_longest_edge(d.get("max_image_size", {"longest_edge": 364}), "max_image_size", where),
                   do_resize=bool(d.get("do_resize", True)), do_rescale=bool(d.get("do_rescale", True)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)), do_normalize=bool(d.get("do_normalize", True)),
                   image_mean=_three(d.get("image_mean", 0.5), "image_mean", where),
                   image_std=_three(d.get("image_std", 0.5), "image_std", where))._checked(d, where)

    def _checked(self, d: dict, where: str) -> "VideoConfig":
        if d.get("resample", LANCZOS) != LANCZOS:
            raise CheckpointError(f"{where}: video resample {d['resample']!r} is not supported (only LANCZOS, 1)")
        if not self.do_resize:
            raise CheckpointError(f"{where}: do_resize false is not supported for video (frames must be "
                                  f"{self.frame_size}x{self.frame_size})")
        return self


def _positive(value, name: str, where: str, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{where}: video {name} must be a number > 0, got {value!r}")
    if kind is int and value != int(value):
        raise CheckpointError(f"{where}: video {name} must be a whole number, got {value!r}")
    return kind(value)


def _longest_edge(size, name: str, where: str) -> int:
    if not isinstance(size, dict) or type(size.get("longest_edge")) is not int or size["longest_edge"] <= 0:
        raise CheckpointError(f"{where}: video {name} must be {{'longest_edge': positive int}}, got {size!r}")
    return size["longest_edge"]


def video_lut(cfg: VideoConfig) -> np.ndarray:
    """[3, 256] float32: each uint8 level rescaled and normalized with the video processor's fused arithmetic
    (float32 (x - mean / rescale) / (std / rescale)), so values match bit for bit."""
    x = np.arange(256, dtype=np.float32)
    if not cfg.do_normalize:
        return np.stack([x * np.float32(cfg.rescale_factor) if cfg.do_rescale else x] * 3)
    scale = 1.0 / cfg.rescale_factor if cfg.do_rescale else 1.0
    mean = np.array(cfg.image_mean, np.float32) * np.float32(scale)  # as torch: a float32 tensor times a float
    std = np.array(cfg.image_std, np.float32) * np.float32(scale)
    return ((x[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)


def video_processor_dict(path: Path, proc: dict) -> tuple[dict, str]:
    """(the video processor's settings, the file they came from); ({}, "") when the checkpoint has none."""
    if isinstance(proc.get("video_processor"), dict):
        return proc["video_processor"], str(path / "processor_config.json")
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            return read_json(path / name), str(path / name)
    return {}, ""


def require_video(config: VideoConfig | None) -> VideoConfig:
    if config is None:
        raise InputError("this checkpoint's processor has no video settings (video_sampling: fps, max_frames): it "
                         "takes images, not videos (SmolVLM2 checkpoints take videos)")
    return config
