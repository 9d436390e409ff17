"""Prefix caching: a second question about the same image (or after the same system prompt) takes the cached blocks
instead of recomputing them and the vision encoder, and gives the tokens it gives without caching; different images
behind the same <image> ids never share blocks; eviction under pressure and aborts keep everything right."""
import numpy as np
import pytest
from PIL import Image

from smolvlm_fast import SamplingParams
from smolvlm_fast.serving.llm import LLM

SYSTEM = ("You are a careful assistant. Look at the picture, name every object in it, say where each one is, "
          "and answer in two short sentences.")
GREEDY = SamplingParams(max_new_tokens=8)


def picture(seed: int, size=(100, 70)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def chat(image, question: str, system: str = SYSTEM):
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def count_encoder_calls(llm: LLM) -> list:
    """Wrap the model's vision encoder entry point; the returned list gets one entry per call."""
    calls, encode = [], llm.model.image_features_per_row

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)
    llm.model.image_features_per_row = counted
    return calls


def without_caching(path, prompts, params=GREEDY, **options) -> list[list[int]]:
    llm = LLM(path, backend="numpy", enable_prefix_caching=False, ignore_eos=True, **options)
    return [llm.generate(p, params)[0].token_ids for p in prompts]


def image_positions(llm: LLM, prompt) -> list[int]:
    ids = llm.make_request(prompt).prompt_ids
    return [p for p, t in enumerate(ids) if t == llm.model.config.image_token_id]


def test_a_second_question_on_the_same_image_takes_the_cached_blocks(tiny_idefics3):
    image = picture(0)
    first, second = chat(image, "What is in the picture?"), chat(image, "How many dogs are there?")
    llm = LLM(tiny_idefics3, backend="numpy", ignore_eos=True)
    calls = count_encoder_calls(llm)
    a = llm.generate(first, GREEDY)[0]
    before = llm.stats
    b = llm.generate(second, GREEDY)[0]
    after = llm.stats
    assert a.num_cached_tokens == 0 and len(calls) == 1
    assert b.num_cached_tokens >= len(image_positions(llm, second)) and b.num_cached_tokens % 16 == 0
    assert after.prefill_tokens - before.prefill_tokens == b.num_prompt_tokens - b.num_cached_tokens
    assert len(calls) == 1 and after.images_encoded == 1  # the vision encoder did not run again
    assert [a.token_ids, b.token_ids] == without_caching(tiny_idefics3, [first, second])


@pytest.mark.parametrize("feature_cache_bytes", [0, 1 << 20])
def test_a_cached_prefix_ending_inside_an_image_slices_its_features(tiny_idefics3, feature_cache_bytes):
    image = picture(1)
    first, second = chat(image, "What is in the picture?"), chat(image, "Describe this image in detail.")
    llm = LLM(tiny_idefics3, backend="numpy", feature_cache_bytes=feature_cache_bytes, ignore_eos=True)
    calls = count_encoder_calls(llm)
    positions = image_positions(llm, second)
    llm.generate(first, GREEDY)
    b = llm.generate(second, GREEDY)[0]
    assert positions[0] < b.num_cached_tokens <= positions[-1]  # the hit ends inside the image's tokens
    assert len(calls) == (1 if feature_cache_bytes else 2)  # its tail needs the features: from the LRU, or again
    assert llm.stats.feature_cache_hits == (1 if feature_cache_bytes else 0)
    assert b.token_ids == without_caching(tiny_idefics3, [second])[0]


def test_an_image_wholly_in_cached_blocks_needs_no_features(tiny_idefics3):
    image = picture(2)
    shared = "Describe this image in detail. What is in the picture? There is a cat sitting on a red chair. "
    first, second = chat(image, shared + "Is it old?"), chat(image, shared + "Tell me a story.")
    llm = LLM(tiny_idefics3, backend="numpy", feature_cache_bytes=0, ignore_eos=True)  # no feature LRU at all
    calls = count_encoder_calls(llm)
    llm.generate(first, GREEDY)
    b = llm.generate(second, GREEDY)[0]
    assert b.num_cached_tokens > image_positions(llm, second)[-1] and len(calls) == 1
    assert b.token_ids == without_caching(tiny_idefics3, [second])[0]


def test_different_images_behind_the_same_ids_share_only_the_blocks_before_them(tiny_idefics3):
    cat, dog = chat(picture(3), "What is in the picture?"), chat(picture(4), "What is in the picture?")
    llm = LLM(tiny_idefics3, backend="numpy", ignore_eos=True)
    assert llm.make_request(cat).prompt_ids == llm.make_request(dog).prompt_ids
    first_image_token = image_positions(llm, dog)[0]
    llm.generate(cat, GREEDY)
    out = llm.generate(dog, GREEDY)[0]
    assert out.num_cached_tokens == first_image_token // 16 * 16  # the system prompt's blocks, nothing after
    assert llm.stats.images_encoded == 2
    assert out.token_ids == without_caching(tiny_idefics3, [dog])[0]


def test_a_follow_up_turn_takes_the_blocks_of_the_prompt_and_the_answer(tiny_llama):
    llm = LLM(tiny_llama, backend="numpy", ignore_eos=True)
    system = [{"role": "system", "content": SYSTEM * 2}]
    first = llm.generate(system + [{"role": "user", "content": "Tell me a story."}], GREEDY)[0]
    assert first.num_cached_tokens == 0
    follow_up = first.prompt_token_ids + first.token_ids + llm.tokenizer.encode("<|im_end|>\nAnd then?")
    out = llm.generate(follow_up, GREEDY)[0]
    computed = first.num_prompt_tokens + len(first.token_ids) - 1  # the last token was sampled, never run
    assert out.num_cached_tokens == computed // 16 * 16
    other = llm.generate(system + [{"role": "user", "content": "Who are you?"}], GREEDY)[0]
    assert other.num_cached_tokens >= 32  # the shared system prompt
    reference = without_caching(tiny_llama, [follow_up, system + [{"role": "user", "content": "Who are you?"}]])
    assert [out.token_ids, other.token_ids] == reference


def test_eviction_under_pressure_keeps_the_tokens_right(tiny_idefics3):
    images = [picture(10 + i, size=(50 + 20 * i, 90)) for i in range(3)]
    prompts = [chat(images[i % 3], q) for i, q in enumerate(
        ["What is in the picture?", "How many dogs are there?", "Describe this image in detail.",
         "Is it old?", "Tell me a story.", "What colour is the sky?"])]
    longest = max(len(LLM(tiny_idefics3, backend="numpy").make_request(p).prompt_ids) for p in prompts)
    llm = LLM(tiny_idefics3, backend="numpy", num_blocks=-(-(longest + 8) // 16) + 3, max_num_batched_tokens=64,
              ignore_eos=True)
    outputs = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    outputs += [o.token_ids for o in llm.generate(prompts[::-1], GREEDY)]
    stats = llm.stats
    assert stats.evictions > 0 and stats.cached_prompt_tokens > 0
    assert outputs == without_caching(tiny_idefics3, prompts + prompts[::-1])
    assert llm.engine.cache.allocator.num_free == llm.engine.cache.allocator.num_blocks


def test_abort_gives_the_blocks_back(tiny_idefics3):
    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=32, ignore_eos=True)
    engine, allocator = llm.engine, llm.engine.cache.allocator
    keep = engine.add_request(llm.make_request(chat(picture(5), "Is it old?"), GREEDY))
    drop = engine.add_request(llm.make_request(chat(picture(6), "Is it new?"), GREEDY))
    while drop.num_computed < 100:  # mid-prompt
        engine.step()
    table = engine.cache.block_tables[drop.seq_id]
    shared = [b for b in table if allocator.ref_counts[b] > 1]  # the system prompt's blocks, also keep's
    free = allocator.num_free
    engine.abort(drop)
    assert drop.finish_reason == "abort" and drop.seq_id not in engine.cache.block_tables
    assert shared and allocator.num_free == free + len(table) - len(shared)
    assert all(allocator.ref_counts[b] == 1 for b in shared) and drop not in engine.scheduler.running
    while engine.has_unfinished():
        engine.step()
    assert keep.output_ids == without_caching(tiny_idefics3, [chat(picture(5), "Is it old?")])[0]
    assert allocator.num_free == allocator.num_blocks
