"""SmolVLM2 video input, token for token with transformers: frame sampling (fps, the max_frames cap, the
skip-one-second rule), the resize of every frame (torch's uint8 Lanczos, bit for bit), the prompt text, the number
words, the settings a checkpoint stores, and the same through processor(text=..., videos=...) and the chat template.
Videos are made here with PyAV at several frame rates, lengths and odd sizes (tests/video_reference.py)."""
import json
import sys

import numpy as np
import pytest

av = pytest.importorskip("av")

from smolvlm_fast import InputError  # noqa: E402
from smolvlm_fast.errors import CheckpointError  # noqa: E402
from smolvlm_fast.inputs.lanczos import resize_lanczos  # noqa: E402
from smolvlm_fast.inputs.processor import Processor  # noqa: E402
from smolvlm_fast.inputs.video import Video, load_video, sample_indices  # noqa: E402
from smolvlm_fast.inputs.video_config import VideoConfig, video_lut  # noqa: E402
from smolvlm_fast.inputs.video_tokens import number_words  # noqa: E402
from tests.video_reference import (  # noqa: E402
    copy_with_sampling,
    decode_like_transformers,
    hf_processor,
    hf_reference,
    make_videos,
    small_checkpoint,
    video_chat,
)

# (frames, fps, width, height): shorter and longer than the cap, the skip-one-second rule on and off, odd sizes,
# portrait and landscape, a single frame, NTSC's 30000/1001
VIDEOS = [(37, 10, 70, 50), (300, 24, 33, 61), (5, 30, 64, 64), (240, 12, 100, 40), (1, 25, 17, 9),
          (91, 30000 / 1001, 48, 130), (61, 7.5, 64, 36)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_videos(tmp_path_factory, VIDEOS)


@pytest.fixture(scope="module")
def pair(checkpoint):
    return Processor.from_pretrained(checkpoint), hf_processor(checkpoint)


@pytest.mark.parametrize("index", range(len(VIDEOS)))
def test_video_tokens_and_pixels_match_transformers(pair, videos, index):
    ours, ref = pair
    chat = video_chat(str(videos[index]))
    text = ours.apply_chat_template(chat, add_generation_prompt=True)
    assert text == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    frames, metadata = decode_like_transformers(videos[index])
    ref_ids, ref_pixels = hf_reference(ref, text, frames, metadata)
    ids, per_frame = ours.encode(text, [], [str(videos[index])])
    assert ids == ref_ids
    pixels = np.concatenate([p for p, _ in per_frame])  # [N, 3, m, m]
    np.testing.assert_array_equal(pixels, ref_pixels)  # bit for bit: the same integer resize, the same arithmetic
    assert all(m.shape == (1, *p.shape[2:]) and m.all() for p, m in per_frame)


def test_prompt_text_names_frames_and_times(pair, videos):
    ours, _ = pair
    ids, _ = ours.encode("User:<video>What?", [], [str(videos[3])])  # 240 frames at 12 fps: 20 s, six frames
    text = ours.decode(ids)
    assert "You are provided the following series of six frames from a 0:00:20 [H:MM:SS] video.\n" in text
    assert text.count("\nFrame from ") == 6 and "\nFrame from 00:01:<fake_token_around_image><global-img>" in text
    assert ids.count(ours.image_token_id) == 6 * ours.image_seq_len


@pytest.mark.parametrize("total, fps, cap, rate", [(37, 10, 6, 2), (300, 24, 6, 2), (5, 30, 6, 2), (240, 12, 6, 2),
                                                   (1, 25, 64, 1), (7200, 30, 64, 1), (100, 1, 64, 1), (2, 0.5, 8, 3),
                                                   (64 * 30 + 61, 30, 64, 1), (64 * 30 + 60, 30, 64, 1)])
def test_sample_indices_match_transformers(total, fps, cap, rate):
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata

    reference = SmolVLMVideoProcessor(video_sampling={"fps": rate, "max_frames": cap, "video_size": {"longest_edge": 96}})
    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
    cfg = VideoConfig(fps=rate, max_frames=cap)
    assert sample_indices(total, fps, total / fps, cfg).tolist() == reference.sample_frames(metadata).tolist()


def test_number_words_match_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in [*range(0, 1200), *range(1200, 999_999, 1733), 999_999]:
        assert number_words(n) == num2words(n)


@pytest.mark.parametrize("in_size, out_size", [((50, 70), (68, 96)), ((68, 96), (64, 64)), ((1, 1), (5, 7)),
                                               ((3, 200), (64, 64)), ((7, 9), (64, 64)), ((1080, 1920), (96, 170)),
                                               ((64, 64), (64, 64)), ((33, 17), (192, 130)), ((2, 2), (3, 1))])
def test_lanczos_matches_torch_bit_for_bit(in_size, out_size, rng):
    import torch
    from torch.nn.functional import interpolate

    image = rng.integers(0, 256, (*in_size, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    expected = interpolate(tensor, size=list(out_size), mode="lanczos", antialias=True, align_corners=False)
    np.testing.assert_array_equal(resize_lanczos(image, *out_size), expected[0].permute(1, 2, 0).numpy())


def test_lanczos_random_sizes_match_torch(rng):
    import torch
    from torch.nn.functional import interpolate

    for _ in range(12):
        h, w, oh, ow = (int(v) for v in rng.integers(2, 260, 4))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
        expected = interpolate(tensor, size=[oh, ow], mode="lanczos", antialias=True, align_corners=False)
        np.testing.assert_array_equal(resize_lanczos(image, oh, ow), expected[0].permute(1, 2, 0).numpy(),
                                      err_msg=f"{h}x{w} -> {oh}x{ow}")


def test_normalize_table_matches_torch():
    import torch

    for mean, std in [((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]:
        cfg = VideoConfig(image_mean=mean, image_std=std)
        x = torch.arange(256, dtype=torch.float32)
        m, s = torch.tensor(mean) * (1.0 / (1 / 255)), torch.tensor(std) * (1.0 / (1 / 255))
        np.testing.assert_array_equal(video_lut(cfg), ((x[None] - m[:, None]) / s[:, None]).numpy())


def test_frames_in_memory_match_transformers(pair, videos):
    """Frames passed as an array (or a list, or a Video with its fps) are sampled as a decoded file is."""
    ours, ref = pair
    frames, metadata = decode_like_transformers(videos[0])
    ref_ids, ref_pixels = hf_reference(ref, "User:<video>Hi", frames, metadata)  # 10 fps
    for video in (Video(frames, fps=10), Video(list(frames), fps=10.0)):
        ids, per_frame = ours.encode("User:<video>Hi", [], [video])
        assert ids == ref_ids
        np.testing.assert_array_equal(np.concatenate([p for p, _ in per_frame]), ref_pixels)
    metadata.fps, metadata.duration = 24.0, len(frames) / 24  # frames without a rate: transformers' 24 fps
    ref_ids, _ = hf_reference(ref, "User:<video>Hi", frames, metadata)
    assert ours.encode("User:<video>Hi", [], [frames])[0] == ref_ids


def test_call_with_videos_and_the_tokenized_chat(pair, videos):
    ours, ref = pair
    text = "User:<video>Describe<end_of_utterance>\nAssistant:"
    out = ours(text=[text, text], videos=[str(videos[0]), str(videos[4])], return_tensors="np", padding=True)
    assert out["pixel_values"].shape == (2, 6, 3, 64, 64) and out["pixel_attention_mask"][1, 1:].sum() == 0
    ids0, _ = ours.encode(text, [], [str(videos[0])])
    assert out["input_ids"][0].tolist()[-len(ids0):] == ids0
    chat = ours.apply_chat_template(video_chat(str(videos[1])), add_generation_prompt=True, tokenize=True,
                                    return_dict=True)
    frames, metadata = decode_like_transformers(videos[1])
    ref_text = ref.apply_chat_template(video_chat(str(videos[1])), add_generation_prompt=True, tokenize=False)
    ref_ids, ref_pixels = hf_reference(ref, ref_text, frames, metadata)
    assert list(chat["input_ids"][0]) == ref_ids
    np.testing.assert_array_equal(chat["pixel_values"][0], ref_pixels)


def test_images_and_videos_in_one_prompt_keep_marker_order(pair, videos, small_rgb):
    ours, _ = pair
    ids, per = ours.encode("User:<image>and<video>and<image>", [small_rgb, small_rgb], [str(videos[2])])
    image_alone, image_frames = ours.encode("<image>", [small_rgb])
    assert len(per) == 2 * len(image_frames) + 1  # the 5-frame clip at 30 fps gives one frame
    np.testing.assert_array_equal(per[0][0], image_frames[0][0])
    assert ids.count(ours.image_token_id) == sum(p.shape[0] for p, _ in per) * ours.image_seq_len


@pytest.mark.parametrize("size", [None, 130])
def test_size_beside_video_sampling_wins(checkpoint, videos, tmp_path, size):
    """A released preprocessor_config.json: video_sampling and the image `size`; transformers resizes to `size`."""
    path = copy_with_sampling(checkpoint, tmp_path / "m", fps=3, max_frames=4, size=size)
    ours, ref = Processor.from_pretrained(path), hf_processor(path)
    assert ours.video_config.longest_edge == (size or 96) == ref.video_processor.size["longest_edge"]
    frames, metadata = decode_like_transformers(videos[5])
    ref_ids, ref_pixels = hf_reference(ref, "<video>", frames, metadata)
    ids, per = ours.encode("<video>", [], [str(videos[5])])
    assert ids[-len(ref_ids):] == ref_ids
    np.testing.assert_array_equal(np.concatenate([p for p, _ in per]), ref_pixels)


def test_released_layout_preprocessor_config(checkpoint, tmp_path):
    """The video settings in preprocessor_config.json (no processor_config.json 'video_processor')."""
    import shutil

    path = shutil.copytree(checkpoint, tmp_path / "m")
    proc = json.loads((path / "processor_config.json").read_text())
    (path / "preprocessor_config.json").write_text(json.dumps(
        {**proc.pop("image_processor"), "video_sampling": {"fps": 1, "max_frames": 64,
                                                           "video_size": {"longest_edge": 512}}}))
    del proc["video_processor"]
    (path / "processor_config.json").write_text(json.dumps(proc))
    cfg = Processor.from_pretrained(path).video_config
    assert (cfg.fps, cfg.max_frames, cfg.longest_edge, cfg.frame_size) == (1.0, 64, 192, 64)  # size beside it wins


def test_checkpoint_without_video_settings_refuses_videos(tiny_idefics3, videos):
    processor = Processor.from_pretrained(tiny_idefics3)
    assert processor.video_config is None
    with pytest.raises(InputError, match="no video settings"):
        processor.encode("<video>", [], [str(videos[0])])


@pytest.mark.parametrize("edit, message", [({"video_sampling": {"fps": 0, "max_frames": 4}}, "fps"),
                                           ({"video_sampling": {"fps": 1, "max_frames": 2.5}}, "max_frames"),
                                           ({"video_sampling": {"fps": 1, "max_frames": 4}, "resample": 3}, "LANCZOS"),
                                           ({"fps": 1, "num_frames": 4, "size": {"height": 5}}, "longest_edge")])
def test_bad_video_settings_are_checkpoint_errors(edit, message):
    with pytest.raises(CheckpointError, match=message):
        VideoConfig.from_dict({"size": {"longest_edge": 96}, **edit} if "size" not in edit else edit, "test")


def test_marker_and_video_counts_must_agree(pair, videos):
    ours, _ = pair
    with pytest.raises(InputError, match="1 <video> markers but 2 videos"):
        ours.encode("<video>", [], [str(videos[0]), str(videos[0])])
    with pytest.raises(InputError, match="0 <video> markers but 1 videos"):
        ours.encode("no marker", [], [str(videos[0])])
    with pytest.raises(InputError, match="max_videos"):
        ours.encode("<video>" * 5, [], [str(videos[0])] * 5)


WHOLE_PROCESSOR_CHECK = """
import sys, types
sys.modules["torchvision._meta_registrations"] = types.ModuleType("meta")  # the PyPI wheel beside a CPU torch
import numpy as np
from smolvlm_fast.inputs.processor import Processor
from tests.video_reference import decode_like_transformers, hf_processor
ours, ref = Processor.from_pretrained(sys.argv[1]), hf_processor(__import__("pathlib").Path(sys.argv[1]))
for video in sys.argv[2:]:
    frames, metadata = decode_like_transformers(video)
    out = ref(text="User:<video>Hi", videos=[frames], video_metadata=[metadata], do_sample_frames=True,
              return_tensors="np")
    ids, per = ours.encode("User:<video>Hi", [], [video])
    assert ids == out["input_ids"][0].tolist(), video
    np.testing.assert_array_equal(np.concatenate([p for p, _ in per]), out["pixel_values"][0])
print("same")
"""


def test_whole_transformers_processor_where_torchvision_is_installed(checkpoint, videos):
    """Where torchvision is installed (not in CI: its wheel breaks transformers' image paths beside the CPU torch),
    the whole SmolVLMProcessor call, in a process of its own."""
    import importlib.util
    import subprocess
    from pathlib import Path

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", WHOLE_PROCESSOR_CHECK, str(checkpoint), *map(str, videos)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


def test_load_video_returns_sampled_frames_only(checkpoint, videos):
    cfg = Processor.from_pretrained(checkpoint).video_config
    sampled = load_video(str(videos[1]), cfg)  # 300 frames: six kept, each 64 x 64
    assert len(sampled.frames) == 6 and all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in sampled.frames)
    assert sampled.duration == 300 / 24 and sampled.timestamps[-1] == 299 / 24
