"""A video -> its sampled frames, as transformers' SmolVLMVideoProcessor samples and resizes them.

Sources: a file path or a `data:video/...;base64,` URI (decoded with PyAV, the `video` extra), or frames already in
memory (a list of images or a [T, H, W, C] array; `Video(frames, fps)` gives their frame rate, else DEFAULT_FPS).

1. metadata as transformers' PyAV reader takes it: total = the stream's frame count, fps = its average rate,
   duration = total / fps (a container that stores no frame count gets one from its duration: see _frame_count);
2. the frame indices of SmolVLMVideoProcessor.sample_frames (sample_indices);
3. each sampled frame resized so its longest edge is `longest_edge` (the other edge by the aspect ratio, rounded up
   to even), then to frame_size x frame_size, both with torch's uint8 Lanczos (inputs/lanczos.py); never tiled.

Hostile files: only MP4/MOV, Matroska/WebM and AVI containers are opened, chosen from the file's first bytes so
FFmpeg never probes (no playlist or concat demuxer ever reads another file or URL); the frame size from the header
must be at most max_pixels; frames are decoded one by one up to the last sampled one and only the sampled ones are
kept (memory: max_frames frames of frame_size^2), at most MAX_VIDEO_FRAMES of them; every decoder failure is an
InputError.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .files import local_file
from .images import MAX_IMAGE_PIXELS, check_pixels, load_image
from .lanczos import resize_lanczos
from .tiling import aspect_size
from .video_config import VIDEO_MAX_SIDE, VideoConfig

DEFAULT_FPS = 24.0  # transformers' frame rate for frames passed without one
MAX_VIDEO_FRAMES = 200_000  # frames in one video (an hour at 55 fps): a header saying more is refused
SKIP_SECONDS = 1  # sample_frames' skip_secs: a long video loses its first and last second


@dataclass
class Video:
    """Frames in memory with their frame rate: a list of images (PIL, arrays) or a [T, H, W, C] array."""
    frames: object
    fps: float = DEFAULT_FPS


@dataclass
class SampledVideo:
    frames: list[np.ndarray]  # [frame_size, frame_size, 3] uint8, in order
    timestamps: list[float]   # seconds, one per frame
    duration: float           # seconds: total frames / fps


def sample_indices(total: int, video_fps: float, duration: float, cfg: VideoConfig) -> np.ndarray:
    """SmolVLMVideoProcessor.sample_frames: round(fps * duration) frames, at most max_frames and at least one,
    spread evenly (np.linspace, truncated, unique) over the video, less SKIP_SECONDS at each end when what is left
    is longer than max_frames * fps."""
    desired = max(min(int(round(cfg.fps * duration)), cfg.max_frames), 1)
    start, end = 0, total - 1
    if SKIP_SECONDS > 0 and duration - 2 * SKIP_SECONDS > cfg.max_frames * cfg.fps:
        start, end = int(SKIP_SECONDS * video_fps), int(total - SKIP_SECONDS * video_fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def load_video(video, cfg: VideoConfig, *, max_pixels: int | None = None) -> SampledVideo:
    """A path, a data URI, a Video, or frames (a list or a [T, H, W, C] array) -> its sampled, resized frames (a
    SampledVideo, from this function with the same cfg, passes through)."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(video, SampledVideo):  # decoded already (the captioner decodes once for several questions)
        return video
    if isinstance(video, (str, Path)):
        return _decode(_open_source(video), cfg, max_pixels)
    if isinstance(video, Video):
        return _from_frames(video.frames, video.fps, cfg, max_pixels)
    if isinstance(video, (list, tuple)) or getattr(video, "ndim", 0) == 4:
        return _from_frames(video, DEFAULT_FPS, cfg, max_pixels)
    raise InputError(f"unsupported video type {type(video).__name__}: pass a file path, a data:video URI, a list of "
                     "frames or a [frames, height, width, channels] array")


def resize_frame(frame: np.ndarray, cfg: VideoConfig) -> np.ndarray:
    """[H, W, 3] uint8 -> [frame_size, frame_size, 3] uint8: the longest edge to longest_edge, then square."""
    frame = resize_lanczos(frame, *aspect_size(*frame.shape[:2], min(VIDEO_MAX_SIDE, cfg.longest_edge)))
    return resize_lanczos(frame, cfg.frame_size, cfg.frame_size)


# --- frames in memory --------------------------------------------------------------------------------------------


def _from_frames(frames, fps, cfg: VideoConfig, max_pixels: int) -> SampledVideo:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
        raise InputError(f"a video's fps must be a number > 0, got {fps!r}")
    total = len(frames)
    if total == 0:
        raise InputError("the video has no frames")
    if total > MAX_VIDEO_FRAMES:
        raise InputError(f"the video has {total:,} frames, over the limit of {MAX_VIDEO_FRAMES:,}")
    indices = sample_indices(total, float(fps), total / fps, cfg)
    kept = [resize_frame(load_image(frames[int(i)], max_pixels=max_pixels), cfg) for i in indices]
    return SampledVideo(kept, [int(i) / fps for i in indices], total / fps)


# --- files -------------------------------------------------------------------------------------------------------

# The containers opened, by their first bytes -> FFmpeg's demuxer. Anything else is refused unread.
CONTAINERS = {"mp4": "mov", "matroska": "matroska", "avi": "avi"}


def _open_source(source):
    """(file object or path, demuxer, where) of a path or a data URI, its container named by its first bytes."""
    text = str(source)
    if isinstance(source, str) and text.startswith("data:"):
        where = f"video data URI ({text[:40]}...)"
        if not text.startswith("data:video/") or "," not in text:
            raise InputError(f"cannot decode {where}: expected data:video/<type>;base64,<data>")
        try:
            data = base64.b64decode(text.split(",", 1)[1], validate=False)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"cannot decode {where}: {e}") from None
        return io.BytesIO(data), container_of(data[:16], where), where
    path, where = local_file(source, "video")
    with open(path, "rb") as f:
        head = f.read(16)
    return str(path), container_of(head, where), where


def container_of(head: bytes, where: str) -> str:
    """The demuxer of a video's first 16 bytes (MP4/MOV, Matroska/WebM, AVI); anything else an InputError."""
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return CONTAINERS["mp4"]
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return CONTAINERS["matroska"]
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return CONTAINERS["avi"]
    raise InputError(f"cannot read {where}: not an MP4/MOV, Matroska/WebM or AVI video")


def _decode(opened, cfg: VideoConfig, max_pixels: int) -> SampledVideo:
    av = _import_av()
    source, demuxer, where = opened
    try:
        with av.open(source, format=demuxer) as container:  # forced: FFmpeg probes nothing
            return _decode_container(container, cfg, max_pixels, where)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  FFmpeg raises its errors, OSError, ValueError ... on hostile bytes
        raise InputError(f"cannot decode {where}: {type(e).__name__}: {e}") from None


def _import_av():
    try:
        import av
    except ImportError:
        raise InputError("video files need PyAV: pip install 'smolvlm_fast[video]'") from None
    return av


def _decode_container(container, cfg: VideoConfig, max_pixels: int, where: str) -> SampledVideo:
    if not container.streams.video:
        raise InputError(f"{where} has no video stream")
    stream = container.streams.video[0]
    check_pixels((stream.width, stream.height), where, max_pixels)
    fps = float(stream.average_rate or 0)
    if not np.isfinite(fps) or fps <= 0:
        raise InputError(f"{where}: the video stream has no frame rate")
    total = _frame_count(container, stream, fps, where)
    indices = sample_indices(total, fps, total / fps, cfg)
    wanted, last = {int(i) for i in indices}, int(indices[-1])
    kept, found = [], []
    for i, frame in enumerate(container.decode(stream)):
        if i > last:
            break
        if i in wanted:
            check_pixels((frame.width, frame.height), f"{where} frame {i}", max_pixels)
            kept.append(resize_frame(frame.to_ndarray(format="rgb24"), cfg))
            found.append(i)
    if not kept:
        raise InputError(f"{where}: no frame could be decoded")
    return SampledVideo(kept, [i / fps for i in found], total / fps)  # a file shorter than its header: what it has


def _frame_count(container, stream, fps: float, where: str) -> int:
    """The stream's frame count; where the container stores none (Matroska, WebM), its duration x fps."""
    total = int(stream.frames or 0)
    if total <= 0:
        seconds = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                   else (container.duration or 0) / 1_000_000)
        total = int(round(seconds * fps)) if np.isfinite(seconds) and seconds > 0 else 0
    if total <= 0:
        raise InputError(f"{where}: the video has no frames (or says nothing of its length)")
    if total > MAX_VIDEO_FRAMES:
        raise InputError(f"{where} has {total:,} frames, over the limit of {MAX_VIDEO_FRAMES:,}")
    return total
