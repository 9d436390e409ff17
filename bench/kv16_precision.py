"""What a 16-bit KV cache costs in accuracy: float16 vs bfloat16 against float32, measured, to choose between them.

For a model (the real SmolLM2-135M-Instruct GGUF, SmolVLM-256M's text decoder's twin; or the random-weight
SmolVLM-256M-shaped int4 decoder of bench_kv16.py) it runs the NumPy free-function decoder three times over the same
long prompt: K/V kept in float32, and rounded to float16 / bfloat16 on their way into the cache. It reports
- the largest |K| (after RoPE) and |V| the cache receives, per layer's maximum (float16 overflows past 65504);
- teacher-forced on float32's greedy tokens: max |logits - logits_f32| / max |logits_f32| over the decode steps, and
  how many steps pick float32's token;
- free-running greedy: how many tokens equal float32's before the first difference.

    python bench/kv16_precision.py --model real --prompt 1088 --tokens 32
    python bench/kv16_precision.py --model random --prompt 1088 --tokens 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smolvlm_fast.engine.cache import PagedCache, schedule_step  # noqa: E402
from smolvlm_fast.models import smolvlm_numpy  # noqa: E402
from smolvlm_fast.models.smolvlm_numpy import NumpyModel  # noqa: E402


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32 (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


ROUNDINGS = {"float32": lambda x: x, "float16": lambda x: x.astype(np.float16).astype(np.float32),
             "bfloat16": round_bf16}


class Rounded:
    """write_kv_cache that rounds K/V first and records the largest |K|, |V| written."""

    def __init__(self, rounding):
        self.rounding, self.k_max, self.v_max = rounding, 0.0, 0.0
        self.write = smolvlm_numpy.write_kv_cache

    def __call__(self, k, v, k_cache, v_cache, slot_mapping, **kw):
        self.k_max, self.v_max = max(self.k_max, float(np.abs(k).max())), max(self.v_max, float(np.abs(v).max()))
        self.write(self.rounding(k), self.rounding(v), k_cache, v_cache, slot_mapping, **kw)


def run(model, prompt, tokens, forced=None, block_size=16):
    """Greedy decode (or teacher-forced on `forced`): (logits [tokens, V], tokens)."""
    blocks = (len(prompt) + tokens) // block_size + 2
    cache, kv = PagedCache(num_blocks=blocks, block_size=block_size), model.allocate_kv_cache(blocks, block_size)
    logits = model.compute_logits(model.forward(np.array(prompt), schedule_step(cache, {0: len(prompt)}), kv)[-1:])
    rows, out = [logits[0]], [int(logits[0].argmax())]
    for i in range(tokens - 1):
        last = out[-1] if forced is None else forced[i]
        logits = model.compute_logits(model.forward(np.array([last]), schedule_step(cache, {0: 1}), kv))
        rows.append(logits[0])
        out.append(int(logits[0].argmax()))
    return np.stack(rows), out


def load(which: str, layers: int):
    if which == "real":
        from smolvlm_fast import AutoTokenizer
        from smolvlm_fast.formats.hub import default_model_path
        path = default_model_path()
        model = NumpyModel.from_checkpoint(path, fused=False)
        text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        ids = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(text)["input_ids"]
        return model, list(ids)
    from bench_kv16 import random_model

    from smolvlm_fast.cpu.weights import quantize_weights
    config, weights = random_model(layers)
    weights = quantize_weights(weights, config, "int4")
    ids = np.random.default_rng(1).integers(3, config.text.vocab_size, 1 << 14).tolist()
    return NumpyModel(config, weights, fused=False), ids


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["real", "random"], default="real")
    p.add_argument("--prompt", type=int, default=1088)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=30, help="random model's layers")
    args = p.parse_args(argv)
    model, ids = load(args.model, args.layers)
    prompt = ids[:args.prompt]
    ref_logits = ref_tokens = None
    for name, rounding in ROUNDINGS.items():
        hook = Rounded(rounding)
        smolvlm_numpy.write_kv_cache = hook
        try:
            free_logits, free_tokens = run(model, prompt, args.tokens)
            if ref_logits is None:
                ref_logits, ref_tokens = free_logits, free_tokens
                print(f"{args.model}: prompt {len(prompt)}, {args.tokens} tokens; max |K| {hook.k_max:.1f}, "
                      f"max |V| {hook.v_max:.1f} (float16 max 65504)")
                continue
            forced_logits, forced_tokens = run(model, prompt, args.tokens, forced=ref_tokens)
        finally:
            smolvlm_numpy.write_kv_cache = hook.write
        rel = np.abs(forced_logits - ref_logits).max() / np.abs(ref_logits).max()
        same = sum(a == b for a, b in zip(forced_tokens, ref_tokens))
        first = next((i for i, (a, b) in enumerate(zip(free_tokens, ref_tokens)) if a != b), len(ref_tokens))
        print(f"  {name:>8}: logits rel. error {rel:.2e}; teacher-forced top-1 = float32's {same}/{len(ref_tokens)}; "
              f"free-running equal for the first {first}/{len(ref_tokens)} tokens")


if __name__ == "__main__":
    main()
