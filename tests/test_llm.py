"""The vLLM-style API: LLM(...).generate(prompts, SamplingParams) in order, every prompt form, stop strings, seeded
sampling independent of the batch, bad requests failing alone, and the asyncio streaming API with aborts."""
import asyncio
from contextlib import aclosing

import numpy as np
import pytest
from PIL import Image

from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor, InputError, SamplingParams
from smolvlm_fast.engine.sequence import Request
from smolvlm_fast.serving.llm import LLM, RequestOutput

GREEDY = SamplingParams(max_new_tokens=6)


def picture(seed: int, size=(60, 90)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def chat(question: str, *images):
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def vlm(tiny_idefics3):
    return LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=64, ignore_eos=True)


def test_every_prompt_form_in_order(vlm):
    image = picture(0)
    ids = vlm.tokenizer.encode("The quick brown fox")
    prompts = ["Once upon a time", ids, chat("What is in the picture?", image),
               {"prompt": "User:<image>What is this?", "images": [image]}, {"prompt_token_ids": ids},
               Request(ids, SamplingParams(max_new_tokens=3))]
    outputs = vlm.generate(prompts, GREEDY)
    assert all(isinstance(o, RequestOutput) and o.finished and o.error is None for o in outputs)
    assert len({o.request_id for o in outputs}) == len(prompts)
    assert outputs[1].prompt_token_ids == ids and outputs[1].token_ids == outputs[4].token_ids
    assert [len(o.token_ids) for o in outputs] == [6] * 5 + [6]  # the SamplingParams given replace the Request's
    image_token = vlm.model.config.image_token_id
    assert outputs[2].prompt_token_ids.count(image_token) == 7 * 16  # 90x60: 2 x 3 tiles + the whole, 16 tokens each
    for prompt, o in zip(prompts, outputs):
        assert o.text == vlm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        assert o.token_ids == vlm.generate(prompt, GREEDY)[0].token_ids  # alone, the same


def test_chat_with_images_matches_the_transformers_style_model(tiny_idefics3, vlm):
    conversation = chat("Compare the two pictures.", picture(1), picture(2, size=(120, 40)))
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="np")
    model = AutoModelForVision2Seq.from_pretrained(tiny_idefics3, backend="numpy")
    expected = model.generate(**inputs, max_new_tokens=6, eos_token_id=[])[0]
    out = vlm.generate(conversation, GREEDY)[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert out.token_ids == expected[len(out.prompt_token_ids):].tolist()


def test_stop_strings_cut_the_text_and_eos_stops(tiny_llama):
    llm = LLM(tiny_llama, backend="numpy")
    free = llm.generate("Tell me a story.", SamplingParams(max_new_tokens=12, stop_token_ids=()))[0]
    stop = free.text[len(free.text) // 2:][:3]
    if not stop.strip():
        pytest.skip("the random model's text has no usable stop string")
    cut = llm.generate("Tell me a story.", SamplingParams(max_new_tokens=12, stop_strings=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    eos = llm.eos_token_ids[0]
    assert eos in llm.make_request("hi", GREEDY).params.stop_token_ids
    assert LLM(tiny_llama, backend="numpy", ignore_eos=True).make_request("hi", GREEDY).params.stop_token_ids == ()


def test_seeded_sampling_does_not_depend_on_the_batch(vlm):
    sampled = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
                             repetition_penalty=1.1, seed=11)
    prompt = chat("Tell me a story.", picture(3))
    alone = vlm.generate(prompt, sampled)[0].token_ids
    others = ["The sky is blue", chat("What is in the picture?", picture(4)), "Numbers like 2024"]
    batch = vlm.generate(others[:2] + [prompt] + others[2:], [GREEDY, sampled, sampled, GREEDY])
    assert batch[2].token_ids == alone
    other_seed = SamplingParams(**{**sampled.__dict__, "seed": 12})
    assert vlm.generate(prompt, other_seed)[0].token_ids != alone


def test_bad_requests_fail_alone(vlm, tiny_llama):
    good = chat("What is in the picture?", picture(5))
    limit = vlm.model.config.text.max_position_embeddings
    outputs = vlm.generate([good, "", [1, 2, 3], {"prompt": "User:<image><image>Both?", "images": [picture(6)]},
                            [10**6], good], [GREEDY, GREEDY, SamplingParams(max_new_tokens=limit), GREEDY, GREEDY,
                                             GREEDY])
    assert [o.finish_reason for o in outputs] == ["length", "error", "error", "error", "error", "length"]
    assert "empty" in outputs[1].error and "context" in outputs[2].error
    assert "<image> markers" in outputs[3].error and "token ids" in outputs[4].error
    assert outputs[0].token_ids == outputs[5].token_ids == vlm.generate(good, GREEDY)[0].token_ids
    text_only = LLM(tiny_llama, backend="numpy")
    out = text_only.generate([chat("What?", picture(7)), "Hello"], GREEDY)
    assert "text-only" in out[0].error and out[1].finish_reason in ("length", "stop")


# ---------------------------------------------------------------- streaming


async def collect(llm: LLM, prompt, params, delay: float = 0.0) -> list[RequestOutput]:
    await asyncio.sleep(delay)
    return [out async for out in llm.stream(prompt, params)]


def test_streams_joining_at_different_times_equal_generate(tiny_idefics3):
    prompts = [chat("What is in the picture?", picture(8)), "Once upon a time", chat("Is it old?", picture(9)),
               "The train leaves the station"]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 9, 7, 3)]
    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=48, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]

    async def main():
        return await asyncio.gather(*(collect(llm, p, sp, 0.01 * i) for i, (p, sp) in enumerate(zip(prompts, params))))
    streams = asyncio.run(main())
    for outputs, want in zip(streams, expected):
        assert [len(o.token_ids) for o in outputs] == list(range(1, len(want) + 1))  # one output per token
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].token_ids == want
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected  # generate through the running loop
    llm.shutdown()


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks(tiny_idefics3):
    llm = LLM(tiny_idefics3, backend="numpy", ignore_eos=True)
    allocator = llm.engine.cache.allocator

    async def main():
        seen = 0
        async with aclosing(llm.stream(chat("Tell me a story.", picture(10)), SamplingParams(max_new_tokens=200))) as s:
            async for _ in s:
                seen += 1
                if seen == 3:
                    break  # the client is gone: closing the stream aborts its request
        # The loop takes the abort before this request: when it is done, the abort was done too.
        return await collect(llm, "Hello", GREEDY)
    outputs = asyncio.run(main())
    assert outputs[-1].finished and allocator.num_free == allocator.num_blocks
    assert not llm.engine.has_unfinished()
    llm.shutdown()


def test_a_bad_streamed_request_raises(vlm):
    async def main():
        return [out async for out in vlm.stream("", GREEDY)]
    with pytest.raises(InputError, match="empty"):
        asyncio.run(main())


def test_openai_image_url_blocks_are_images(vlm, tmp_path):
    """{"type": "image_url", "image_url": {"url": ...}} (OpenAI's form) is the same image as {"type": "image"}."""
    path = tmp_path / "p.png"
    picture(3).save(path)
    ours = [{"role": "user", "content": [{"type": "image", "url": str(path)}, {"type": "text", "text": "What?"}]}]
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                           {"type": "text", "text": "What?"}]}]
    a, b = vlm.generate([ours, openai], GREEDY)
    assert a.error is None and b.error is None
    assert a.prompt_token_ids == b.prompt_token_ids and a.token_ids == b.token_ids


# ---------------------------------------------------------------- what the server reads


def test_capacity_check_and_gauges(tiny_idefics3):
    llm = LLM(tiny_idefics3, backend="numpy", num_blocks=8, block_size=16, ignore_eos=True)
    assert llm.capacity == 8 * 16
    llm.check(llm.make_request("Hello", GREEDY))
    with pytest.raises(InputError, match="KV cache"):
        llm.check(llm.make_request("Hello", SamplingParams(max_new_tokens=llm.capacity)))
    with pytest.raises(InputError, match="empty"):
        llm.check(Request([], GREEDY))
    with pytest.raises(InputError, match="token ids"):
        llm.check(Request([10**6], GREEDY))
    stats = llm.stats
    assert (stats.running, stats.waiting, stats.kv_blocks_total, stats.kv_blocks_free) == (0, 0, 8, 8)
    seqs = [llm.engine.add_request(llm.make_request(p, GREEDY)) for p in ("Hello there", "Once upon a time")]
    assert (llm.stats.running, llm.stats.waiting) == (0, 2)
    llm.engine.step()
    stats = llm.stats
    assert stats.running == 2 and stats.waiting == 0 and stats.kv_blocks_free == 8 - 2
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert all(s.finished for s in seqs)
    stats, allocator = llm.stats, llm.engine.cache.allocator
    assert stats.running == 0 and stats.kv_blocks_free == 8
    assert stats.kv_blocks_cached == allocator.num_cached > 0  # a full block (prompt + output) stays findable


def test_max_image_pixels_reads_and_binds_the_processor(tiny_idefics3, tiny_llama, tmp_path):
    llm = LLM(tiny_idefics3, backend="numpy")
    assert llm.max_image_pixels == 40_000_000  # the processor's default cap
    llm.max_image_pixels = 100
    assert llm.max_image_pixels == llm.processor.max_image_pixels == 100
    path = tmp_path / "big.png"
    picture(11).save(path)  # 90 x 60 pixels
    out = llm.generate([{"prompt": "User:<image>What?", "images": [str(path)]}], GREEDY)[0]
    assert out.finish_reason == "error" and "max_image_pixels" in out.error
    text_only = LLM(tiny_llama, backend="numpy")
    assert text_only.max_image_pixels is None
    text_only.max_image_pixels = 100  # nothing to bind: no error
    assert text_only.max_image_pixels is None


# ---------------------------------------------------------------- the KV cache's default size


def test_kv_cache_defaults_to_a_fraction_of_free_memory(tiny_llama, monkeypatch, caplog):
    from smolvlm_fast.engine import memory
    from smolvlm_fast.engine.backend import NumpyBackend

    model = LLM(tiny_llama, backend="numpy", num_blocks=1).model
    per_block = memory.block_bytes(model, NumpyBackend(), 16)
    monkeypatch.setattr(NumpyBackend, "free_memory", lambda self, m: (40 * per_block, "host"))
    with caplog.at_level("INFO", logger="smolvlm_fast.engine"):
        llm = LLM(model, backend="numpy")
    assert llm.stats.kv_blocks_total == int(40 * memory.HOST_FRACTION)  # 25% of what is free
    line = caplog.records[-1].getMessage()
    assert "10 blocks of 16 tokens = 160 tokens" in line and "25% of the" in line and "host" in line
    context_blocks = -(-model.config.text.max_position_embeddings // 16)
    monkeypatch.setattr(NumpyBackend, "free_memory", lambda self, m: (1 << 50, "host"))
    assert LLM(model, max_num_seqs=3).stats.kv_blocks_total == 3 * context_blocks  # capped at 3 whole contexts
    monkeypatch.setattr(NumpyBackend, "free_memory", lambda self, m: (None, "host"))
    assert LLM(model, max_num_seqs=10**6).stats.kv_blocks_total == memory.FALLBACK_BYTES // per_block
    assert LLM(model, kv_cache_bytes=5 * per_block).stats.kv_blocks_total == 5  # overridable both ways
    assert LLM(model, num_blocks=7).capacity == 7 * 16


def test_free_host_memory_is_read():
    from smolvlm_fast.engine.backend import host_available_bytes

    free = host_available_bytes()
    assert free is None or free > 0


def test_a_plain_string_is_not_chat_templated(vlm):
    """A string goes to the tokenizer as it is; a chat message list goes through the checkpoint's chat template."""
    question = "What is in the picture?"
    assert vlm.make_request(question).prompt_ids == vlm.tokenizer.encode(question)
    text = vlm.processor.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=False)
    bos = vlm.tokenizer.bos_token
    assert text != question and question in text
    assert vlm.make_request(chat(question)).prompt_ids == vlm.tokenizer.encode(
        text, add_special_tokens=not (bos and text.startswith(bos)))


def test_each_request_is_checked_once(tiny_idefics3, monkeypatch):
    """One check per request whichever door it comes through: generate(), stream(), and stream(checked=True) after
    LLM.check (the server's path); a bad request is still refused on each."""
    llm = LLM(tiny_idefics3, backend="numpy", ignore_eos=True)
    calls = []
    check = llm.engine.check
    monkeypatch.setattr(llm.engine, "check", lambda request: (calls.append(request.request_id), check(request))[1])
    params = SamplingParams(max_new_tokens=2)
    llm.generate(["Hello"], params)
    assert len(calls) == 1

    async def stream(prompt, **kwargs):
        return [out async for out in llm.stream(prompt, params, **kwargs)]
    calls.clear()
    assert asyncio.run(stream(chat("What is it?", picture(11))))[-1].finished
    assert len(calls) == 1
    calls.clear()
    request = llm.make_request("Hello", params)
    llm.check(request)
    assert asyncio.run(stream(request, checked=True))[-1].finished
    assert len(calls) == 1
    with pytest.raises(InputError, match="empty"):
        asyncio.run(stream(""))
    llm.shutdown()
