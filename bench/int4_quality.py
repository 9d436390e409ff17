"""How much int4 costs in quality: perplexity and next-token agreement on SmolLM2-135M-Instruct, NumPy backend (CPU).

Versions of the same model (the default GGUF, smolvlm_fast.weights.hub.default_model_path()):
  fp16    every GGUF weight dequantized, rounded to fp16, used in fp32 (the reference)
  int4    the decoder's linear layers re-quantized from the dequantized GGUF weights, round to nearest, group 64
          asymmetric (int4_format.quantize_int4, as quantize="int4" does); embedding / LM head and norms as in fp16
  int4_g32  the same at group 32 (GGUF's block size; the grid the weights already lie on, so it shows how much of
          int4's loss is re-quantizing two differently scaled 32-blocks onto one 64-wide grid)
  q4_1    the GGUF as it is (its Q4_1 linear layers at group 32, its Q8_0 embedding), what the backend loads
Each reads the same text (bench_e2e's FILLER and the paragraphs below, more than 2,000 tokens, after one
<|endoftext|>) in one prefill through the paged cache, as the engine does. Reported per version: perplexity over
every text token, and against fp16 the top-1 agreement (share of positions where the most likely next token is the
same) and the mean KL divergence KL(fp16 || version) in nats. One JSON row per quantized version goes to
bench/results/int4_quality.jsonl (metric "perplexity", baseline fp16). Takes a minute or two on 2 cores.

    python bench/int4_quality.py
    python bench/int4_quality.py --tokens 1024 --no-save
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np

BENCH = "int4_quality"
LOGIT_ROWS = 256  # positions whose logits are computed at a time (the vocabulary is 49,152 wide)

MORE_TEXT = """
The first cameras that ordinary families could buy arrived at the end of the nineteenth century. George Eastman sold
a small box loaded with enough film for a hundred pictures, and when the roll was finished the whole camera was
mailed back to his factory in Rochester, where the film was developed, printed and replaced. His slogan promised that
the customer only had to press the button and the company would do the rest. Within a generation the snapshot had
become part of everyday life: birthdays, holidays, weddings and first days at school were recorded by people who had
never studied chemistry or optics.

Colour was harder. Early experimenters photographed the same scene three times through red, green and blue filters
and projected the results on top of one another, which worked in a lecture hall but not in a family album. The
Autochrome plates of the Lumiere brothers used grains of potato starch dyed in three colours as tiny filters, and
produced soft, dreamlike images that still look beautiful today. Real success came in the 1930s with multilayer films
such as Kodachrome, in which three thin layers of emulsion each recorded one part of the spectrum. For decades slide
shows of holiday pictures, projected on a white sheet in a darkened living room, were a familiar if not always
welcome evening entertainment.

A photograph is only as sharp as the lens that forms it. A simple lens bends light of different colours by slightly
different amounts, so that a white point becomes a small rainbow smear; it also bends rays near its edge more
strongly than rays near its centre. Lens designers spent the twentieth century combining elements of different
kinds of glass so that these errors cancel. A modern zoom lens may contain fifteen or twenty elements, some of them
with aspherical surfaces that could not be manufactured economically until computers controlled the grinding
machines. The aperture, a ring of thin blades that opens and closes like the iris of an eye, controls both how much
light reaches the film and how deep the zone of sharp focus is.

The digital sensor replaced film remarkably quickly. In 1975 an engineer at Kodak built a prototype that weighed
nearly four kilograms and took twenty three seconds to record a single black and white image of one hundredth of a
megapixel onto a cassette tape. Thirty years later most cameras sold in the world were digital, and a few years after
that most photographs were taken with telephones. A sensor is a grid of millions of tiny wells that collect the
electric charge freed by incoming light. A mosaic of coloured filters over the wells means that each one sees only
red, green or blue, and software estimates the two missing colours at every point from its neighbours.

Because a telephone has room only for a very small lens and sensor, much of what we now call photography happens in
software. When you press the shutter, the phone has often already captured a burst of frames. It aligns them,
discards the parts that moved, averages the rest to reduce noise, and combines short and long exposures so that both
the bright sky and the dark foreground keep their detail. Portrait modes estimate the distance of every point in the
scene and blur the background artificially, imitating the shallow focus of a large lens. Critics complain that the
results can look too perfect, with skies that are bluer and faces that are smoother than they were in reality.

Alongside the technology, photography changed the way people think about truth and memory. Nineteenth century
viewers were astonished that a machine could record a scene without the judgement of an artist, and courts soon
accepted photographs as evidence. Yet manipulation is as old as the medium itself. Early portraitists retouched
negatives with pencils to remove wrinkles, and composite prints assembled from several negatives showed scenes that
had never existed. Today an image can be altered in seconds, and researchers build tools that look for the small
statistical traces that editing leaves behind, while others train computer programs to describe the contents of a
picture in plain words.

Describing a picture sounds simple until one tries to do it carefully. A good description mentions the main subject
first, then the setting, then details that matter for the question being asked. A photograph of a kitchen might be
summarised as a bright room with white cupboards, a wooden table and a bowl of oranges near the window. If the
question is whether the stove is on, however, the important detail is a small blue flame under a pan at the back of
the picture. People who write descriptions for blind readers learn to avoid guessing at things they cannot see, such
as the feelings of the people in an image, unless the evidence is clear.

Archives face a different problem: scale. A national library may hold millions of photographs, many of them without
any record of who took them, where or when. Volunteers have spent years reading the handwriting on the backs of
prints, comparing street signs and shop fronts with old maps, and identifying the uniforms of soldiers by the shape
of their buttons. Automatic captioning can help by suggesting keywords such as harbour, bicycle, snow or crowd, which
makes a collection searchable even before a person has looked at every item. The suggestions still need checking,
because a machine that has mostly seen modern pictures may misread old clothes, vehicles and buildings.

Preserving the pictures themselves is another challenge. Paper prints fade when they are exposed to light, and the
dyes in colour prints from the 1970s have often shifted towards magenta. Glass plates crack, nitrate film can catch
fire, and acetate film slowly releases acid with a smell of vinegar. Digital files have their own dangers: formats
become obsolete, disks fail, and a collection kept on a single computer can vanish in an afternoon. Conservators
recommend keeping several copies in different places, checking them regularly, and writing down what each file
contains, because a picture that nobody can find or identify is almost as lost as one that has been destroyed.

Teaching children to take photographs is a good way to teach them to look. A group of pupils sent into a park with
cameras and a simple task, such as finding ten different shades of green or five things that are older than their
grandparents, return with pictures that surprise their teachers. Some notice the pattern of light through leaves,
others the peeling paint on a bench or the expression of a dog waiting for its owner. Talking about the pictures
afterwards, and about why one framing works better than another, helps them understand that every photograph is a
choice about what to include and what to leave out.

Landscape photographers often say that the most important piece of equipment is an alarm clock. The light in the hour
after sunrise and before sunset is low, warm and soft, and it rakes across the ground so that every stone and blade
of grass casts a long shadow. In the middle of the day the same valley can look flat and washed out. Patience
matters as much as timing: a photographer may return to the same viewpoint many times over several seasons, waiting
for mist to settle in a valley, for the first snow to dust the peaks, or for a storm to clear just as the sun breaks
through the clouds.

Photography of the night sky brings its own difficulties. The Earth turns, so stars drift across the frame and
become streaks during a long exposure unless the camera is mounted on a motor that follows them. Cities fill the sky
with an orange glow that hides faint objects, and astronomers travel to deserts and mountains to escape it. Modern
sensors are sensitive enough that an ordinary camera on a tripod can record the band of the Milky Way in thirty
seconds, something that once required hours of careful guiding with a large telescope and a photographic plate.

Underwater photography asks even more of its practitioners. Water absorbs red light within the first few metres, so
that a coral reef which glows orange and purple under a diver's torch looks blue and grey in natural light. Divers
carry strobes on long arms to restore the colours and to keep the flash from lighting up the particles floating
between the lens and the subject, which would otherwise appear as a snowstorm of white specks. The housings that keep
cameras dry must resist the pressure of the water, and a single grain of sand on a rubber seal can flood an expensive
camera in seconds. Many underwater photographers also work as marine biologists, and their pictures have documented
the bleaching of reefs as the oceans warm.

Sports photography, by contrast, is a matter of anticipation. A sprinter covers ten metres in a second, and a tennis
serve travels faster than a car on a motorway. Professionals learn the rhythm of each game so that they can press the
shutter a fraction of a second before the decisive moment, knowing where the ball, the runner or the goalkeeper is
likely to be. They use long lenses that gather a lot of light, fast shutter speeds to freeze movement, and cameras
that can record twenty or thirty frames every second. After a match they may have thousands of pictures and only a
few minutes to choose the handful that editors will publish.

Finally, there is the simple pleasure of looking at old family pictures. A shoebox of prints found in an attic can
tell a story that no one remembered to write down: the house where a grandmother grew up, the car an uncle was so
proud of, friends whose names are now forgotten. Scanning such a collection, sorting it by date and writing a short
note about each picture is slow work, but many people find it deeply rewarding. Perhaps that is the real achievement
of two centuries of inventions, from the camera obscura to the telephone in every pocket: that ordinary moments,
which would once have disappeared without a trace, can now be kept, shared and remembered.
"""


def quality_text() -> str:
    from bench.bench_e2e import FILLER

    return FILLER + MORE_TEXT.replace("\n", " ").strip()


def load_versions(path: Path) -> dict:
    """{name: NumpyModel} for fp16, int4 and q4_1 (see the module docstring), sharing the float tensors."""
    from smolvlm_fast.formats import int4 as int4_format
    from smolvlm_fast.cpu.weights import DECODER_LINEARS, load_gguf_weights
    from smolvlm_fast.models.smolvlm_numpy import NumpyModel

    config, gguf = load_gguf_weights(path)
    fp16 = {name: int4_format.dequantize(w).astype(np.float16).astype(np.float32) for name, w in gguf.items()}
    def requantized(group_size: int) -> dict:
        weights = dict(fp16)
        for i in range(config.text.num_hidden_layers):
            for suffix in DECODER_LINEARS:
                name = f"model.layers.{i}.{suffix}"
                weights[name] = int4_format.quantize_int4(int4_format.dequantize(gguf[name]), group_size=group_size)
        return weights

    return {"fp16": NumpyModel(config, fp16), "int4": NumpyModel(config, requantized(64)),
            "int4_g32": NumpyModel(config, requantized(32)), "q4_1": NumpyModel(config, gguf)}


def log_probs(model, ids: np.ndarray) -> np.ndarray:
    """float32 [T, V] log-softmax of the next-token logits at every position, from one prefill of ids."""
    from smolvlm_fast.engine.sequence import Request
    from smolvlm_fast.engine.engine import new_cache, prefill

    cache, kv = new_cache(model, [len(ids)], 16)
    hidden, _ = prefill(model, cache, kv, [Request(ids.tolist())], [0])  # [T, D]
    out = np.empty((len(ids), model.config.text.vocab_size), dtype=np.float32)
    for start in range(0, len(ids), LOGIT_ROWS):
        logits = model.compute_logits(hidden[start:start + LOGIT_ROWS]).astype(np.float64)  # [n, V]
        logits -= logits.max(axis=1, keepdims=True)
        out[start:start + LOGIT_ROWS] = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return out


def measure(path: Path, n_tokens: int | None) -> tuple[dict, int]:
    from smolvlm_fast.formats.gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(path)
    text_ids = tokenizer.encode(quality_text())
    if n_tokens is not None:
        text_ids = text_ids[:n_tokens]
    ids = np.array([0] + text_ids, dtype=np.int64)  # <|endoftext|>: a document starts
    targets = ids[1:]  # position t predicts ids[t + 1]
    models = load_versions(path)
    results, reference = {}, None
    for name, model in models.items():
        start = time.perf_counter()
        lp = log_probs(model, ids)[:-1]  # [T - 1, V]
        nll = -lp[np.arange(len(targets)), targets]
        result = {"perplexity": float(np.exp(nll.mean())), "seconds": time.perf_counter() - start}
        if reference is None:
            reference = lp
        else:
            result["top1_agreement"] = float((lp.argmax(1) == reference.argmax(1)).mean())
            result["kl_from_fp16"] = float((np.exp(reference) * (reference - lp)).sum(1).mean())
        results[name] = result
        print(f"{name:>8}: perplexity {result['perplexity']:.3f}"
              + (f", top-1 agreement with fp16 {result['top1_agreement']:.4f}, KL {result['kl_from_fp16']:.4f}"
                 if "top1_agreement" in result else "") + f"  ({result['seconds']:.1f} s)")
    return results, len(targets)


def rows(results: dict, n_tokens: int, path: Path) -> list[dict]:
    from bench.common import cpu_name, git_commit

    try:
        from bench.common import versions
        vers = versions()
    except ImportError:  # no torch: only what this script uses
        import smolvlm_fast
        vers = {"smolvlm_fast": smolvlm_fast.__version__}
    base = results["fp16"]["perplexity"]
    what = {"int4": "int4 g64 asym RTN of the dequantized GGUF", "int4_g32": "int4 g32 asym RTN of the dequantized GGUF",
            "q4_1": "GGUF Q4_1 as stored (group 32)"}
    out = []
    for name in ("int4", "int4_g32", "q4_1"):
        r = results[name]
        out.append({"bench": BENCH, "case": f"smollm2-135m-instruct {what[name]}", "shape": f"tokens={n_tokens}",
                    "dtype": "float32", "impl": "smolvlm_fast (numpy backend)", "device": cpu_name(),
                    "versions": vers, "commit": git_commit(), "metric": "perplexity", "median": r["perplexity"],
                    "p20": None, "p80": None, "baseline": "fp16 (dequantized GGUF weights rounded to fp16)",
                    "baseline_median": base, "ratio": r["perplexity"] / base,
                    "top1_agreement": r["top1_agreement"], "kl_from_fp16": r["kl_from_fp16"], "model": path.name,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", type=Path, default=None, help="a llama GGUF with Q4 weights (default: SmolLM2-135M)")
    p.add_argument("--tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--no-save", action="store_true", help="print only; append no rows to the results file")
    p.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = p.parse_args(argv)
    from smolvlm_fast.formats.hub import default_model_path

    path = args.model or default_model_path()
    results, n = measure(path, args.tokens)
    print(f"{n} tokens of text, {path.name}")
    if not args.no_save:
        from bench.common import append_row
        for row in rows(results, n, path):
            print(f"row -> {append_row(BENCH, row, args.results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
