"""Decode with CUDA graphs against the same engine without them, same model, same requests, same run (GPU only).

A random-weight decoder of SmolVLM-256M-Instruct's text shape (30 layers, hidden 576, 9/3 heads, vocab 49,280;
the decode step is a few hundred small launches, where graphs help most) in bfloat16 on CUDA. Per batch size it
runs `--batch` greedy requests of `--prompt` tokens and `--new-tokens` new tokens through one Engine, eagerly
and with cuda_graphs=True (after a warm-up run that captures the graphs), and reports decode tokens/s (all
sequences' new tokens after the first, over the time from the first decode step to the last), eager as the
baseline, rounds interleaved.

    python bench/bench_cuda_graphs.py                   # batch 1, 8 and 32
    python bench/bench_cuda_graphs.py --batch 1 --new-tokens 32 --repeats 2
    python bench/bench_cuda_graphs.py --quick           # the bring-up's smoke run (bench/gpu_check.py)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

from bench.common import bench_parser, gpu_skipped, make_row, report

BENCH = "bench_cuda_graphs"
# SmolVLM-256M-Instruct's text model as released (its config.json on the Hugging Face Hub).
TEXT_256M = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49280,
             "rope_theta": 100000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True}


def random_model(layers: int):
    """The decoder with N(0, 0.02) weights and unit norms, built on the GPU (no checkpoint file)."""
    from smolvlm_fast.config import ModelConfig
    from smolvlm_fast.models.smolvlm_torch import SmolVLM

    model = SmolVLM(ModelConfig.from_dict({**TEXT_256M, "num_hidden_layers": layers}))
    model = model.to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm") or "layernorm" in name else 0.02 * torch.randn_like(p))
    return model


def new_engine(model, batch: int, prompt: int, new_tokens: int, graphs: bool):
    """An Engine for rounds of `batch` requests (kept across rounds: its graphs are captured once)."""
    from smolvlm_fast.engine.engine import Engine

    blocks = batch * (-(-(prompt + new_tokens) // 16) + 1)
    return Engine(model, num_blocks=blocks, block_size=16, max_num_batched_tokens=batch * prompt,
                  max_num_seqs=batch, enable_prefix_caching=False, cuda_graphs=graphs)


def decode_rate(engine, batch: int, prompt: int, new_tokens: int) -> float:
    """Decode tokens/s of one round of `batch` requests through the engine."""
    from smolvlm_fast import SamplingParams
    from smolvlm_fast.engine.sequence import Request

    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        ids = torch.randint(3, TEXT_256M["vocab_size"], (prompt,), generator=gen).tolist()
        engine.add_request(Request(ids, SamplingParams(max_new_tokens=new_tokens)))
    replays = engine.stats.graph_replays
    with torch.inference_mode():
        engine.step()  # the prefill step (and each sequence's first token)
        torch.cuda.synchronize()
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if engine.graphs is not None and engine.stats.graph_replays - replays != steps:
        raise RuntimeError("a decode step ran eagerly under CUDA graphs")
    return batch * steps / seconds


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=TEXT_256M["num_hidden_layers"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch 1 and 8, 32 new tokens, 2 rounds")
    args = p.parse_args(argv)
    if gpu_skipped(BENCH):
        return 0
    if args.quick:
        args.batch, args.new_tokens, args.repeats = [1, 8], 32, 2
    torch.manual_seed(0)
    model = random_model(args.layers)
    for batch in args.batch:
        engines = {graphs: new_engine(model, batch, args.prompt, args.new_tokens, graphs) for graphs in (False, True)}
        for engine in engines.values():  # warm-up: Triton compiles and tunes, the graphs are captured
            decode_rate(engine, batch, args.prompt, args.new_tokens)
        rates = {False: [], True: []}
        for _ in range(args.repeats):
            for graphs, engine in engines.items():
                rates[graphs].append(decode_rate(engine, batch, args.prompt, args.new_tokens))
        del engines
        row = make_row(bench=BENCH, case=f"decode batch {batch}", shape=f"prompt {args.prompt}, "
                       f"{args.new_tokens} new, {args.layers} layers", dtype="bfloat16", device="cuda",
                       metric="tok/s", ours=rates[True], baseline="eager", theirs=rates[False], impl="cuda_graphs")
        report(BENCH, row, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
