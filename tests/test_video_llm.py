"""Video through the Python API: greedy outputs equal transformers' SmolVLMForConditionalGeneration on a random
SmolVLM2-shaped checkpoint (LLM with video=, a chat with a video block, a prompt dict, and the transformers-shaped
processor + model.generate), every frame through the engine's feature cache and prefix cache (a second question
about the same video encodes nothing), and videos of different lengths batched together."""
import pytest

pytest.importorskip("av")
torch = pytest.importorskip("torch")

from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor, SamplingParams  # noqa: E402
from smolvlm_fast.inputs.video import Video  # noqa: E402
from smolvlm_fast.serving.llm import LLM  # noqa: E402
from tests.video_reference import (  # noqa: E402
    decode_like_transformers,
    hf_processor,
    hf_reference,
    make_videos,
    small_checkpoint,
    video_chat,
)

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return small_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    specs = [(37, 10, 70, 50), (300, 24, 33, 61), (5, 30, 64, 64), (15, 5, 40, 40), (16, 5, 40, 40)]
    return make_videos(tmp_path_factory, specs, first_seed=10)


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def reference_tokens(checkpoint, reference, video, question="What happens?") -> list[int]:
    """transformers' greedy continuation of the chat about `video` (its own sampling, prompt and model)."""
    processor = hf_processor(checkpoint)
    text = processor.apply_chat_template(video_chat(str(video), question), add_generation_prompt=True,
                                         tokenize=False)
    frames, metadata = decode_like_transformers(video)
    ids, pixels = hf_reference(processor, text, frames, metadata)
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 pixel_values=torch.from_numpy(pixels)[None],
                                 pixel_attention_mask=torch.ones(1, *pixels.shape[:1], *pixels.shape[2:],
                                                                 dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=["numpy", "torch"])
def llm(request, checkpoint):
    return LLM(checkpoint, backend=request.param, max_num_batched_tokens=128)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_greedy_tokens_equal_transformers(checkpoint, reference, videos, llm, index):
    expected = reference_tokens(checkpoint, reference, videos[index])
    assert len(set(expected)) > 1, "the random model is too flat for this test to mean anything"
    out = llm.generate("What happens?", SamplingParams(max_new_tokens=NEW_TOKENS), video=str(videos[index]))[0]
    assert out.error is None and out.token_ids == expected
    chat = llm.generate(video_chat(str(videos[index])), SamplingParams(max_new_tokens=NEW_TOKENS))[0]
    assert chat.token_ids == expected


def test_prompt_dict_and_frames_in_memory(checkpoint, reference, videos, llm):
    expected = reference_tokens(checkpoint, reference, videos[0])
    text = llm.processor.apply_chat_template(video_chat(str(videos[0])), add_generation_prompt=True)
    frames, _ = decode_like_transformers(videos[0])
    outputs = llm.generate([{"prompt": text, "videos": [str(videos[0])]}, {"prompt": text, "videos": [Video(frames, 10)]}],
                           SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outputs] == [expected, expected]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_transformers_shaped_processor_and_generate(checkpoint, reference, videos, backend):
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForVision2Seq.from_pretrained(checkpoint, device="cpu", dtype="float32", backend=backend)
    inputs = processor.apply_chat_template(video_chat(str(videos[1])), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == reference_tokens(checkpoint, reference, videos[1])


def test_second_question_about_a_video_encodes_nothing(checkpoint, videos):
    llm = LLM(checkpoint, backend="numpy", max_num_batched_tokens=128)
    first = llm.generate("What happens?", SamplingParams(max_new_tokens=4), video=str(videos[1]))[0]
    encoded = llm.stats.images_encoded
    assert encoded == 6  # six sampled frames, one vision encoder run each
    second = llm.generate("Who is there?", SamplingParams(max_new_tokens=4), video=str(videos[1]))[0]
    stats = llm.stats
    assert first.error is None and second.error is None
    assert stats.images_encoded == encoded  # every frame's features from the LRU, or its tokens' K/V cached
    assert second.num_cached_tokens > 6 * llm.processor.image_seq_len  # the frames' blocks from the prefix cache


def test_features_come_from_the_lru_when_the_prefix_is_not_cached(checkpoint, videos):
    llm = LLM(checkpoint, backend="numpy", max_num_batched_tokens=128, enable_prefix_caching=False)
    llm.generate("What happens?", SamplingParams(max_new_tokens=2), video=str(videos[0]))
    llm.generate("Who is there?", SamplingParams(max_new_tokens=2), video=str(videos[0]))
    assert (llm.stats.images_encoded, llm.stats.feature_cache_hits) == (6, 6)


def test_videos_of_different_lengths_batch_together(checkpoint, reference, videos, llm):
    """A 15- and a 16-frame clip (transformers#46655 crashed on such a batch), a 1-frame one and a 6-frame one, in one
    generate call: each equals its answer alone."""
    chosen = [videos[3], videos[4], videos[2], videos[0]]
    alone = [llm.generate("What happens?", SamplingParams(max_new_tokens=NEW_TOKENS), video=str(v))[0].token_ids
             for v in chosen]
    llm.reset_prefix_cache()
    together = llm.generate([video_chat(str(v)) for v in chosen], SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [o.token_ids for o in together] == alone
    assert together[1].num_prompt_tokens != together[2].num_prompt_tokens
    assert alone[3] == reference_tokens(checkpoint, reference, videos[0])


def test_a_bad_video_fails_alone(checkpoint, videos, tmp_path, llm):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(videos[0].read_bytes()[:600])
    outputs = llm.generate([video_chat(str(broken)), video_chat(str(videos[2])), video_chat(str(tmp_path / "none.mp4"))],
                           SamplingParams(max_new_tokens=3))
    assert outputs[0].error and "broken.mp4" in outputs[0].error
    assert outputs[1].error is None and len(outputs[1].token_ids) > 0
    assert "not found" in outputs[2].error
