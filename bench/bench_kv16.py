"""Decode speed after a long prompt on the NumPy + C++ path, by how the decoder holds its weights and its KV cache,
same run: a SmolVLM-256M-shaped text decoder (30 layers, hidden 576, 9 / 3 heads of 64; random weights) with its
linear layers int4 and LM head Q8_0 (quantize="int4"), in packed bf16 (precision "bfloat16", what a released bf16
SmolVLM checkpoint gets) or float32, each with a float32 and/or float16 KV cache; or (--model real)
SmolLM2-135M-Instruct's Q4_1 GGUF (the same decoder shape, a Q8_0 head).

    python bench/bench_kv16.py --prompt 1088 --short 8 --tokens 64 --repeats 3
    python bench/bench_kv16.py --weights int4,bf16,float32 --kv-dtypes float16

Prints per variant and prompt length: decode tokens/s as 1 / the median step time and 1 / its 10th percentile
(each step a forward, the LM head and an argmax; --repeats rounds of --tokens steps, interleaved over the cases:
on a shared machine other processes take a core now and then, and the 10th percentile is what a step costs
when they do not), the prefill time, and how many greedy tokens equal the first variant's. The long prompt's step
minus the short one's is what the context costs (mostly attention reading the cache); --profile splits a step
into the decoder layers, the attention kernel alone and the LM head. No model hub, no PyTorch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smolvlm_fast.config import ModelConfig  # noqa: E402
from smolvlm_fast.cpu.weights import quantize_weights  # noqa: E402
from smolvlm_fast.engine.cache import PagedCache, schedule_step  # noqa: E402
from smolvlm_fast.formats.layout import tensor_shapes  # noqa: E402
from smolvlm_fast.models.smolvlm_numpy import NumpyModel  # noqa: E402

# SmolVLM-256M-Instruct's text decoder (its config.json's text_config)
SMOLVLM_256M_TEXT = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49280,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                     "tie_word_embeddings": False}


def random_model(layers: int, seed: int = 0, std: float = 0.02) -> tuple[ModelConfig, dict]:
    """The decoder with N(0, std) weights (norms 1 + N(0, std)), float32."""
    config = ModelConfig.from_dict(dict(SMOLVLM_256M_TEXT, num_hidden_layers=layers))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in tensor_shapes(config).items():
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        weights[name] = w + 1 if name.endswith("norm.weight") else w
    return config, weights


# --weights: how a variant holds the decoder (of the random model; the real GGUF is as it is)
# name: (precision, int4 linears, int8 activations in the int4 products)
WEIGHTS = {"int4": ("float32", True, False), "int4-i8": ("float32", True, True), "bf16": ("bfloat16", False, False),
           "float32": ("float32", False, False)}


def generate(model: NumpyModel, prompt: list[int], tokens: int, block_size: int = 16):
    """Prefill the prompt, then decode greedily; returns (prefill s, [decode step s], tokens)."""
    blocks = (len(prompt) + tokens) // block_size + 2
    cache = PagedCache(num_blocks=blocks, block_size=block_size)
    kv = model.allocate_kv_cache(blocks, block_size)
    t0 = time.perf_counter()
    meta = schedule_step(cache, {0: len(prompt)})
    last = int(model.compute_logits(model.forward(np.array(prompt), meta, kv)[-1:])[0].argmax())
    prefill = time.perf_counter() - t0
    steps, out = [], [last]
    for _ in range(tokens):
        t0 = time.perf_counter()
        meta = schedule_step(cache, {0: 1})
        last = int(model.compute_logits(model.forward(np.array([last]), meta, kv))[0].argmax())
        steps.append(time.perf_counter() - t0)
        out.append(last)
    return prefill, steps, out


def profile(model: NumpyModel, prompt: list[int], steps: int, block_size: int = 16) -> str:
    """Median ms of a decode step's parts after the prompt: the decoder layers (forward), the LM head, and the
    attention kernel alone over every layer's cache as the step calls it (one query, seq_len keys; after the LM
    head, so the cache comes from memory, as in a step)."""
    from smolvlm_fast.cpu.native import _cpu
    t = model.config.text
    blocks = (len(prompt) + steps) // block_size + 2
    cache, kv = PagedCache(num_blocks=blocks, block_size=block_size), model.allocate_kv_cache(blocks, block_size)
    model.forward(np.array(prompt), schedule_step(cache, {0: len(prompt)}), kv)
    q = np.random.default_rng(0).standard_normal((1, t.num_attention_heads, t.head_dim), dtype=np.float32)
    out, times = np.empty_like(q), []
    for _ in range(steps):
        meta = schedule_step(cache, {0: 1})
        t0 = time.perf_counter()
        hidden = model.forward(np.array([5]), meta, kv)
        t1 = time.perf_counter()
        model.compute_logits(hidden)
        t2 = time.perf_counter()
        tables, lens = (np.ascontiguousarray(a, dtype=np.int32) for a in (meta.block_tables, meta.seq_lens))
        for k, v in kv:
            _cpu.paged_decode_attention(q, k, v, tables, lens, t.head_dim**-0.5, out)
        times.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    fwd, head, attn = (1e3 * np.median(x) for x in zip(*times))
    return f"forward {fwd:.2f} ms (attention alone {attn:.2f}), LM head {head:.2f}"


def real_model():
    from smolvlm_fast.formats.hub import default_model_path
    from smolvlm_fast.cpu.weights import load_gguf_weights
    return load_gguf_weights(default_model_path())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "real"], default="random")
    p.add_argument("--prompt", type=int, default=1088, help="prompt tokens (1,088: SmolVLM-256M's image prompt)")
    p.add_argument("--short", type=int, default=0, help="also a prompt this long (the text-only case); 0: not")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-dtypes", default="float32,float16")
    p.add_argument("--weights", default="int4", help="comma list of int4 (linears int4, LM head Q8_0), int4-i8 (the same, "
                   "x rounded to int8 in the int4 products), bf16 "
                   "(precision bfloat16: packed bf16 weights), float32; each with each --kv-dtypes")
    p.add_argument("--profile", action="store_true", help="also a step's parts (profile()) per dtype and length")
    args = p.parse_args(argv)
    config, weights = random_model(args.layers) if args.model == "random" else real_model()
    prompt = np.random.default_rng(1).integers(3, config.text.vocab_size, args.prompt).tolist()
    lengths = [args.prompt] + ([args.short] if args.short else [])
    reference = {}
    models = {}
    for kind in args.weights.split(","):
        precision, quantize, int8 = WEIGHTS[kind]
        held = quantize_weights(weights, config, "int4") if quantize and args.model == "random" else weights
        for kv_dtype in args.kv_dtypes.split(","):
            models[f"{kind}/{kv_dtype}"] = NumpyModel(config, held, precision=precision, kv_dtype=kv_dtype,
                                                       int8_activations=int8)
    results = {(d, n): ([], [], [0]) for d in models for n in lengths}  # step times, prefill times, [agreeing]
    for _ in range(args.repeats):  # rounds interleaved, so that a busy moment of the machine hits every case
        for n in lengths:
            for kv_dtype, model in models.items():
                prefill, steps, out = generate(model, prompt[:n], args.tokens)
                results[kv_dtype, n][0].extend(steps)
                results[kv_dtype, n][1].append(prefill)
                results[kv_dtype, n][2][0] = sum(a == b for a, b in zip(out, reference.setdefault(n, out)))
    if args.profile:
        for _ in range(2):  # twice: a busy moment shows as a disagreement
            for n in lengths:
                for kv_dtype, model in models.items():
                    print(f"profile {kv_dtype:>13} prompt {n:5d}: {profile(model, prompt[:n], args.tokens)}",
                          flush=True)
    for (kv_dtype, n), (steps, prefills, (same,)) in results.items():
        p10, median = np.percentile(steps, [10, 50])
        print(f"{args.model} {kv_dtype:>13} prompt {n:5d}: decode {1 / median:6.1f} tok/s (median step), "
              f"{1 / p10:6.1f} (10th percentile) over {len(steps)} steps; "
              f"prefill {min(prefills):.2f} s; greedy tokens equal to the first variant's: {same}/{args.tokens + 1}",
              flush=True)


if __name__ == "__main__":
    main()
