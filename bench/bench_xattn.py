"""The factorized variant (docs/xattn.md) next to the released SmolVLM architecture of similar size, on our engine.

Both models have random weights and the SmolVLM-256M text decoder's shape (576 hidden, 30 layers, 9 over 3 heads,
vocabulary 49280); the variant adds a gated cross-attention layer after every 6th decoder layer and takes one
224x224 image through a ViT-lite encoder (768 hidden, 12 layers, dwsep patch stem, 16x16 patches, pixel shuffle 2:
49 image tokens, attended to instead of spliced into the prompt); the baseline is SmolVLM-256M as released (512x512
image unsplit, 64 image tokens spliced in). Per backend (--backend), in the same run, alternating who goes first:
  prefill  ms for the image (vision encoder, and for the variant its cross-attention K/V) plus the prompt, into a
           fresh paged cache, logits of the last token (the time to the first token);
  decode   tok/s of greedy generate() after the first token, eos ignored.
Rows go to bench/results/bench_xattn.jsonl; the baseline is the SmolVLM-256M architecture on the same backend.

    python bench/bench_xattn.py --backend torch numpy --text-arch phi llama
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
import torch

from bench.bench_e2e import IMPLS, SMOLVLM_256M, our_models, smolvlm_checkpoint, smolvlm_inputs, timed_generate
from bench.common import (CpuContention, add_model_run_options, append_row, bench_parser, format_row, make_row,
                          time_call)

BENCH = "bench_xattn"
BASELINE = "SmolVLM-256M architecture (smolvlm_fast, same backend)"


def variant_config(text_arch: str, text_layers: int, vision_layers: int) -> dict:
    text = SMOLVLM_256M["text"]
    return {"model_type": "smolvlm_fast_xattn",
            "vision_config": {"image_size": 224, "patch_size": 16, "patch_stem": "dwsep", "hidden_size": 768,
                              "intermediate_size": 3072, "num_hidden_layers": vision_layers,
                              "num_attention_heads": 12},
            "text_config": {**text, "architecture": text_arch, "num_hidden_layers": text_layers,
                            "partial_rotary_factor": 0.5, "tie_word_embeddings": False,
                            **({"hidden_act": "gelu_new"} if text_arch == "phi" else {})},
            "cross_attention_layers": list(range(5, text_layers, 6)) or [text_layers - 1],
            "scale_factor": 2, "image_token_id": 49190, "eos_token_id": 49279}


def variant_checkpoint(text_arch: str, text_layers: int, vision_layers: int) -> Path:
    from smolvlm_fast import init_random
    from smolvlm_fast.formats.hub import cache_dir

    target = cache_dir() / "bench" / f"xattn-{text_arch}-t{text_layers}-v{vision_layers}"
    if not (target / "model.safetensors").exists():
        print(f"writing {target.name} (random weights, once) ...", file=sys.stderr)
        init_random(variant_config(text_arch, text_layers, vision_layers), target, seed=0)
    return target


def variant_inputs(path: Path, backend: str) -> dict:
    from PIL import Image

    from smolvlm_fast import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    return dict(processor(text=text, images=[image], return_tensors="pt" if backend == "torch" else "np"))


def prefill_ms(model, inputs: dict) -> float:
    """One prefill of image + prompt into a fresh cache (what generate() does before its first token), in ms."""
    from smolvlm_fast.config import SamplingParams
    from smolvlm_fast.engine.sequence import Request
    from smolvlm_fast.engine.engine import new_cache, prefill

    def run():
        with torch.inference_mode():
            m = model.model
            features = m.image_features_per_row(inputs["pixel_values"], inputs.get("pixel_attention_mask"))[0]
            request = Request(list(np.asarray(inputs["input_ids"][0]).tolist()), SamplingParams(max_new_tokens=1),
                              features)
            cache, kv_caches = new_cache(m, [len(request.prompt_ids)], model.block_size)
            hidden, meta = prefill(m, cache, kv_caches, [request], [0])
            return m.compute_logits(hidden[meta.last_token_indices])

    return time_call(run) * 1e3


def decode_rate(model, inputs: dict, new_tokens: int) -> float:
    generate = lambda clock: model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                                            streamer=clock)
    return timed_generate(generate, new_tokens)[1]


def run_backend(backend: str, text_arch: str, args) -> list[dict]:
    from smolvlm_fast import AutoModelForVision2Seq

    args.backend = [backend]
    variant_path = variant_checkpoint(text_arch, args.text_layers, args.vision_layers)
    models = {"variant": our_models(AutoModelForVision2Seq, variant_path, args, "cpu", torch.float32)[IMPLS[backend]],
              "baseline": our_models(AutoModelForVision2Seq, smolvlm_checkpoint(args.text_layers, args.vision_layers),
                                     args, "cpu", torch.float32)[IMPLS[backend]]}
    base_inputs = smolvlm_inputs()
    if backend != "torch":
        base_inputs = {k: v.numpy() for k, v in base_inputs.items()}
    inputs = {"variant": variant_inputs(variant_path, backend), "baseline": base_inputs}
    for key in models:  # warm-up
        prefill_ms(models[key], inputs[key])
        decode_rate(models[key], inputs[key], 4)
    samples = {k: {"prefill": [], "decode": []} for k in models}
    rounds = 0
    while len(samples["variant"]["prefill"]) < args.repeats and rounds < 3 * args.repeats:
        rounds += 1
        with CpuContention() as contention:
            result = {k: (prefill_ms(models[k], inputs[k]), decode_rate(models[k], inputs[k], args.new_tokens))
                      for k in (list(models) if rounds % 2 else list(reversed(models)))}
        if contention.others is not None and contention.others > args.max_contention:
            continue
        for k, (p, d) in result.items():
            samples[k]["prefill"].append(p)
            samples[k]["decode"].append(d)
    rows = []
    n_text = len(np.asarray(inputs["variant"]["input_ids"][0]))
    shape = (f"batch=1 image=1x224x224 (49 tokens, cross-attended) prompt={n_text} new={args.new_tokens} "
             f"text={text_arch} layers={args.text_layers} vision_layers={args.vision_layers}")
    for phase, metric in (("prefill", "ms"), ("decode", "tok/s")):
        row = make_row(bench=BENCH, case=f"xattn-{text_arch}/{phase}", shape=shape, dtype="float32", device="cpu",
                       metric=metric, ours=samples["variant"][phase], baseline=BASELINE,
                       theirs=samples["baseline"][phase], impl=IMPLS[backend])
        print(format_row(row), flush=True)
        if not args.no_save and len(samples["variant"][phase]) == args.repeats:
            append_row(BENCH, row, args.results_dir)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = bench_parser(__doc__)
    add_model_run_options(p)
    p.add_argument("--backend", nargs="+", choices=["torch", "numpy"], default=["torch", "numpy"])
    p.add_argument("--text-arch", nargs="+", choices=["phi", "llama"], default=["phi", "llama"])
    p.add_argument("--text-layers", type=int, default=30)
    p.add_argument("--vision-layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="a bring-up run's smoke numbers: the torch backend, llama, "
                   "4 text and 2 vision layers, 8 new tokens, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.backend, args.text_arch, args.text_layers, args.vision_layers = ["torch"], ["llama"], 4, 2
        args.new_tokens, args.repeats = 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    for backend in list(args.backend):
        for arch in args.text_arch:
            run_backend(backend, arch, args)


if __name__ == "__main__":
    main()
