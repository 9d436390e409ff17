"""CUDA graphs for decode (models/decode_graphs.py). On the CPU the graphs are stood in for by `eager_capture`,
which re-runs the recorded call on the same static buffers: that checks what the graphs add to a step (padding to
a bucket, one buffer of inputs, the fixed-width block tables, the length buckets' max_seq_len) against the eager
engine, token for token. The real capture and replay run in the `gpu`-marked tests at the end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smolvlm_fast import InputError, SamplingParams
from smolvlm_fast.engine.engine import Engine
from smolvlm_fast.engine.sequence import Request
from smolvlm_fast.models import decode_graphs
from smolvlm_fast.models.decode_graphs import (DecodeGraphs, StaticStep, batch_buckets, eager_capture,
                                               graphs_wanted, length_buckets)
from smolvlm_fast.serving.llm import LLM

from .test_llm import chat, picture


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(3) == (1, 2, 3)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert length_buckets(100) == (100,)
    assert length_buckets(256) == (256,)
    assert length_buckets(8192) == (256, 512, 1024, 2048, 4096, 8192)
    assert length_buckets(3000) == (256, 512, 1024, 2048, 3000)


def test_switch(monkeypatch):
    monkeypatch.delenv(decode_graphs.GRAPHS_ENV, raising=False)
    assert graphs_wanted(None) is False and graphs_wanted(True) is True
    monkeypatch.setenv(decode_graphs.GRAPHS_ENV, "1")
    assert graphs_wanted(None) is True and graphs_wanted(False) is False
    monkeypatch.setenv(decode_graphs.GRAPHS_ENV, "yes")
    with pytest.raises(InputError, match="SMOLVLM_FAST_CUDA_GRAPHS='yes'"):
        graphs_wanted(None)


def torch_model(path):
    from smolvlm_fast import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, device="cpu", dtype="float32", backend="torch").model


def run(model, requests, graphs: bool, max_num_seqs: int = 8, block_size: int = 4):
    """Every request through one engine (eagerly, or with its decode steps through stand-in graphs)."""
    engine = Engine(model, num_blocks=256, block_size=block_size, max_num_batched_tokens=64,
                    max_num_seqs=max_num_seqs, cuda_graphs=False)
    if graphs:
        engine.graphs = DecodeGraphs(model, engine.kv_caches, block_size=block_size, max_batch=max_num_seqs,
                                     capture=eager_capture)
    seqs = [engine.add_request(r) for r in requests]
    with torch.inference_mode():
        while engine.has_unfinished():
            engine.step()
    return [s.output_ids for s in seqs], engine


def requests_of(lengths, seed, max_new_tokens=14):
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(3, 300, n).tolist(), SamplingParams(max_new_tokens=max_new_tokens))
            for n in lengths]


@pytest.mark.parametrize("lengths", [[5], [3, 9, 17], [4, 4, 30, 7, 2, 11]], ids=["one", "three", "six"])
def test_graphed_decode_equals_eager(tiny_llama, lengths, seed):
    """Batches of 1, 3 (padded to 4) and 6 (padded to 8), requests finishing at different steps (so the batch
    shrinks across buckets), sequences crossing block edges; every decode step replayed."""
    model = torch_model(tiny_llama)
    requests = requests_of(lengths, seed)
    requests[0].params = SamplingParams(max_new_tokens=5)  # leaves early: the batch moves down a bucket
    eager, _ = run(model, requests, graphs=False)
    graphed, engine = run(model, requests, graphs=True)
    assert graphed == eager, f"seed {seed}"
    assert engine.stats.graph_replays == engine.stats.steps - 1  # every step after the one prefill step
    full = next(b for b in batch_buckets(8) if b >= len(lengths))  # the whole batch's bucket, padding included
    assert (full, 256) in engine.graphs.graphs and all(b <= full for b, _ in engine.graphs.graphs)


def test_planted_padding_bug_is_caught(tiny_llama, seed, monkeypatch):
    """A padding row that writes its K/V into slot 0 (the first token of the first sequence's first block),
    instead of nowhere, changes the answers: the test above would see it."""
    model = torch_model(tiny_llama)
    requests = requests_of([3, 9, 17], seed)
    eager, _ = run(model, requests, graphs=False)
    monkeypatch.setattr(StaticStep, "PADDING", {**StaticStep.PADDING, "slots": 0})
    graphed, _ = run(model, requests, graphs=True)
    assert graphed != eager, f"seed {seed}"


def test_a_failed_capture_leaves_decode_eager(tiny_llama, seed):
    """A step that cannot be captured (an op that reads a tensor back to the host, say) warns once and turns the
    graphs off for the engine; every request still completes, with the eager tokens."""
    model = torch_model(tiny_llama)
    requests = requests_of([3, 9], seed)
    eager, _ = run(model, requests, graphs=False)

    def failing_capture(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = Engine(model, num_blocks=256, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, cuda_graphs=False)
    engine.graphs = DecodeGraphs(model, engine.kv_caches, block_size=4, max_batch=8, capture=failing_capture)
    seqs = [engine.add_request(r) for r in requests]
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off for this engine.*not permitted"):
        with torch.inference_mode():
            while engine.has_unfinished():
                engine.step()
    assert [s.output_ids for s in seqs] == eager and engine.stats.graph_replays == 0
    assert "RuntimeError" in engine.graphs.failed


def test_prefill_and_chunked_steps_run_eagerly(tiny_llama, seed):
    """A step with prompt chunks (more than one token for a sequence) is never replayed, even while others decode:
    a long prompt joining running decodes is chunked over several mixed steps."""
    model = torch_model(tiny_llama)
    requests = requests_of([3, 5, 150], seed)
    eager, _ = run(model, requests, graphs=False)
    graphed, engine = run(model, requests, graphs=True)
    assert graphed == eager, f"seed {seed}"
    assert 0 < engine.stats.graph_replays < engine.stats.steps - 1


def test_length_buckets_grow_with_the_context(tiny_llama, seed):
    """A sequence crossing a length bucket's edge moves to the next graph (its max_seq_len bounds its length)."""
    model = torch_model(tiny_llama)
    requests = requests_of([250], seed, max_new_tokens=10)
    eager, _ = run(model, requests, graphs=False)
    graphed, engine = run(model, requests, graphs=True)
    assert graphed == eager, f"seed {seed}"
    assert set(engine.graphs.graphs) == {(1, 256), (1, 512)}


def test_vlm_decode_after_images_replays(tiny_idefics3):
    """Image questions and a text one together: the image features go in eagerly (prefill), decode replays."""
    eager = LLM(tiny_idefics3, backend="torch", device="cpu", dtype="float32", ignore_eos=True)
    prompts = [chat("What is in the picture?", picture(0)), "Once upon a time", chat("And here?", picture(1))]
    params = SamplingParams(max_new_tokens=6)
    want = [o.token_ids for o in eager.generate(prompts, params)]
    graphed = LLM(tiny_idefics3, backend="torch", device="cpu", dtype="float32", ignore_eos=True)
    engine = graphed.engine
    engine.graphs = DecodeGraphs(graphed.model, engine.kv_caches, block_size=16, max_batch=8, capture=eager_capture)
    assert [o.token_ids for o in graphed.generate(prompts, params)] == want
    assert graphed.stats.graph_replays > 0


def test_cuda_graphs_true_where_they_cannot_run_is_an_error(tiny_llama, monkeypatch):
    monkeypatch.delenv(decode_graphs.GRAPHS_ENV, raising=False)
    for backend in ("torch", "numpy"):
        with pytest.raises(InputError, match="cuda_graphs=True needs the torch backend on a CUDA GPU"):
            LLM(tiny_llama, backend=backend, device="cpu", cuda_graphs=True)
    monkeypatch.setenv(decode_graphs.GRAPHS_ENV, "1")  # the environment's switch applies where it can
    assert LLM(tiny_llama, backend="torch", device="cpu").engine.graphs is None


def test_cli_flag_sets_the_switch(monkeypatch):
    """--cuda-graphs is SMOLVLM_FAST_CUDA_GRAPHS=1 for the process (every engine it makes reads it)."""
    from smolvlm_fast import cli
    monkeypatch.delenv(decode_graphs.GRAPHS_ENV, raising=False)
    seen = []
    monkeypatch.setattr(cli, "run_serve", lambda args: seen.append(decode_graphs.os.environ.get(
        decode_graphs.GRAPHS_ENV)) or 0)
    assert cli.main(["serve"]) == 0 and cli.main(["serve", "--cuda-graphs"]) == 0
    assert seen == [None, "1"]


# ---------------------------------------------------------------- on a GPU: real capture and replay

@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[5], [3, 9, 17], [4, 4, 30, 7, 2, 11]], ids=["one", "three", "six"])
def test_cuda_graphs_equal_eager_on_gpu(tiny_llama, lengths, seed):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from smolvlm_fast import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device="cuda", dtype="float32", backend="torch").model
    requests = requests_of(lengths, seed)

    def run_on_gpu(graphs):
        engine = Engine(model, num_blocks=256, block_size=16, max_num_seqs=8, cuda_graphs=graphs)
        seqs = [engine.add_request(r) for r in requests]
        with torch.inference_mode():
            while engine.has_unfinished():
                engine.step()
        return [s.output_ids for s in seqs], engine

    eager, _ = run_on_gpu(False)
    graphed, engine = run_on_gpu(True)
    assert graphed == eager, f"seed {seed}"
    assert engine.stats.graph_replays == engine.stats.steps - 1
