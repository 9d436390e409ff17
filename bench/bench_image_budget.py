"""One small image in each image-token budget mode: its image tokens and the time to the first token, with the
default ("auto": transformers' own processing) as the baseline, in the same run.

Model: bench_image_cpu's random-weight SmolVLM-256M-Instruct-shaped checkpoint with the released processor
settings (longest edge 2,048, 512-pixel tiles, 64 tokens a tile), through `LLM` on the numpy backend in the
checkpoint's bfloat16. The image is 386 x 386 (the size of smollm#146, where the default upscale to 2,048 makes 4 x 4
tiles + 1, 1,088 image tokens). The prefix and image caches are off, so that every round encodes the image again.

    python bench/bench_image_budget.py
    python bench/bench_image_budget.py --repeats 1 --text-layers 2 --vision-layers 2   # a quick look
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import append_row, bench_parser, format_row, make_row

BENCH = "bench_image_budget"
MODES = {"auto": {}, "low": {"detail": "low"}, "max_image_tiles=4": {"max_image_tiles": 4},
         "upscale=False": {"upscale": False}}
SIZE = 386


def first_token_ms(llm, image, options: dict) -> tuple[float, int]:
    """(ms to the first token of one greedy request, its image tokens)."""
    from smolvlm_fast import SamplingParams

    prompt = {"prompt": "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:",
              "images": [image], **options}
    ids, _ = llm.encode(prompt)
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_new_tokens=1))
    return 1000 * (time.perf_counter() - start), ids.count(llm.model.config.image_token_id)


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=30)
    p.add_argument("--vision-layers", type=int, default=12)
    args = p.parse_args(argv)
    from bench.bench_image_cpu import make_image, processor_checkpoint
    from smolvlm_fast import LLM

    path = processor_checkpoint(args.text_layers, args.vision_layers)
    llm = LLM(path, backend="numpy", ignore_eos=True, enable_prefix_caching=False, feature_cache_bytes=0)
    image = make_image(SIZE, SIZE)
    first_token_ms(llm, image, {"detail": "low"})  # warm-up
    samples, tokens = {m: [] for m in MODES}, {}
    for _ in range(args.repeats):  # rounds interleaved: the VM's speed drifts
        for mode, options in MODES.items():
            ms, tokens[mode] = first_token_ms(llm, image, options)
            samples[mode].append(ms)
    for mode in MODES:
        row = make_row(bench=BENCH, case=f"{SIZE}x{SIZE} {mode}", shape=f"{tokens[mode]} image tokens, "
                       f"{args.text_layers}/{args.vision_layers} layers", dtype=llm.precision, device="cpu",
                       metric="ms", ours=samples[mode], baseline="auto", theirs=samples["auto"])
        print(format_row(row))
        if not args.no_save:
            append_row(BENCH, row, args.results_dir)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
