"""CPU image questions: time to first token, decode tok/s and peak memory, smolvlm_fast against transformers, in
the same run, on the same checkpoint, images and prompt.

Model: the random-weight SmolVLM-256M-Instruct-shaped checkpoint of bench_e2e.py (built once and cached; smaller
with --text-layers / --vision-layers), next to which this benchmark writes SmolVLM's processor files once: the
SmolLM2 tokenizer of the package's default GGUF with SmolVLM's added tokens, and the released image processor
settings (size.longest_edge 2048, 512-pixel tiles, LANCZOS). Both sides load that folder with their AutoProcessor.

Cases (one image each, "Describe this image." as a chat, greedy, exactly --new-tokens tokens, end-of-sequence
ignored by both sides; the images are deterministic gradients plus noise):
  512-unsplit  a 512x512 image, do_image_splitting=False: 1 tile, 64 image tokens
  512-split    the same image split as the processor does by default: 4x4 tiles + the global one, 1,088 tokens
  1536x1024    default splitting: 4x3 tiles + the global one, 832 tokens
Metrics per implementation and case:
  ttft    ms    from calling the processor on the chat and the image to the first streamed new token (chat
                template, image decoding and tiling, vision encoder, prefill, first sampling)
  decode  tok/s (new tokens - 1) / time from the first to the last streamed new token
  memory  MB    peak resident memory (VmHWM) of a fresh process that loads the model and runs the case once
--caption adds a folder of 32 generated images of mixed sizes: images/s of our `caption` path (batched by the
engine) against transformers bfloat16 generate() one image at a time, same prompt, same new tokens.

    python bench/bench_image_cpu.py                                     # all cases, all implementations
    python bench/bench_image_cpu.py --text-layers 2 --vision-layers 2 --repeats 1 --new-tokens 4   # quick
    python bench/bench_image_cpu.py --impls ours-fp32 transformers-fp32 --cases 512-unsplit --no-memory
    python bench/bench_image_cpu.py --cases --caption --caption-images 8   # only the caption folder
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np

import smolvlm_fast  # noqa: F401  first: it sets OpenBLAS's thread timeout, read only when numpy loads
from bench.common import append_row, bench_parser, clean_rounds, format_row, make_row

BENCH = "bench_image_cpu"
BASELINE = "transformers-bf16"  # the ratios of every row are against it
PROMPT = "Describe this image."
IMAGE_SEQ_LEN = 64  # (512 / 16)^2 patches / 4^2 (pixel shuffle)
# SmolVLM's added tokens after SmolLM2's 49,152: ids 49152 <global-img> ... 49190 <image> (bench_e2e's ids), then
# reserved ids up to 49279 <end_of_utterance>.
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
ADDED_TOKENS = ["<global-img>", *ROW_COL, "<fake_token_around_image>", "<image>",
                *(f"<|reserved_special_token_{i}|>" for i in range(88)), "<end_of_utterance>"]


# ---------------------------------------------------------------- implementations and cases

@dataclass(frozen=True)
class Impl:
    side: str                   # "ours" (the numpy backend) or "transformers"
    dtype: str                  # "float32" or "bfloat16"
    quantize: str | None = None  # "int4": our decoder's linear layers in int4

    @property
    def label(self) -> str:
        """The impl field of its rows (the dtype has its own field)."""
        if self.side == "transformers":
            return "transformers"
        return "smolvlm_fast (numpy backend" + (", int4 decoder)" if self.quantize else ")")


IMPLS = {"transformers-fp32": Impl("transformers", "float32"), "transformers-bf16": Impl("transformers", "bfloat16"),
         "ours-fp32": Impl("ours", "float32"), "ours-bf16": Impl("ours", "bfloat16"),
         "ours-int4-fp32": Impl("ours", "float32", "int4"), "ours-int4-bf16": Impl("ours", "bfloat16", "int4")}
AGREEMENT = [("ours-fp32", "transformers-fp32"), ("ours-bf16", "transformers-bf16")]  # should agree: same arithmetic


@dataclass(frozen=True)
class Case:
    width: int
    height: int
    split: bool   # do_image_splitting
    tiles: int    # frames through the vision encoder (with the global one), as the released processor makes them


CASES = {"512-unsplit": Case(512, 512, False, 1), "512-split": Case(512, 512, True, 17),
         "1536x1024": Case(1536, 1024, True, 13)}


def make_image(width: int, height: int, seed: int = 0):
    """A PIL RGB image: three gradients plus uniform noise, the same for a given size and seed."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gradients = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200  # [H, W, 3]
    noise = np.random.default_rng(seed).integers(0, 56, (height, width, 3))
    return Image.fromarray((gradients + noise).astype(np.uint8))


def chat(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


class Ours:
    """Our transformers drop-in: smolvlm_fast.AutoProcessor + AutoModelForVision2Seq on the numpy backend."""

    def __init__(self, path: Path, impl: Impl, threads: int):
        from smolvlm_fast import AutoModelForVision2Seq, AutoProcessor
        from smolvlm_fast.cpu.linear import set_num_threads

        set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForVision2Seq.from_pretrained(path, backend="numpy", dtype=impl.dtype,
                                                            quantize=impl.quantize)

    def inputs(self, image, split: bool) -> dict:
        text = self.processor.apply_chat_template(chat(), add_generation_prompt=True)
        return self.processor(images=[[image]], text=text, return_tensors="np", do_image_splitting=split)

    def __call__(self, image, split: bool, new_tokens: int, streamer=None):
        # eos_token_id=[]: no stop token, so exactly new_tokens tokens
        return self.model.generate(**self.inputs(image, split), max_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=[], streamer=streamer)


class Transformers:
    """transformers' AutoProcessor + Idefics3ForConditionalGeneration in the impl's dtype."""

    def __init__(self, path: Path, impl: Impl, threads: int):
        import torch
        from transformers import AutoProcessor, Idefics3ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch, self.dtype = torch, getattr(torch, impl.dtype)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=self.dtype).eval()

    def inputs(self, image, split: bool) -> dict:
        text = self.processor.apply_chat_template(chat(), add_generation_prompt=True)
        inputs = self.processor(images=[[image]], text=text, return_tensors="pt", do_image_splitting=split)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def __call__(self, image, split: bool, new_tokens: int, streamer=None):
        # min_new_tokens=max_new_tokens: eos is masked until the last token, so exactly new_tokens tokens
        with self.torch.inference_mode():
            return self.model.generate(**self.inputs(image, split), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0)


def load(key: str, path: Path, threads: int):
    """The runner of IMPLS[key], or the reason it cannot run here (an InputError of our loader: bfloat16 on the
    numpy backend before it exists, say)."""
    from smolvlm_fast import InputError

    impl = IMPLS[key]
    try:
        return (Ours if impl.side == "ours" else Transformers)(path, impl, threads)
    except InputError as e:
        return str(e)


# ---------------------------------------------------------------- the checkpoint with its processor

def processor_checkpoint(text_layers: int, vision_layers: int) -> Path:
    """bench_e2e's cached random checkpoint (its files linked) plus SmolVLM's tokenizer and processor files, in a
    folder of its own beside it (built once)."""
    from bench.bench_e2e import smolvlm_checkpoint

    weights = smolvlm_checkpoint(text_layers, vision_layers)
    target = weights.with_name(weights.name + "-processor")
    if (target / "processor_config.json").exists():
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    smolvlm_processor().save_pretrained(partial)
    for f in weights.iterdir():
        (partial / f.name).symlink_to(f)
    partial.rename(target)
    return target


def smolvlm_processor():
    """transformers' Idefics3Processor as SmolVLM-256M-Instruct ships it: SmolLM2's tokenizer (from the package's
    default GGUF) with SmolVLM's added tokens at their ids, the released image processor settings, the chat template."""
    from tokenizers import AddedToken
    from transformers import (
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    from smolvlm_fast import AutoTokenizer
    from smolvlm_fast.formats.hub import default_model_path
    from smolvlm_fast.random_checkpoint import CHAT_TEMPLATE

    backend = AutoTokenizer.from_pretrained(default_model_path()).backend
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    if backend.token_to_id("<image>") != 49190 or backend.get_vocab_size() != 49280:
        raise SystemExit("the default GGUF's tokenizer is not SmolLM2's 49,152 tokens: cannot lay out SmolVLM's ids")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", additional_special_tokens=["<fake_token_around_image>", "<image>",
                                                              "<end_of_utterance>"], model_max_length=8192)
    # resample 1: LANCZOS, as released
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                       do_image_splitting=True, resample=1)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def check_inputs(runners: dict, name: str, case: Case) -> int:
    """The prompt length; every runner's processor must give the same ids and the case's tile count."""
    image, prompts = make_image(case.width, case.height), {}
    for key, runner in runners.items():
        inputs = runner.inputs(image, case.split)
        ids = np.asarray(inputs["input_ids"])[0]
        prompts[key] = ids.tolist()
        if inputs["pixel_values"].shape[1] != case.tiles:
            print(f"{name}: WARNING {key} makes {inputs['pixel_values'].shape[1]} tiles, not {case.tiles}",
                  file=sys.stderr)
    if len({tuple(p) for p in prompts.values()}) > 1:
        print(f"{name}: WARNING the processors disagree on the input ids "
              f"({', '.join(f'{k}: {len(p)}' for k, p in prompts.items())} tokens)", file=sys.stderr)
    return len(next(iter(prompts.values())))


# ---------------------------------------------------------------- timing: rounds of every implementation

def measure_case(runners: dict, name: str, case: Case, args) -> tuple[dict, bool]:
    """({impl: {"ttft": [ms], "decode": [tok/s]}}, unreliable), and prints the greedy agreement."""
    from bench.bench_e2e import timed_generate

    image, tokens = make_image(case.width, case.height), {}

    def one(key):
        run = runners[key]
        ttft, decode, tokens[key] = timed_generate(lambda clock: run(image, case.split, args.new_tokens, clock),
                                                   args.new_tokens)
        return ttft * 1e3, decode

    for key in runners:
        for _ in range(args.warmup):
            one(key)
    rounds, unreliable = clean_rounds(list(runners), one, args.repeats, args, name)
    for a, b in AGREEMENT:
        if a in tokens and b in tokens:
            same = next((i for i, (x, y) in enumerate(zip(tokens[a], tokens[b])) if x != y), args.new_tokens)
            print(f"{name}: greedy tokens of {a} and {b} agree for {same}/{args.new_tokens}", file=sys.stderr)
    samples = {key: {"ttft": [r[key][0] for r in rounds], "decode": [r[key][1] for r in rounds]} for key in runners}
    return samples, unreliable


# ---------------------------------------------------------------- peak memory: a fresh process per impl x case

def peak_memory_child(args) -> None:
    """(--memory-child) Load one implementation, run one case once, print the peak resident memory as JSON."""
    key, case = args.memory_child
    runner = load(key, args.model_dir, args.threads)
    if isinstance(runner, str):
        raise SystemExit(runner)
    c = CASES[case]
    runner(make_image(c.width, c.height), c.split, args.new_tokens)
    print(json.dumps({"vmhwm_kb": peak_rss_kb(), "torch_imported": "torch" in sys.modules}))


def peak_rss_kb() -> int:
    """The resident high-water mark of this process (VmHWM; ru_maxrss where /proc is missing), in kB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(key: str, case: str, path: Path, args) -> float | None:
    """MB (1e6 bytes) of peak resident memory of a fresh process running IMPLS[key] on the case once."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", key, case, "--model-dir", str(path),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"{case}: {key}: the memory run failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if IMPLS[key].side == "ours" and result["torch_imported"]:
        print(f"{case}: {key}: note: torch was imported by our path, its libraries are counted", file=sys.stderr)
    return result["vmhwm_kb"] * 1024 / 1e6


# ---------------------------------------------------------------- the caption folder

CAPTION_SIZES = [(200, 150), (320, 240), (640, 480), (800, 600), (1024, 768), (1600, 1200), (300, 300), (512, 512),
                 (900, 600), (1200, 800), (480, 640), (600, 900), (1280, 720), (720, 1280), (1600, 900), (400, 1000)]


def caption_folder_images(folder: Path, n: int) -> list[Path]:
    """n generated images of CAPTION_SIZES (in turn), saved alternately as JPEG and PNG."""
    paths = []
    for i in range(n):
        width, height = CAPTION_SIZES[i % len(CAPTION_SIZES)]
        path = folder / f"image_{i:02d}.{'jpg' if i % 2 == 0 else 'png'}"
        make_image(width, height, seed=i).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def caption_llm(path: Path, args):
    """(impl key, our LLM) for the caption path: --caption-impl, by default ours-bf16 where it loads, else ours-fp32.
    End-of-sequence ignored, so that every image gets exactly --caption-tokens tokens, as transformers' do."""
    from smolvlm_fast import LLM, InputError

    for key in [args.caption_impl] if args.caption_impl else ["ours-bf16", "ours-fp32"]:
        impl = IMPLS[key]
        try:
            return key, LLM(path, backend="numpy", dtype=impl.dtype, quantize=impl.quantize, ignore_eos=True,
                            max_num_seqs=2 * args.caption_batch)  # as `smolvlm-fast caption` sizes it
        except InputError as e:
            print(f"caption: {key} does not load ({e})" + ("" if args.caption_impl else ", trying ours-fp32"),
                  file=sys.stderr)
    raise SystemExit("caption: none of ours loads")


def ours_caption(llm, folder: Path, args) -> Callable[[], float]:
    """A call that captions the folder with smolvlm_fast.serving.caption.caption_folder (a fresh output file each
    time) and returns its seconds."""
    from smolvlm_fast.serving.caption import caption_folder

    def run(root: Path = folder) -> float:
        llm.reset_prefix_cache()  # the same folder again: no prompt blocks or image features from the last run
        with tempfile.TemporaryDirectory() as tmp:
            summary = caption_folder(llm, root, Path(tmp) / "captions.jsonl", prompt=PROMPT,
                                     max_new_tokens=args.caption_tokens, batch_size=args.caption_batch, progress=False)
        if summary.errors or summary.captioned != len(list(root.iterdir())):
            raise RuntimeError(f"caption: {summary}")
        return summary.seconds
    return run


def transformers_caption(path: Path, folder: Path, args) -> Callable[[], float]:
    """A call that runs transformers bfloat16 generate() over the folder's images one at a time, returns seconds."""
    from transformers.image_utils import load_image

    runner = Transformers(path, IMPLS["transformers-bf16"], args.threads)

    def run(root: Path = folder) -> float:
        start = time.perf_counter()
        for image in sorted(root.iterdir()):
            runner(load_image(str(image)), True, args.caption_tokens)
        return time.perf_counter() - start
    return run


def measure_caption(path: Path, args) -> list[dict]:
    """images/s of our caption path and of transformers bfloat16 one image at a time, in alternating rounds."""
    key, llm = caption_llm(path, args)
    with tempfile.TemporaryDirectory() as tmp:
        folder, warm = Path(tmp) / "images", Path(tmp) / "warm-up"
        folder.mkdir(), warm.mkdir()
        caption_folder_images(folder, args.caption_images)
        make_image(640, 480, seed=1000).save(warm / "warm.png")  # not in the folder: no cached features
        runs = {key: ours_caption(llm, folder, args)}
        if not args.no_baseline:
            runs[BASELINE] = transformers_caption(path, folder, args)
        for run in runs.values():
            for _ in range(args.warmup):
                run(warm)
        rounds, unreliable = clean_rounds(list(runs), lambda k: runs[k](), args.caption_repeats, args, "caption")
    rates = {k: [args.caption_images / r[k] for r in rounds] for k in runs}
    theirs = rates.get(BASELINE)
    shape = f"images={args.caption_images} new={args.caption_tokens} batch={args.caption_batch}{layers_tag(args)}"
    row = make_row(bench=BENCH, case=f"{model_name(args)}/caption", shape=shape, dtype=IMPLS[key].dtype, device="cpu",
                   metric="img/s", ours=rates[key], baseline=BASELINE if theirs else None, theirs=theirs,
                   impl="smolvlm_fast caption" + IMPLS[key].label.removeprefix("smolvlm_fast"))
    return emit([row], args, unreliable)


# ---------------------------------------------------------------- rows

def model_name(args) -> str:
    full = (args.text_layers, args.vision_layers) == (30, 12)
    return "smolvlm-256m-random" + ("" if full else f"-t{args.text_layers}v{args.vision_layers}")


def layers_tag(args) -> str:
    full = (args.text_layers, args.vision_layers) == (30, 12)
    return "" if full else f" text_layers={args.text_layers} vision_layers={args.vision_layers}"


def case_rows(name: str, case: Case, prompt: int, samples: dict, memory: dict, args) -> list[dict]:
    """One row per implementation and metric, each against transformers bfloat16 when it ran."""
    shape = (f"batch=1 image={case.width}x{case.height} tiles={case.tiles} image_tokens={case.tiles * IMAGE_SEQ_LEN} "
             f"prompt={prompt} new={args.new_tokens}{layers_tag(args)}")
    rows = []
    for key in samples:
        impl = IMPLS[key]
        metrics = [("ttft", "ms", samples[key]["ttft"], samples.get(BASELINE, {}).get("ttft")),
                   ("decode", "tok/s", samples[key]["decode"], samples.get(BASELINE, {}).get("decode"))]
        if memory.get(key) is not None:
            metrics.append(("memory", "MB", [memory[key]], [memory[BASELINE]] if memory.get(BASELINE) else None))
        for phase, metric, ours, theirs in metrics:
            against = theirs if key != BASELINE else None
            row = make_row(bench=BENCH, case=f"{model_name(args)}/{name}/{phase}", shape=shape, dtype=impl.dtype,
                           device="cpu", metric=metric, ours=ours, baseline=BASELINE if against else None,
                           theirs=against, impl=impl.label)
            if metric == "MB" and row["ratio"] is not None:
                row["ratio"] = row["baseline_median"] / row["median"]  # less is better, as for a time
            rows.append(row)
    return rows


def emit(rows: list[dict], args, unreliable: bool) -> list[dict]:
    for row in rows:
        print(format_row(row), flush=True)
        if not (args.no_save or unreliable):
            append_row(BENCH, row, args.results_dir)
    return rows


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--threads", type=int, default=None,
                   help="torch's threads and our C++ pool's (default: the cores this process may use)")
    p.add_argument("--no-baseline", action="store_true", help="measure smolvlm_fast only, no transformers")
    p.add_argument("--max-contention", type=float, default=0.10,
                   help="rerun a round when other processes took more than this share of the CPU (default 0.10)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES),
                   help="image cases (default all; --cases alone: none, e.g. with --caption)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation and case first (default 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run, eos ignored (default 64)")
    p.add_argument("--text-layers", type=int, default=30, help="decoder layers (default 30, as released)")
    p.add_argument("--vision-layers", type=int, default=12, help="vision encoder layers (default 12, as released)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--caption", action="store_true", help="also the caption folder: our caption path vs transformers")
    p.add_argument("--caption-impl", choices=[k for k in IMPLS if k.startswith("ours")], default=None,
                   help="which of ours captions (default ours-bf16 where it loads, else ours-fp32)")
    p.add_argument("--caption-images", type=int, default=32, help="images in the folder (default 32)")
    p.add_argument("--caption-tokens", type=int, default=32, help="new tokens per image (default 32)")
    p.add_argument("--caption-batch", type=int, default=8, help="our caption batch_size (default 8)")
    p.add_argument("--caption-repeats", type=int, default=1, help="timed runs over the folder (default 1)")
    p.add_argument("--memory-child", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2 or min(args.repeats, args.caption_repeats, args.caption_images) < 1 or args.warmup < 0:
        p.error("--new-tokens must be >= 2, --repeats, --caption-repeats, --caption-images >= 1, --warmup >= 0")
    args.threads = args.threads or len(os.sched_getaffinity(0))  # torch's and our pool's: the cores we may use
    if args.no_baseline:
        args.impls = [k for k in args.impls if IMPLS[k].side == "ours"]
    return args


def run_cases(path: Path, args) -> list[dict]:
    """Load every --impls implementation (those that do not load are skipped, with why), then measure each case."""
    runners = {}
    for key in args.impls if args.cases else []:
        runner = load(key, path, args.threads)
        if isinstance(runner, str):
            print(f"{key}: skipped, it does not load: {runner}", file=sys.stderr)
        else:
            runners[key] = runner
    if args.cases and not runners:
        print("no implementation loads: no cases measured", file=sys.stderr)
        return []
    rows = []
    for name in args.cases:
        case = CASES[name]
        prompt = check_inputs(runners, name, case)
        samples, unreliable = measure_case(runners, name, case, args)
        memory = {} if args.no_memory else {key: peak_memory(key, name, path, args) for key in runners}
        rows += emit(case_rows(name, case, prompt, samples, memory, args), args, unreliable)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        return peak_memory_child(args)
    from bench.common import device_name

    print(f"# {device_name('cpu')}, threads {args.threads} (torch and smolvlm_fast)", file=sys.stderr)
    path = processor_checkpoint(args.text_layers, args.vision_layers)
    run_cases(path, args)
    if args.caption:
        measure_caption(path, args)


if __name__ == "__main__":
    main()
