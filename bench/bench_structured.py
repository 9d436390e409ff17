"""Structured outputs (JSON Schema), two measurements in one run:

  library   llguidance (what the engine uses) against xgrammar, on this project's tokenizer (the default model's
            SmolLM2 vocabulary, 49,152 tokens): which of tests/structured_schemas.py's schemas each compiles, the
            compile time (ms, a fresh compiler each time), and the time to compute one next-token mask (us, median
            over every step of the schema's sample instance, fed token by token)
  engine    decode tokens/s of `LLM` (default model, numpy backend, greedy) with a JSON Schema against the same
            request without one, at batch 1 and 4, rounds interleaved; the unconstrained request decodes exactly as
            many tokens as the constrained one produced (end-of-sequence ignored), so both do the same work

xgrammar is optional (it needs torch); without it only llguidance's rows are written.

    python bench/bench_structured.py
    python bench/bench_structured.py --parts library --no-save
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import bench_parser, make_row, report

BENCH = "bench_structured"
SEPARATORS = (", ", ": ")  # the engine's JSON layout (engine/grammar.JSON_LAYOUT)
PROMPT = "Describe a shop receipt as JSON."


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def schemas():
    from tests.structured_schemas import FINITE, OPEN

    return FINITE + OPEN


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size, eos):
        from smolvlm_fast.engine.grammar import Grammars

        self.grammars = Grammars(tokenizer, vocab_size, eos)
        self.vocab_size = vocab_size
        self.grammars.ll_tokenizer  # noqa: B018  -- built once, outside the timings

    def compile(self, schema: dict):
        import llguidance

        from smolvlm_fast.engine.grammar import JSON_LAYOUT

        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        return llguidance.LLMatcher(self.grammars.ll_tokenizer, grammar, log_level=0)

    def step(self, matcher, token: int, bitmask) -> bool:
        import llguidance.numpy as llnp

        llnp.fill_next_token_bitmask(matcher, bitmask, 0)
        return matcher.consume_token(token) and not matcher.is_error()

    def bitmask(self):
        import numpy as np

        return np.zeros((1, -(-self.vocab_size // 32)), dtype=np.int32)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size, eos):
        import transformers
        import xgrammar as xgr

        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
        self.xgr, self.vocab_size = xgr, vocab_size

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                separators=SEPARATORS, strict_mode=True)
        return self.xgr.GrammarMatcher(compiled)

    def step(self, matcher, token: int, bitmask) -> bool:
        matcher.fill_next_token_bitmask(bitmask)
        return matcher.accept_token(token)

    def bitmask(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab_size)


def libraries(tokenizer, vocab_size, eos):
    out = [Llguidance(tokenizer, vocab_size, eos)]
    try:
        out.append(Xgrammar(tokenizer, vocab_size, eos))
    except ImportError as e:
        print(f"xgrammar not measured: {e}", file=sys.stderr)
    return out


def measure_library(lib, schema: dict, token_ids: list[int], repeats: int) -> dict:
    """{compile_ms: [...], mask_us: [...], accepted: bool} for one schema; compile errors give accepted False."""
    compile_ms, mask_us, accepted = [], [], True
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            matcher = lib.compile(schema)
        except Exception as e:  # noqa: BLE001 -- a library's refusal is a result here
            print(f"{lib.name}: cannot compile: {str(e)[:200]}", file=sys.stderr)
            return {"compile_ms": [], "mask_us": [], "accepted": False}
        compile_ms.append(1000 * (time.perf_counter() - start))
        bitmask = lib.bitmask()
        for token in token_ids:
            start = time.perf_counter()
            ok = lib.step(matcher, token, bitmask)
            mask_us.append(1e6 * (time.perf_counter() - start))
            if not ok:
                accepted = False
                break
    return {"compile_ms": compile_ms, "mask_us": mask_us, "accepted": accepted}


def library_rows(llm, args) -> list[dict]:
    tokenizer, grammars = llm.tokenizer, llm.engine.grammars
    vocab_size = grammars.vocab_size
    rows = []
    for lib in libraries(tokenizer, vocab_size, grammars.eos_token_id):
        for name, schema, instance in schemas():
            ids = tokenizer.encode(json.dumps(instance, separators=SEPARATORS))
            result = measure_library(lib, schema, ids, args.repeats)
            shape = f"{len(ids)} tokens, vocab {vocab_size}, " + ("instance accepted" if result["accepted"]
                                                                           else "NOT accepted")
            for metric, samples in (("compile ms", result["compile_ms"]), ("mask us", result["mask_us"])):
                if samples:
                    rows.append(make_row(bench=BENCH, case=f"library/{name}/{metric.split()[0]}", shape=shape,
                                         dtype="-", device="cpu", metric=metric.split()[1], ours=samples,
                                         impl=f"{lib.name} {package_version(lib.name)}"))
    return rows


def engine_rows(llm, args) -> list[dict]:
    from smolvlm_fast import SamplingParams
    from tests.structured_schemas import RECEIPT

    rows = []
    chat = [{"role": "user", "content": PROMPT}]
    for batch in args.batches:
        constrained = SamplingParams(max_new_tokens=args.max_new_tokens, json_schema=RECEIPT)
        first = llm.generate([chat] * batch, constrained)
        n = min(len(o.token_ids) for o in first)
        free = SamplingParams(max_new_tokens=n)
        constrained = SamplingParams(max_new_tokens=n, json_schema=RECEIPT)
        samples = {"json": [], "free": []}
        for round_ in range(args.repeats):
            order = ("json", "free") if round_ % 2 == 0 else ("free", "json")
            for key in order:
                params = constrained if key == "json" else free
                start = time.perf_counter()
                outs = llm.generate([chat] * batch, params)
                seconds = time.perf_counter() - start
                samples[key].append(sum(len(o.token_ids) for o in outs) / seconds)
        rows.append(make_row(bench=BENCH, case=f"engine/batch{batch}", shape=f"{n} new tokens a request, receipt "
                             "schema", dtype=llm.precision, device="cpu", metric="tok/s", ours=samples["json"],
                             baseline="no schema", theirs=samples["free"], impl="smolvlm_fast + llguidance"))
    return rows


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--parts", nargs="+", default=["library", "engine"], choices=["library", "engine"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)
    from smolvlm_fast import LLM

    llm = LLM(backend="numpy", ignore_eos=True)  # the JSON ends by its grammar; the free text at n tokens
    rows = []
    if "library" in args.parts:
        rows += library_rows(llm, args)
    if "engine" in args.parts:
        rows += engine_rows(llm, args)
    for row in rows:
        report(BENCH, row, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
