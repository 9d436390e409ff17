"""The SigLIP vision encoder on the CPU: ours (fused C++, bf16 products; and the float32 NumPy path) against
transformers' own vision tower in bfloat16 and float32, same weights, same pixels, same run, rounds interleaved.

A SmolVLM-256M-shaped tower (hidden 768, 12 layers, 12 heads, MLP 3072, 512x512 tiles of 16x16 patches: 1,024
patches a tile, ~212 GFLOP a tile) with random weights, built with transformers; --tiles 17 is what one 512x512
image costs with the processor's default splitting. Also prints each implementation's max error against
transformers float32 (relative to the output's largest value).

    python bench/bench_vision_cpu.py                      # 1 tile, 3 rounds
    python bench/bench_vision_cpu.py --tiles 17 --repeats 1 --skip-float32
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
import torch

from bench.common import append_row, bench_parser, format_row, make_row

BENCH = "bench_vision_cpu"


def build_tower(layers: int):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    vision = dict(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                  image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Idefics3VisionTransformer(Idefics3Config(vision_config=vision).vision_config).eval()
    weights = {"model.vision_model." + k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return model, weights


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--tiles", type=int, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-float32", action="store_true", help="leave out both float32 implementations (slow)")
    args = p.parse_args()
    from smolvlm_fast.config import VisionConfig
    from smolvlm_fast.cpu.linear import get_num_threads
    from smolvlm_fast.models import vision_numpy

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model, w = build_tower(args.layers)
    cfg = VisionConfig(768, 3072, args.layers, 12, 512, 16)
    pixels = torch.rand(args.tiles, 3, 512, 512) * 2 - 1
    mask = np.ones((args.tiles, 32, 32), dtype=bool)
    bf16_model = build_tower(args.layers)[0].to(torch.bfloat16)

    def transformers_run(m, dtype):
        with torch.inference_mode():
            return m(pixel_values=pixels.to(dtype)).last_hidden_state.float().numpy()

    impls = {"ours bf16 (fused C++)": lambda: vision_numpy.vision_encoder(w, cfg, pixels.numpy(), mask,
                                                                           precision="bfloat16"),
             "transformers bf16": lambda: transformers_run(bf16_model, torch.bfloat16)}
    if not args.skip_float32:
        impls["ours float32"] = lambda: vision_numpy.vision_encoder(w, cfg, pixels.numpy(), mask)
        impls["transformers float32"] = lambda: transformers_run(model, torch.float32)
    outputs = {name: fn() for name, fn in impls.items()}  # warm-up (packing, first-call costs)
    times = {name: [] for name in impls}
    for r in range(args.repeats):
        for name in (list(impls) if r % 2 == 0 else list(reversed(impls))):  # who goes first alternates
            t0 = time.perf_counter()
            impls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ref = outputs.get("transformers float32")
    shape = f"tiles={args.tiles} layers={args.layers} patches=1024 hidden=768"
    print(f"threads: ours {get_num_threads()}, torch {torch.get_num_threads()}")
    for name in impls:
        if ref is not None:
            print(f"{name}: max error vs transformers float32 {np.abs(outputs[name] - ref).max() / np.abs(ref).max():.2e}")
        if name.startswith("transformers"):
            continue
        dtype, base = ("bfloat16", "transformers bf16") if "bf16" in name else ("float32", "transformers float32")
        row = make_row(bench=BENCH, case=f"siglip-256m/{args.tiles}-tile", shape=shape, dtype=dtype, device="cpu",
                       metric="ms", ours=times[name], baseline=base, theirs=times[base], impl=f"smolvlm_fast {name}")
        print(format_row(row))
        if not args.no_save:
            append_row(BENCH, row, args.results_dir)


if __name__ == "__main__":
    main()
