"""Continuous batching: the scheduler's policy on its own (token budget, decodes first, chunked prompts, preemption of
the newest), then the engine over the tiny checkpoints: 16 requests joining at different steps, with images of
different sizes, give the greedy tokens each gives alone, in a roomy cache and in one so small that it preempts."""
import numpy as np
import pytest
from PIL import Image

from smolvlm_fast import InputError, SamplingParams
from smolvlm_fast.engine.cache import PagedCache
from smolvlm_fast.engine.sequence import ImageInput, ImageSpan, Request, Sequence
from smolvlm_fast.serving.llm import LLM
from smolvlm_fast.engine.scheduler import Scheduler, SchedulerConfig

# ---------------------------------------------------------------- the policy, without a model


def sequence(seq_id: int, prompt: list[int], **fields) -> Sequence:
    return Sequence(Request(prompt), seq_id=seq_id, token_ids=list(prompt), **fields)


def run(scheduler: Scheduler, token: int = 5):
    """One step as the engine books it: the scheduled tokens are computed; a sequence at its end samples `token`."""
    batch = scheduler.schedule()
    for seq, n in zip(batch.seqs, batch.num_tokens):
        seq.num_computed += n
        if seq.num_computed == seq.num_tokens:
            seq.append_token(token)
    return [(seq.seq_id, n) for seq, n in zip(batch.seqs, batch.num_tokens)]


def test_decodes_go_first_then_prompt_chunks_within_the_budget():
    scheduler = Scheduler(PagedCache(64, 4), SchedulerConfig(max_num_batched_tokens=8))
    long, short = sequence(0, list(range(1, 21))), sequence(1, [1, 2, 3])
    scheduler.add(long)
    scheduler.add(short)
    assert run(scheduler) == [(0, 8)]  # the long prompt's first chunk takes the whole budget
    assert run(scheduler) == [(0, 8)]
    assert run(scheduler) == [(0, 4), (1, 3)]  # its last chunk, and the short one joins with the rest
    long_prompt_again = sequence(2, list(range(1, 11)))
    scheduler.add(long_prompt_again)
    assert run(scheduler) == [(0, 1), (1, 1), (2, 6)]  # decodes first, the new prompt chunked behind them
    assert run(scheduler) == [(0, 1), (1, 1), (2, 4)]
    assert long.output_ids == [5, 5, 5] and long_prompt_again.output_ids == [5]


def test_max_num_seqs_bounds_the_running_batch():
    scheduler = Scheduler(PagedCache(64, 4), SchedulerConfig(max_num_seqs=2))
    for i in range(3):
        scheduler.add(sequence(i, [1, 2]))
    assert [s for s, _ in run(scheduler)] == [0, 1]
    scheduler.remove(scheduler.running[0])  # a request leaves: the waiting one joins at the next step
    assert [s for s, _ in run(scheduler)] == [1, 2]


def test_the_newest_is_preempted_and_queued_first_to_recompute():
    cache = PagedCache(num_blocks=4, block_size=4)
    scheduler = Scheduler(cache)
    old, new = sequence(0, [1] * 6), sequence(1, [2] * 6)
    scheduler.add(old)
    scheduler.add(new)
    assert run(scheduler) == [(0, 6), (1, 6)]  # 2 blocks each: the cache is full
    assert run(scheduler) == [(0, 1), (1, 1)]
    assert run(scheduler) == [(0, 1), (1, 1)]  # 8 tokens each, still in 2 blocks
    assert run(scheduler) == [(0, 1)]  # the old one needs a third block: the new one gives its blocks up
    assert scheduler.num_preemptions == 1 and scheduler.waiting[0] is new
    assert new.num_computed == 0 and new.output_ids == [5, 5, 5] and new.seq_id not in cache.block_tables
    scheduler.remove(old)
    cache.free(old.seq_id)
    assert run(scheduler) == [(1, 9)]  # prompt + output so far, computed again in one chunk
    assert new.output_ids == [5, 5, 5, 5]


def test_a_running_prompt_chunk_shrinks_to_the_free_blocks():
    cache = PagedCache(num_blocks=3, block_size=4)
    scheduler = Scheduler(cache, SchedulerConfig(max_num_batched_tokens=6))
    seq = sequence(0, list(range(1, 12)))
    scheduler.add(seq)
    cache.append(99, 4)  # someone else holds a block
    assert run(scheduler) == [(0, 6)]
    assert run(scheduler) == [(0, 2)]  # what is left of its second block, not the budget's 5
    assert run(scheduler) == [] and scheduler.num_preemptions == 1  # no block left, nobody newer: itself


def test_a_step_never_mixes_image_features_with_generated_image_ids():
    image_id = 9
    features = ImageInput(features=np.zeros((2, 4), np.float32))
    with_image = sequence(0, [1, image_id, image_id, 2], images=[ImageSpan(features, b"img", 0, 2)],
                          image_positions=[1, 2], image_token_id=image_id)
    generated = sequence(1, [3, 4], image_token_id=image_id)
    scheduler = Scheduler(PagedCache(16, 4))
    scheduler.add(generated)
    run(scheduler, token=image_id)  # it generates an <image> id, embedded as a token at its next step
    scheduler.add(with_image)
    assert run(scheduler) == [(1, 1), (0, 1)]  # the prompt stops short of its image tokens
    assert run(scheduler, token=7) == [(1, 1), (0, 3)]  # no generated <image> id this time: the image goes


# ---------------------------------------------------------------- the engine, numpy backend


def images() -> list[Image.Image]:
    """Four images of different sizes: 10, 7, 4 and 10 frames (16 <image> tokens each) after the processor."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            ((64, 64), (120, 60), (40, 150), (30, 40))]


def mixed_requests(n: int = 16):
    """Chats with 0, 1 or 2 images and texts of different lengths, with different max_new_tokens."""
    pics = images()
    words = "Describe this image in detail. What is in the picture? Tell me a story about the old house."
    prompts, params = [], []
    for i in range(n):
        content = [{"type": "image", "image": pics[(i + k) % 4]} for k in range(i % 3)]
        content.append({"type": "text", "text": " ".join(words.split()[:3 + (5 * i) % 15])})
        prompts.append([{"role": "user", "content": content}])
        params.append(SamplingParams(max_new_tokens=2 + (7 * i) % 19))
    return prompts, params


def run_joining(llm: LLM, prompts, params, every: int = 2) -> list[list[int]]:
    """Add a request every `every` steps, then step until all are done; the output ids in order."""
    seqs, pending = [], list(zip(prompts, params))
    while pending or llm.engine.has_unfinished():
        if pending:
            seqs.append(llm.engine.add_request(llm.make_request(*pending.pop(0))))
        for _ in range(every):
            llm.engine.step()
    assert all(s.finish_reason == "length" for s in seqs)  # ignore_eos: every request runs to its max_new_tokens
    return [s.output_ids for s in seqs]


def each_alone(path, prompts, params, **options) -> list[list[int]]:
    llm = LLM(path, enable_prefix_caching=False, ignore_eos=True, **options)
    return [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]


@pytest.fixture(scope="module")
def mix(tiny_idefics3):
    prompts, params = mixed_requests()
    return prompts, params, each_alone(tiny_idefics3, prompts, params, backend="numpy")


def test_sixteen_requests_joining_at_different_steps_equal_each_alone(tiny_idefics3, mix):
    prompts, params, alone = mix
    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=64, ignore_eos=True)
    assert run_joining(llm, prompts, params) == alone
    stats = llm.stats
    assert stats.preemptions == 0 and stats.prompt_tokens > 16 * 64  # prompts chunked over several steps
    assert llm.engine.cache.allocator.num_free == llm.engine.cache.allocator.num_blocks  # every block back


def test_a_cache_too_small_for_all_preempts_and_still_gives_the_same_tokens(tiny_idefics3, mix):
    prompts, params, alone = mix
    longest = max(len(llm_request.prompt_ids) + sp.max_new_tokens for llm_request, sp in
                  zip((LLM(tiny_idefics3, backend="numpy").make_request(p) for p in prompts), params))
    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=96, num_blocks=-(-longest // 16) + 2,
              ignore_eos=True)
    assert run_joining(llm, prompts, params, every=1) == alone
    assert llm.stats.preemptions > 0


def test_a_request_larger_than_the_whole_cache_is_refused_when_added(tiny_idefics3, mix):
    prompts, params, alone = mix
    llm = LLM(tiny_idefics3, backend="numpy", num_blocks=12, ignore_eos=True)  # 192 tokens
    too_long = SamplingParams(max_new_tokens=10)
    with pytest.raises(InputError, match="whole KV cache"):
        llm.engine.add_request(llm.make_request(list(range(3, 190)), too_long))
    outputs = llm.generate([prompts[0], list(range(3, 190)), prompts[3]], [params[0], too_long, params[3]])
    assert [o.finish_reason for o in outputs] == ["length", "error", "length"]
    assert outputs[0].token_ids == alone[0] and outputs[2].token_ids == alone[3]


# ---------------------------------------------------------------- the engine, torch backend


def test_torch_backend_batches_and_preempts_with_the_same_tokens(tiny_smolvlm):
    prompts, params = mixed_requests(8)
    options = {"backend": "torch", "device": "cpu", "dtype": "float32"}
    alone = each_alone(tiny_smolvlm, prompts, params, **options)
    llm = LLM(tiny_smolvlm, max_num_batched_tokens=64, num_blocks=24, ignore_eos=True, **options)
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == alone
    assert llm.stats.preemptions > 0
