"""Serving: requests/s and output tokens/s of a seeded mix of image+text requests at several concurrencies, the LLM
API (continuous batching, chunked prefill) against transformers generate() on the same mix, in the same run.

The mix (--requests, seeded): chat prompts of 16..128 text tokens, two in three with an image of 1..3 frames of
512x512 (SmolVLM's tile, 64 <image> tokens each; uniform noise, a different image per request), greedy, 16..48 new
tokens each, end-of-sequence ignored by both sides so that both make exactly the tokens asked for.

At concurrency c:
  ours     c asyncio clients, each streaming its next request through llm.stream() as soon as its last one is done
           (prefix cache emptied before each run: the same mix is run again and again)
  theirs   static batches of c requests (left-padded, images padded to the most frames), generate() to the batch's
           largest max_new_tokens; only each request's own tokens are counted
Metrics: req/s (requests / wall time of the whole mix) and tok/s (the requests' new tokens / wall time), median over
--repeats rounds after one warm-up of two requests; a round times ours and transformers once each, alternating who
goes first, and is discarded and run again when other processes took more than --max-contention of the CPU (as in
bench_e2e.py: without --repeats clean rounds, no rows are saved). The model: a random-weight
SmolVLM-256M-Instruct-shaped checkpoint with --text-layers / --vision-layers layers (bench_e2e.py builds and caches
it), fp32 on the CPU.

    python bench/bench_serving.py                  # concurrency 1, 4, 16; ~10 min on 2 cores
    python bench/bench_serving.py --requests 8 --concurrency 1 4 --repeats 1 --text-layers 2 --vision-layers 1
"""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
import torch

from bench.bench_e2e import (ASSISTANT, END_OF_UTTERANCE, FAKE_AROUND_IMAGE, GLOBAL_IMG, IM_START, IMAGE, SMOLVLM_256M,
                             USER, smolvlm_checkpoint)
from bench.common import CpuContention, add_model_run_options, append_row, bench_parser, format_row, make_row

BENCH = "bench_serving"
TILE = SMOLVLM_256M["vision"]["image_size"]
TOKENS_PER_FRAME = 64


@dataclass
class MixRequest:
    ids: list[int]
    pixel_values: np.ndarray | None  # [frames, 3, 512, 512] float32
    max_new_tokens: int


def make_mix(n: int, seed: int) -> list[MixRequest]:
    """n chat prompts of random text (ids from the plain vocabulary), two in three with an image of 1-3 frames."""
    rng = np.random.default_rng(seed)
    mix = []
    for _ in range(n):
        frames = int(rng.integers(1, 4)) if rng.random() < 2 / 3 else 0
        frame = [FAKE_AROUND_IMAGE, GLOBAL_IMG, *[IMAGE] * TOKENS_PER_FRAME]
        image = frame * frames + [FAKE_AROUND_IMAGE] * (frames > 0)
        text = rng.integers(300, 40000, int(rng.integers(16, 129))).tolist()
        ids = [IM_START, *USER, *image, *text, END_OF_UTTERANCE, *ASSISTANT]
        pixels = (rng.random((frames, 3, TILE, TILE), dtype=np.float32) * 2 - 1) if frames else None
        mix.append(MixRequest(ids, pixels, int(rng.integers(16, 49))))
    return mix


# ---------------------------------------------------------------- ours: the LLM API, streamed by c clients

def ours_request(r: MixRequest):
    from smolvlm_fast import SamplingParams
    from smolvlm_fast.engine.sequence import ImageInput, Request

    images = [] if r.pixel_values is None else [ImageInput(r.pixel_values, np.ones((len(r.pixel_values), TILE, TILE),
                                                                                   dtype=bool))]
    return Request(list(r.ids), SamplingParams(max_new_tokens=r.max_new_tokens), images=images)


def run_ours(llm, mix: list[MixRequest], concurrency: int) -> list[list[int]]:
    llm.reset_prefix_cache()

    async def client(queue: list[int], results: dict):
        while queue:
            i = queue.pop(0)
            async for out in llm.stream(ours_request(mix[i])):
                pass
            results[i] = out.token_ids

    async def main():
        queue, results = list(range(len(mix))), {}
        await asyncio.gather(*(client(queue, results) for _ in range(concurrency)))
        return [results[i] for i in range(len(mix))]
    return asyncio.run(main())


# ---------------------------------------------------------------- theirs: transformers generate(), static batches

def theirs_batch(batch: list[MixRequest]) -> dict:
    """Left-padded input_ids / attention_mask, pixel_values padded to the most frames (zero frames are padding)."""
    longest, frames = max(len(r.ids) for r in batch), max(0 if r.pixel_values is None else len(r.pixel_values)
                                                          for r in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, longest - len(r.ids):], mask[b, longest - len(r.ids):] = torch.tensor(r.ids), 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if frames:
        pixels = torch.zeros(len(batch), frames, 3, TILE, TILE)
        for b, r in enumerate(batch):
            if r.pixel_values is not None:
                pixels[b, :len(r.pixel_values)] = torch.from_numpy(r.pixel_values)
        inputs["pixel_values"] = pixels
    return inputs


@torch.inference_mode()
def run_theirs(model, mix: list[MixRequest], concurrency: int) -> list[list[int]]:
    outputs = []
    for start in range(0, len(mix), concurrency):
        batch = mix[start:start + concurrency]
        inputs = theirs_batch(batch)
        new = max(r.max_new_tokens for r in batch)
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        prompt = inputs["input_ids"].shape[1]
        outputs += [out[b, prompt:prompt + r.max_new_tokens].tolist() for b, r in enumerate(batch)]
    return outputs


# ---------------------------------------------------------------- measuring

def timed(fn) -> tuple[float, object, float | None]:
    """(seconds, result, share of the CPU other processes took meanwhile)."""
    with CpuContention() as contention:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, result, contention.others


def measure(impls: dict, mix, concurrency: int, args) -> tuple[dict[str, list[float]], dict[str, list], bool]:
    """({impl: seconds per run of the mix}, {impl: the tokens of its last run}, whether the samples are unreliable).

    A round runs every implementation once, alternating who goes first; a round during which other processes took
    more than --max-contention of the CPU is discarded and run again (up to 3 x --repeats rounds in all)."""
    clean, contended, outputs = [], [], {}
    while len(clean) < args.repeats and len(clean) + len(contended) < 3 * args.repeats:
        order = list(impls) if (len(clean) + len(contended)) % 2 == 0 else list(reversed(impls))
        result, busiest = {}, 0.0
        for name in order:
            result[name], outputs[name], others = timed(lambda: impls[name](mix, concurrency))
            busiest = max(busiest, others or 0.0)
            print(f"  {name} c={concurrency}: {result[name]:.1f} s, other processes {others or 0:.0%} of the CPU",
                  file=sys.stderr, flush=True)
        (contended if busiest > args.max_contention else clean).append(result)
    unreliable = len(clean) < args.repeats
    if unreliable:
        print(f"  c={concurrency}: WARNING only {len(clean)} rounds of {args.repeats} below --max-contention "
              f"{args.max_contention:.0%}: not reliable{'' if args.no_save else ', so no rows are saved'}",
              file=sys.stderr)
    rounds = clean if not unreliable else clean + contended
    return {name: [r[name] for r in rounds] for name in impls}, outputs, unreliable


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), len(o)) for o, t in zip(ours, theirs))
    return f"{same}/{sum(len(o) for o in ours)}"


def parse_args(argv=None):
    p = bench_parser(__doc__)
    add_model_run_options(p)
    p.add_argument("--requests", type=int, default=16, help="requests in the mix (default 16)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--backend", choices=["torch", "numpy"], default="torch", help="our backend (default torch)")
    p.add_argument("--text-layers", type=int, default=4, help="decoder layers (default 4; 30 as released)")
    p.add_argument("--vision-layers", type=int, default=2, help="vision encoder layers (default 2; 12 as released)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the mix per implementation (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def implementations(args) -> tuple[object, dict]:
    """(our LLM, {"ours": run, "transformers": run}) over the checkpoint of --text-layers / --vision-layers."""
    from transformers import Idefics3ForConditionalGeneration

    from smolvlm_fast import LLM

    path = smolvlm_checkpoint(args.text_layers, args.vision_layers)
    options = {"backend": "numpy"} if args.backend == "numpy" else {"backend": "torch", "device": "cpu",
                                                                    "dtype": "float32"}
    llm = LLM(path, max_num_batched_tokens=args.max_num_batched_tokens, ignore_eos=True, **options)
    impls = {"ours": lambda mix, c: run_ours(llm, mix, c)}
    if not args.no_baseline:
        theirs = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        impls["transformers"] = lambda mix, c: run_theirs(theirs, mix, c)
    return llm, impls


def report(args, mix, concurrency: int, seconds: dict, unreliable: bool) -> None:
    """Print (and save) the req/s and tok/s rows of one concurrency."""
    shape = (f"requests={len(mix)} text_layers={args.text_layers} vision_layers={args.vision_layers} "
             f"max_num_batched_tokens={args.max_num_batched_tokens}")
    impl = "smolvlm_fast LLM" + (" (numpy backend)" if args.backend == "numpy" else "")
    for metric, amount in (("req/s", len(mix)), ("tok/s", sum(r.max_new_tokens for r in mix))):
        rates = {name: [amount / t for t in times] for name, times in seconds.items()}
        row = make_row(bench=BENCH, case=f"smolvlm-256m-random/c{concurrency}", shape=shape, dtype="float32",
                       device="cpu", metric=metric, ours=rates["ours"],
                       baseline="transformers" if "transformers" in rates else None,
                       theirs=rates.get("transformers"), impl=impl)
        print(format_row(row), flush=True)
        if not (args.no_save or unreliable):
            append_row(BENCH, row, args.results_dir)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.common import device_name

    llm, impls = implementations(args)
    mix = make_mix(args.requests, args.seed)
    print(f"# {device_name('cpu')}, float32, torch threads {torch.get_num_threads()}; {len(mix)} requests, "
          f"{sum(r.pixel_values is not None for r in mix)} with images, {sum(len(r.ids) for r in mix)} prompt tokens, "
          f"{sum(r.max_new_tokens for r in mix)} new tokens", file=sys.stderr)
    for run in impls.values():
        run(mix[:2], 2)  # warm-up
    for c in args.concurrency:
        seconds, outputs, unreliable = measure(impls, mix, c, args)
        if "transformers" in outputs:
            print(f"  c={c}: greedy tokens agree with transformers for "
                  f"{agreement(outputs['ours'], outputs['transformers'])}", file=sys.stderr)
        report(args, mix, c, seconds, unreliable)
    llm.shutdown()


if __name__ == "__main__":
    main()
