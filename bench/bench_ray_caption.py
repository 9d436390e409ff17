"""images/s of `smolvlm-fast caption --ray` with 1 and 2 actors next to the local `caption`, the same folder in the
same run, the local command as the baseline.

Each timing is the whole command as a user waits for it: the model load (in this process locally; in every actor
with Ray, which also starts the actors) and the folder's captions, into a fresh output file. The Ray cluster itself
is started once, before the rounds (`ray.init` on this process's CPUs), as `ray start` would be. Ray's actors split
the CPUs: 1 actor gets them all, 2 actors half each (their compute threads sized to match).

Model: bench_image_cpu's random-weight SmolVLM-256M-Instruct-shaped checkpoint with the released processor
settings, numpy backend, end-of-sequence ignored so that every image gets exactly --new-tokens tokens, images at
detail "low" (64 image tokens) unless --detail says otherwise. Images: bench_image_cpu's generated folder (mixed
sizes, JPEG and PNG).

    python bench/bench_ray_caption.py
    python bench/bench_ray_caption.py --images 8 --new-tokens 4 --text-layers 2 --vision-layers 2   # a quick look
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import bench_parser, make_row, report

BENCH = "bench_ray_caption"
PROMPT = "Describe this image in one or two sentences."


def llm_options(args) -> dict:
    return dict(backend="numpy", ignore_eos=True, image_detail=args.detail, max_num_seqs=2 * args.batch)


def local_seconds(path: Path, folder: Path, args) -> float:
    """The local command's work: the LLM's load and caption_folder over the folder."""
    from smolvlm_fast import LLM
    from smolvlm_fast.serving.caption import caption_folder

    start = time.perf_counter()
    llm = LLM(path, **llm_options(args))
    with tempfile.TemporaryDirectory() as tmp:
        summary = caption_folder(llm, folder, Path(tmp) / "captions.jsonl", prompt=PROMPT, progress=False,
                                 max_new_tokens=args.new_tokens, batch_size=args.batch)
    check(summary, args)
    return time.perf_counter() - start


def ray_seconds(path: Path, folder: Path, actors: int, cpus: int, args) -> float:
    """`caption --ray`'s work with this many actors: their start, each one's LLM load, the captions."""
    from smolvlm_fast.serving.ray_caption import caption_with_ray

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = caption_with_ray(folder, Path(tmp) / "captions.jsonl", model=path, llm_options=llm_options(args),
                                   prompt=PROMPT, max_new_tokens=args.new_tokens, batch_size=args.batch,
                                   actors=actors, cpus_per_actor=max(1, cpus // actors), progress=False,
                                   videos=False)
    check(summary, args)
    return time.perf_counter() - start


def check(summary, args) -> None:
    if summary.errors or summary.captioned != args.images:
        raise RuntimeError(f"caption: {summary}")


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="images in flight per engine (--batch-size)")
    p.add_argument("--detail", choices=("auto", "low", "high"), default="low")
    p.add_argument("--repeats", type=int, default=1, help="rounds, each local, Ray x1 and Ray x2 in turn")
    p.add_argument("--text-layers", type=int, default=30)
    p.add_argument("--vision-layers", type=int, default=12)
    args = p.parse_args(argv)
    import ray
    from bench.bench_image_cpu import caption_folder_images, processor_checkpoint

    path = processor_checkpoint(args.text_layers, args.vision_layers)
    cpus = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    runs = {"local": lambda f: local_seconds(path, f, args),
            "ray x1": lambda f: ray_seconds(path, f, 1, cpus, args),
            "ray x2": lambda f: ray_seconds(path, f, 2, cpus, args)}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            caption_folder_images(folder, args.images)
            for _ in range(args.repeats):  # interleaved: the shared machine's speed drifts
                for key, run in runs.items():
                    rates[key].append(args.images / run(folder))
    finally:
        ray.shutdown()
    shape = (f"images={args.images} new={args.new_tokens} batch={args.batch} detail={args.detail} "
             f"layers={args.text_layers}/{args.vision_layers} cpus={cpus}")
    for key in runs:
        row = make_row(bench=BENCH, case=f"caption {key}", shape=shape, dtype="bfloat16", device="cpu",
                       metric="images/s", ours=rates[key], baseline="local", theirs=rates["local"])
        report(BENCH, row, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
