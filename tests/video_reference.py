"""Videos the tests make themselves (PyAV), a SmolVLM2-shaped random checkpoint that takes video, and transformers'
reference for its processing.

transformers' SmolVLMVideoProcessor resizes with torchvision, which is not installed beside the CPU torch here (its
wheel breaks transformers' image paths). So the reference is transformers' own code where it runs without it
(SmolVLMVideoProcessor.sample_frames, get_resize_output_image_size, SmolVLMProcessor.replace_video_token and
get_text_with_replacements, the tokenizer), and, for the resize, what torchvision's `resize` runs on the CPU:
torch's `interpolate(mode="lanczos", antialias=True)` on uint8. Where torchvision does import, test_video_processor
also runs the whole transformers processor. Frames are decoded the way transformers' PyAV reader decodes them.
"""
from __future__ import annotations

import fractions
import json
import shutil
from pathlib import Path

import numpy as np

from tests.fixtures import IMAGE_SIZE, build_tiny_vlm, load_hf_processor

VIDEO_SIZE = 96  # the video processor's size.longest_edge in the test checkpoint (frames are then IMAGE_SIZE^2)


def make_video(path, n_frames: int, fps: float, width: int, height: int, *, seed: int = 0, codec: str = "mpeg4",
               container: str | None = None) -> Path:
    """An n_frames video of seeded random blocks (each frame a different picture) at fps, width x height."""
    import av

    rng = np.random.default_rng(seed)
    path = Path(path)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(n_frames):
            blocks = rng.integers(0, 256, ((height + 7) // 8, (width + 7) // 8, 3), dtype=np.uint8)
            picture = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:height, :width]  # codecs keep blocks, not noise
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode_like_transformers(path):
    """(every frame [T, H, W, 3] uint8, transformers VideoMetadata) as read_video_pyav reads them."""
    import av
    from transformers.video_utils import VideoMetadata

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total, fps = stream.frames, float(stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        metadata = VideoMetadata(total_num_frames=int(total), fps=fps, duration=total / fps if fps else 0.0,
                                 width=stream.width, height=stream.height, video_backend="pyav")
    return frames, metadata


def video_checkpoint(out_dir, fps: float = 2, max_frames: int = 6, size: int | None = None) -> Path:
    """A tiny random SmolVLM2 checkpoint whose video processor samples fps frames a second, at most max_frames,
    longest edge VIDEO_SIZE (or `size` beside video_sampling, which wins, as in transformers)."""
    out_dir = Path(out_dir)
    build_tiny_vlm(out_dir, "smolvlm")
    set_video_sampling(out_dir, fps, max_frames, size)
    return out_dir


def small_checkpoint(tmp_path_factory) -> Path:
    """The tests' SmolVLM2-shaped checkpoint: 2 frames a second, at most 6 frames."""
    return video_checkpoint(tmp_path_factory.mktemp("smolvlm2") / "model", fps=2, max_frames=6)


def make_videos(tmp_path_factory, specs, first_seed: int = 0) -> list[Path]:
    """One file per (frames, fps, width, height) spec, each from its own seed."""
    root = tmp_path_factory.mktemp("videos")
    return [make_video(root / f"v{i}.mp4", *spec, seed=first_seed + i) for i, spec in enumerate(specs)]


def set_video_sampling(path: Path, fps: float, max_frames: int, size: int | None = None) -> None:
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text())
    video = config["video_processor"]
    video["video_sampling"] = {"fps": fps, "max_frames": max_frames, "video_size": {"longest_edge": VIDEO_SIZE}}
    video["fps"], video["num_frames"] = fps, max_frames
    video["size"] = {"longest_edge": size or VIDEO_SIZE}
    config_file.write_text(json.dumps(config, indent=2))


def copy_with_sampling(src: Path, dst: Path, fps: float, max_frames: int, size: int | None = None) -> Path:
    shutil.copytree(src, dst)
    set_video_sampling(dst, fps, max_frames, size)
    return dst


def hf_processor(path: Path):
    """transformers' SmolVLMProcessor for the checkpoint, its video processor built from the saved settings."""
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    processor = load_hf_processor(path, "smolvlm")
    saved = json.loads((path / "processor_config.json").read_text())["video_processor"]
    processor.video_processor = SmolVLMVideoProcessor(
        **{k: v for k, v in saved.items() if k not in ("video_processor_type", "fps", "num_frames")})
    return processor


def hf_reference(processor, text: str, frames: np.ndarray, metadata):
    """(input ids, pixel_values [N, 3, m, m] float32) for one prompt with one `<video>` marker, by transformers'
    sampling and prompt code and torch's uint8 Lanczos (what torchvision runs on the CPU)."""
    vp = processor.video_processor
    indices = vp.sample_frames(metadata)  # num_frames, fps: the checkpoint's video_sampling
    metadata.frames_indices = indices
    replacement = processor.replace_video_token(
        {"pixel_values": np.zeros((1, len(indices))), "video_metadata": [metadata]}, 0)
    expanded, _ = processor.get_text_with_replacements([text], [], [replacement])
    ids = processor.tokenizer(expanded[0], add_special_tokens=False)["input_ids"]
    return ids, torch_pixels(frames[indices], vp.size["longest_edge"], vp.max_image_size["longest_edge"])


def torch_pixels(frames: np.ndarray, longest_edge: int, frame_size: int) -> np.ndarray:
    """SmolVLMVideoProcessor.resize + rescale_and_normalize on uint8 frames [N, H, W, 3], torchvision's CPU path."""
    import torch
    from torch.nn.functional import interpolate
    from transformers.models.smolvlm.video_processing_smolvlm import get_resize_output_image_size

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8
    for size in (get_resize_output_image_size(video, longest_edge), (frame_size, frame_size)):
        if tuple(video.shape[-2:]) != tuple(size):
            video = interpolate(video, size=list(size), mode="lanczos", antialias=True, align_corners=False)
    mean = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))  # transformers' fused rescale and normalize
    std = torch.tensor([0.5, 0.5, 0.5]) * (1.0 / (1 / 255))
    return ((video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)).numpy()


def video_chat(video, question: str = "What happens?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": question}]}]


FRAME_SIZE = IMAGE_SIZE
