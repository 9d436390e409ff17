"""End to end: smolvlm_fast's PyTorch path against transformers, same checkpoint, same prompt, same run.

Per scenario it measures, for both:
  prefill  tok/s  prompt tokens / time of one forward over the prompt (fresh cache, last-token logits;
                  for the VLM this includes encoding the image)
  decode   tok/s  (new tokens - 1) / time from the first to the last new token of a greedy generate()
                  of exactly --new-tokens tokens (end-of-sequence ignored by both)
  ttft     ms     time from calling generate() to the first new token (streamer timestamps)
after --warmup untimed runs, as median / p20 / p80 over --repeats runs (ours and transformers alternate).

Scenarios:
  smollm2  the real SmolLM2-135M-Instruct Q4_1 GGUF (dequantized), a chat prompt of --prompt-tokens tokens
  smolvlm  a random-weight SmolVLM-256M-Instruct-shaped checkpoint (built once with transformers and cached),
           one 512x512 image (64 image tokens) and a short instruction

    python bench/bench_e2e.py                           # both scenarios, fp32 on CPU / bf16 on CUDA
    python bench/bench_e2e.py --scenario smolvlm --text-layers 4 --vision-layers 2 --repeats 3
    python bench/bench_e2e.py --scenario smollm2 --backend numpy numpy-int8 torch   # all of ours, one run
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

from bench.common import (
    add_model_run_options,
    append_row,
    bench_parser,
    clean_rounds,
    format_row,
    make_row,
    time_call,
)

BENCH = "bench_e2e"
BASELINE = "transformers"

# SmolVLM-256M-Instruct as released (its config.json on the Hugging Face Hub).
SMOLVLM_256M = {
    "text": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49280, "rope_theta": 100000,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    "vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
               "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    "scale_factor": 4, "image_token_id": 49190,
}
# Token ids of the SmolVLM chat prompt "<|im_start|>User:<image>Describe this image in detail.<end_of_utterance>\n
# Assistant:" with one unsplit image (SmolLM2 vocabulary + SmolVLM's added tokens).
IM_START, FAKE_AROUND_IMAGE, GLOBAL_IMG, IMAGE, END_OF_UTTERANCE = 1, 49189, 49152, 49190, 49279
USER, INSTRUCTION, ASSISTANT = [11126, 42], [20263, 451, 2443, 281, 2202, 30], [198, 9519, 9531, 42]

FILLER = (
    "The history of photography began with the camera obscura, a darkened room with a small hole in one wall "
    "through which light from outside painted an inverted image on the opposite wall. Painters used it to trace "
    "scenes for centuries before anyone found a way to keep the picture. In the 1820s Nicephore Niepce coated a "
    "pewter plate with bitumen, exposed it for hours, and washed away the parts the light had not hardened. Louis "
    "Daguerre refined the process with silvered copper plates and mercury vapour, and by 1839 his daguerreotypes "
    "astonished Paris with their detail. Across the Channel, William Henry Fox Talbot invented the calotype, a "
    "paper negative from which many positive prints could be made, which became the basis of photography for the "
    "next century and a half. Glass plates, roll film, colour processes and finally digital sensors followed, each "
    "making pictures cheaper, faster and easier to share than the last. "
)


# ---------------------------------------------------------------- inputs and checkpoints

@dataclass
class Scenario:
    name: str            # row case prefix
    shape: str           # row shape
    ours: dict           # impl label -> smolvlm_fast model (one per --backend)
    theirs: object       # transformers model (None with --no-baseline)
    inputs: dict         # input_ids [1, S], attention_mask, and for the VLM pixel_values, pixel_attention_mask
    eos_token_id: int    # ignored while generating; kept to document what is overridden

    @property
    def prompt_tokens(self) -> int:
        return self.inputs["input_ids"].shape[1]


def chat_prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """A SmolLM2 chat prompt (default system prompt, a user message asking for a summary) of exactly n_tokens."""
    marker = "@@CONTENT@@"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(marker)
    head_ids, tail_ids = tokenizer.encode(head + "Summarize this text.\n\n"), tokenizer.encode(tail)
    budget = n_tokens - len(head_ids) - len(tail_ids)
    if budget < 1:
        raise SystemExit(f"--prompt-tokens {n_tokens} is shorter than the chat template itself")
    body = tokenizer.encode(FILLER)
    body = (body * (budget // len(body) + 1))[:budget]
    return head_ids + body + tail_ids


# --backend choices -> the impl label of their rows
IMPLS = {"torch": "smolvlm_fast", "numpy": "smolvlm_fast (numpy backend)",
         "numpy-int8": "smolvlm_fast (numpy backend, int8 activations)"}


def our_models(cls, path, args, device, dtype) -> dict:
    """{impl label: model} for each --backend: the PyTorch backend in the bench's device and dtype; the PyTorch-free
    backend (CPU, float32 compute; GGUF Q4/Q8 weights stay quantized); the same with its int4 products on int8
    activations (llama.cpp's arithmetic, cpu_decoder.int8_activations_default)."""
    models = {}
    for backend in args.backend:
        kwargs = {"backend": "torch", "device": device, "dtype": dtype} if backend == "torch" else {"backend": "numpy"}
        model = cls.from_pretrained(path, **kwargs)
        if backend == "numpy-int8":
            model.model.int8_activations = True  # read when its C++ decoder is built, at the first step
        models[IMPLS[backend]] = model
    return models


def smollm2_scenario(args, device, dtype) -> Scenario:
    from smolvlm_fast import AutoModelForCausalLM, AutoTokenizer
    from smolvlm_fast.formats.hub import default_model_path

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf)
    ids = torch.tensor([chat_prompt_ids(tokenizer, args.prompt_tokens)])
    ours = our_models(AutoModelForCausalLM, gguf, args, device, dtype)
    theirs = None
    if not args.no_baseline:
        from transformers import LlamaForCausalLM

        theirs = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).to(device).eval()
    return Scenario("smollm2-135m-q4_1", f"batch=1 prompt={ids.shape[1]} new={args.new_tokens}", ours, theirs,
                    {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)},
                    eos_token_id=2)


def smolvlm_checkpoint(text_layers: int, vision_layers: int, seed: int = 0) -> Path:
    """A random-weight SmolVLM-256M-shaped checkpoint in the HF layout, built with transformers once and cached;
    stored in bf16, as the released checkpoints are (a float32 load of it is exact)."""
    from smolvlm_fast.formats.hub import cache_dir

    target = cache_dir() / "bench" / f"smolvlm-256m-random-t{text_layers}-v{vision_layers}-seed{seed}-bf16"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    shapes = SMOLVLM_256M
    config = Idefics3Config(
        text_config={"model_type": "llama", **shapes["text"], "num_hidden_layers": text_layers,
                     "tie_word_embeddings": False, "eos_token_id": END_OF_UTTERANCE, "bos_token_id": IM_START,
                     "pad_token_id": 2},
        vision_config={**shapes["vision"], "num_hidden_layers": vision_layers},
        scale_factor=shapes["scale_factor"], image_token_id=shapes["image_token_id"], tie_word_embeddings=False)
    print(f"building {target.name} (random weights, once) ...", file=sys.stderr)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    model.to(torch.bfloat16).save_pretrained(partial)
    partial.rename(target)
    return target


def smolvlm_inputs(seed: int = 0) -> dict:
    ids = ([IM_START] + USER + [FAKE_AROUND_IMAGE, GLOBAL_IMG] + [IMAGE] * 64 + [FAKE_AROUND_IMAGE] + INSTRUCTION
           + [END_OF_UTTERANCE] + ASSISTANT)
    size = SMOLVLM_256M["vision"]["image_size"]
    pixels = torch.rand(1, 1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # mean=std=0.5
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": pixels, "pixel_attention_mask": torch.ones(1, 1, size, size, dtype=torch.bool)}


def smolvlm_scenario(args, device, dtype) -> Scenario:
    from smolvlm_fast import AutoModelForVision2Seq

    text_layers = args.text_layers or SMOLVLM_256M["text"]["num_hidden_layers"]
    vision_layers = args.vision_layers or SMOLVLM_256M["vision"]["num_hidden_layers"]
    path = smolvlm_checkpoint(text_layers, vision_layers)
    ours = our_models(AutoModelForVision2Seq, path, args, device, dtype)
    theirs = None
    if not args.no_baseline:
        from transformers import Idefics3ForConditionalGeneration

        theirs = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    inputs = {k: v.to(device) for k, v in smolvlm_inputs().items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    layers = "" if (text_layers, vision_layers) == (30, 12) else f" text_layers={text_layers} vision_layers={vision_layers}"
    name = "smolvlm-256m-random" + ("" if not layers else f"-t{text_layers}v{vision_layers}")
    return Scenario(name, f"batch=1 prompt={inputs['input_ids'].shape[1]} image=1x512x512 new={args.new_tokens}{layers}",
                    ours, theirs, inputs, eos_token_id=END_OF_UTTERANCE)


SCENARIOS: dict[str, Callable] = {"smollm2": smollm2_scenario, "smolvlm": smolvlm_scenario}


# ---------------------------------------------------------------- the measured calls

@torch.inference_mode()
def ours_prefill(model, inputs: dict):
    """One forward over the prompt into a fresh paged cache, logits of the last token only (what generate() does)."""
    from smolvlm_fast.config import SamplingParams
    from smolvlm_fast.engine.engine import new_cache, prefill
    from smolvlm_fast.engine.sequence import Request

    m = model.model
    features = None
    if inputs.get("pixel_values") is not None:
        pixels, mask = inputs["pixel_values"], inputs.get("pixel_attention_mask")
        if model.backend == "numpy":
            pixels, mask = pixels.cpu().numpy(), None if mask is None else mask.cpu().numpy()
        features = m.image_features_per_row(pixels, mask)[0]
    request = Request(inputs["input_ids"][0].tolist(), SamplingParams(max_new_tokens=1), features)
    cache, kv_caches = new_cache(m, [len(request.prompt_ids)], model.block_size)
    hidden, meta = prefill(m, cache, kv_caches, [request], [0])
    return m.compute_logits(hidden[meta.last_token_indices])


@torch.inference_mode()
def theirs_prefill(model, inputs: dict):
    return model(**inputs, use_cache=True, logits_to_keep=1).logits


class TokenClock:
    """A streamer (put/end, as generate() calls it) that timestamps every new token; the first put is the prompt."""

    def __init__(self):
        self.prompt_seen, self.times, self.tokens = False, [], []

    def put(self, value):
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(now)
        self.tokens += torch.as_tensor(value).reshape(-1).tolist()

    def end(self):
        pass


def timed_generate(generate: Callable[[TokenClock], object], new_tokens: int) -> tuple[float, float, list[int]]:
    """(time to first token in s, decode tok/s after the first token, the new token ids) of one generate() call."""
    clock = TokenClock()
    start = time.perf_counter()
    generate(clock)
    if len(clock.tokens) != new_tokens:
        raise RuntimeError(f"generate() made {len(clock.tokens)} tokens, expected {new_tokens} (was eos ignored?)")
    return clock.times[0] - start, (new_tokens - 1) / (clock.times[-1] - clock.times[0]), clock.tokens


def ours_generate(model, inputs: dict, new_tokens: int):
    # eos_token_id=[]: no stop token, so exactly new_tokens tokens.
    return lambda clock: model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                                        streamer=clock)


def theirs_generate(model, inputs: dict, new_tokens: int):
    # min_new_tokens=max_new_tokens: transformers masks eos until the last token, so it also makes exactly new_tokens.
    return lambda clock: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, streamer=clock, pad_token_id=0)


# ---------------------------------------------------------------- running a scenario

def measure(s: Scenario, args, device) -> tuple[dict[str, dict[str, list[float]]], bool]:
    """({impl label | "theirs": {"prefill": [tok/s], "decode": [tok/s], "ttft": [ms]}}, whether the samples are
    unreliable).

    A round times every implementation once, alternating who goes first. A round during which other processes
    took more than --max-contention of the CPU is discarded and run again (up to 3 x --repeats rounds in all).
    """
    impls = {label: (model, ours_prefill, ours_generate) for label, model in s.ours.items()}
    if s.theirs is not None:
        impls["theirs"] = (s.theirs, theirs_prefill, theirs_generate)
    for model, prefill, generate in impls.values():
        for _ in range(args.warmup):
            prefill(model, s.inputs)
            timed_generate(generate(model, s.inputs, args.new_tokens), args.new_tokens)
    tokens = {}

    def one(k: str) -> tuple[float, float, float]:
        model, prefill, generate = impls[k]
        seconds = time_call(lambda: prefill(model, s.inputs), device)
        ttft, decode, tokens[k] = timed_generate(generate(model, s.inputs, args.new_tokens), args.new_tokens)
        return s.prompt_tokens / seconds, decode, ttft * 1e3

    rounds, unreliable = clean_rounds(list(impls), one, args.repeats, args, s.name)
    samples = {k: {phase: [r[k][i] for r in rounds] for i, phase in enumerate(("prefill", "decode", "ttft"))}
               for k in impls}
    for label in s.ours if "theirs" in tokens else ():
        same = next((i for i, (a, b) in enumerate(zip(tokens[label], tokens["theirs"])) if a != b), len(tokens[label]))
        print(f"{s.name}: {label}: greedy tokens agree with transformers for {same}/{args.new_tokens}",
              file=sys.stderr)
    return samples, unreliable


def run_scenario(name: str, args, device, dtype) -> list[dict]:
    s = SCENARIOS[name](args, device, dtype)
    samples, busy = measure(s, args, device)
    if args.profile:
        profile_decode(s, args)
    rows = []
    for label in s.ours:
        for phase, metric in (("prefill", "tok/s"), ("decode", "tok/s"), ("ttft", "ms")):
            theirs = samples.get("theirs", {}).get(phase)
            row = make_row(bench=BENCH, case=f"{s.name}/{phase}", shape=s.shape,
                           dtype=str(dtype).removeprefix("torch."), device=device, metric=metric,
                           ours=samples[label][phase], baseline=BASELINE if theirs else None, theirs=theirs, impl=label)
            print(format_row(row), flush=True)
            if not (args.no_save or busy):
                append_row(BENCH, row, args.results_dir)
            rows.append(row)
    return rows


class ProfilerClock(TokenClock):
    """A TokenClock that also advances a torch.profiler schedule: one profiler step per new token."""

    def __init__(self, prof):
        super().__init__()
        self.prof = prof

    def put(self, value):
        super().put(value)
        self.prof.step()


def profile_decode(s: Scenario, args) -> None:
    """Decode steps only (prefill and the first steps skipped) under torch.profiler, ours and transformers:
    the ops with the most self time per step (run with --profile)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available() and s.inputs["input_ids"].is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    steps = args.new_tokens - 3  # puts: the prompt, then one per token; skip setup, prefill and one warm-up step
    impls = {label: (model, ours_generate) for label, model in s.ours.items()}
    impls |= {BASELINE: (s.theirs, theirs_generate)} if s.theirs else {}
    for name, (model, generate) in impls.items():
        with profile(activities=activities, record_shapes=True,
                     schedule=schedule(wait=2, warmup=1, active=steps)) as prof:
            generate(model, s.inputs, args.new_tokens)(ProfilerClock(prof))
        def top(events, n):
            events = [e for e in events if not e.key.startswith("ProfilerStep")]
            return sorted(events, key=lambda e: -getattr(e, key))[:n], events

        rows, events = top(prof.key_averages(), args.profile_rows)
        print(f"--- {s.name} decode, {name}: {sum(getattr(e, key) for e in events) / steps / 1e3:.2f} ms of op self "
              f"time per step, {sum(e.count for e in events) / steps:.0f} op calls per step", file=sys.stderr)
        for e in rows:
            print(f"  {getattr(e, key) / steps / 1e3:8.3f} ms {e.count / steps:6.1f} calls  {e.key}", file=sys.stderr)
        print("  by input shape:", file=sys.stderr)
        for e in top(prof.key_averages(group_by_input_shape=True), 6)[0]:
            print(f"  {getattr(e, key) / steps / 1e3:8.3f} ms {e.count / steps:6.1f} calls  {e.key} "
                  f"{str(e.input_shapes)[:80]}", file=sys.stderr)


def parse_args(argv=None):
    p = bench_parser(__doc__)
    add_model_run_options(p)
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    p.add_argument("--backend", nargs="+", choices=list(IMPLS), default=["torch"],
                   help="ours, measured in the same rounds: the PyTorch path (default), the PyTorch-free NumPy + C++ "
                        "path (CPU only), and that path with int8 activations for its int4 products")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run, eos ignored (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="smollm2 prompt length (default 512)")
    p.add_argument("--text-layers", type=int, default=None, help="smolvlm decoder layers (default 30, as released)")
    p.add_argument("--vision-layers", type=int, default=None, help="smolvlm encoder layers (default 12, as released)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the decode steps, ours and transformers (torch.profiler), and print the top ops")
    p.add_argument("--profile-rows", type=int, default=15, help="ops listed per profile (default 15)")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("--new-tokens must be >= 2, --repeats >= 1, --warmup >= 0")
    if args.profile and args.new_tokens < 8:
        p.error("--profile needs --new-tokens >= 8")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.common import device_name

    print(f"# {device_name(device)}, {dtype}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    for name in (SCENARIOS if args.scenario == "all" else [args.scenario]):
        run_scenario(name, args, device, dtype)


if __name__ == "__main__":
    main()
