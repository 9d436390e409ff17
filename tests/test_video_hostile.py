"""Hostile videos: corrupt, truncated and fuzzed files (header bytes flipped, in MP4, WebM and AVI), files with no
frames or no video stream, frame counts and frame sizes over the limits, playlists and containers PyAV could open
but we never do. Each either gives its sampled frames or an InputError naming the file; never another exception,
and memory stays bounded (only the sampled frames are converted and kept)."""
import base64

import numpy as np
import pytest

av = pytest.importorskip("av")

from smolvlm_fast import InputError  # noqa: E402
from smolvlm_fast.inputs import video as video_module  # noqa: E402
from smolvlm_fast.inputs.video import SampledVideo, Video, load_video  # noqa: E402
from smolvlm_fast.inputs.video_config import VideoConfig  # noqa: E402
from tests.video_reference import make_video  # noqa: E402

CFG = VideoConfig(fps=2, max_frames=4, longest_edge=48, frame_size=32)
FORMATS = [("clip.mp4", "mpeg4", None), ("clip.webm", "libvpx", "webm"), ("clip.avi", "mpeg4", "avi")]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {name: make_video(root / name, 24, 8, 40, 30, codec=codec, container=fmt, seed=5)
            for name, codec, fmt in FORMATS}


def outcome(source, cfg: VideoConfig = CFG, **kwargs):
    """The SampledVideo, or the InputError's message; any other exception fails the test."""
    try:
        return load_video(source, cfg, **kwargs)
    except InputError as e:
        return str(e)


@pytest.mark.parametrize("name", [n for n, _, _ in FORMATS])
def test_each_container_decodes(clips, name):
    sampled = load_video(str(clips[name]), CFG)
    assert isinstance(sampled, SampledVideo) and len(sampled.frames) == 4 and sampled.duration == 3.0
    assert all(f.shape == (32, 32, 3) for f in sampled.frames)


@pytest.mark.parametrize("name", [n for n, _, _ in FORMATS])
def test_truncated_files_decode_what_they_hold_or_refuse(clips, name, tmp_path):
    data = clips[name].read_bytes()
    for keep in (0, 8, 16, 100, len(data) // 4, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{keep}{clips[name].suffix}"
        path.write_bytes(data[:keep])
        result = outcome(str(path))
        assert isinstance(result, SampledVideo) or str(path) in result, result
        if isinstance(result, SampledVideo):
            assert 1 <= len(result.frames) <= 4 and len(result.timestamps) == len(result.frames)


@pytest.mark.parametrize("name", [n for n, _, _ in FORMATS])
def test_fuzzed_headers_never_raise_anything_but_input_errors(clips, name, tmp_path, rng):
    """Bytes flipped in the first kilobyte (the container's header: atoms, EBML elements, RIFF chunks)."""
    data = clips[name].read_bytes()
    for trial in range(25):
        mutated = bytearray(data)
        for at in rng.integers(0, min(1024, len(data)), int(rng.integers(1, 12))):
            mutated[at] = int(rng.integers(0, 256))
        path = tmp_path / f"fuzz{trial}{clips[name].suffix}"
        path.write_bytes(bytes(mutated))
        result = outcome(str(path))
        assert isinstance(result, SampledVideo) or "video file" in result, result
        if isinstance(result, SampledVideo):
            assert 1 <= len(result.frames) <= CFG.max_frames


def test_data_uris(clips):
    data = clips["clip.mp4"].read_bytes()
    assert len(load_video(f"data:video/mp4;base64,{base64.b64encode(data).decode()}", CFG).frames) == 4
    assert "expected data:video" in outcome("data:image/png;base64,AAAA")
    assert "not an MP4/MOV" in outcome("data:video/mp4;base64," + base64.b64encode(b"garbage" * 9).decode())


@pytest.mark.parametrize("content", [
    b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",  # HLS reads other files
    b"ffconcat version 1.0\nfile '/etc/passwd'\n",  # the concat demuxer too
    b"GIF89a" + b"\x00" * 64, b"\x47\x40\x00\x10" * 64,  # GIF, MPEG-TS: decodable by FFmpeg, not taken here
    b"", b"RIFF\x00\x00\x00\x00WAVE",  # empty; a RIFF that is not AVI
])
def test_other_containers_are_refused_unread(content, tmp_path):
    path = tmp_path / "video.mp4"
    path.write_bytes(content)
    assert "not an MP4/MOV, Matroska/WebM or AVI video" in outcome(str(path))


def test_a_file_without_a_video_stream(tmp_path):
    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    assert "has no video stream" in outcome(str(path))


def test_zero_frames(tmp_path):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
    result = outcome(str(path))
    assert isinstance(result, str) and str(path) in result
    assert "no frames" in outcome([]) and "no frames" in outcome(Video(np.zeros((0, 8, 8, 3), np.uint8)))


def test_frame_count_and_size_limits(clips, monkeypatch):
    assert "over the limit of 1,000 pixels" in outcome(str(clips["clip.mp4"]), max_pixels=1000)  # 40 x 30 = 1,200
    # frames already in memory are decoded: as arrays passed as images, they are not held to the pixel limit
    monkeypatch.setattr(video_module, "MAX_VIDEO_FRAMES", 20)
    for name in clips:  # 24 frames each, from the header (MP4, AVI) or the duration (WebM)
        assert "24 frames, over the limit of 20" in outcome(str(clips[name]))
    assert "over the limit of 20" in outcome(Video(np.zeros((21, 4, 4, 3), np.uint8)))


def test_only_the_sampled_frames_are_converted(clips, monkeypatch):
    """A long video keeps max_frames frames, converted from YUV one by one as they are met, never all of them."""
    converted = []
    real = av.VideoFrame.to_ndarray

    def counting(frame, *args, **kwargs):
        converted.append(frame.index if hasattr(frame, "index") else None)
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counting)
    sampled = load_video(str(clips["clip.mp4"]), VideoConfig(fps=1, max_frames=2, longest_edge=48, frame_size=32))
    assert len(converted) == len(sampled.frames) == 2


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "24", True])
def test_bad_frame_rates_are_refused(bad):
    assert "fps must be a number > 0" in outcome(Video(np.zeros((2, 4, 4, 3), np.uint8), fps=bad))


@pytest.mark.parametrize("bad", [42, {"frames": []}, np.zeros((4, 4, 3))])
def test_unsupported_video_values(bad):
    assert "unsupported video type" in outcome(bad)


def test_urls_and_missing_files(tmp_path):
    assert "URLs are not fetched" in outcome("https://example.com/a.mp4")
    assert "video file not found" in outcome(str(tmp_path / "none.mp4"))
    assert "video file not found" in outcome(str(tmp_path))  # a directory
