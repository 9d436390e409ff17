"""`smolvlm-fast caption DIR`: a caption (and, with tags=True, a list of tags) for every image in a folder.

Every image under the folder (recursively, sorted; jpg, png, webp, gif (its first frame), bmp, tiff) goes through the
LLM's continuous-batching engine, batch_size images in flight at once, so memory stays flat on a folder of any size.
Each result is appended to a JSON Lines file as soon as it is ready, one line per image:

    {"path": "holiday/beach.jpg", "caption": "...", "tags": ["sea", "sand"], "seconds": 1.92, "model": "..."}

With json_schema (`--json-schema FILE`) each image gets one JSON value that satisfies the schema instead of a caption
and tags, decoded under the schema's grammar (engine/grammar.py): {"path": ..., "json": {...}, "seconds", "model"}.
An answer that runs out of max_new_tokens before its JSON ends is reported as that image's error.

With a model that takes video (a SmolVLM2 checkpoint with video settings), video files (mp4, mov, m4v, mkv, webm,
avi) are captioned too, each decoded once (its sampled frames only, inputs/video.py) and asked about as a video;
the default prompts then say "video". An unreadable video is skipped and reported like an image.

The run resumes: images already in the output are skipped, and a last line cut short by a killed run is dropped.
An image that cannot be read is reported on stderr and in `<out stem>.errors.jsonl`, never stopping the run (it is
tried again on the next run): a corrupt or truncated file, another format under an image extension (images.py tries
only JPEG, PNG, WebP, GIF, BMP and TIFF decoders), or more pixels than the processor's max_image_pixels.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SamplingParams
from ..errors import InputError, SmolVLMError
from ..inputs.images import load_image
from ..inputs.video import load_video

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"})
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEFAULT_PROMPT = "Describe this image in one or two sentences."
DEFAULT_TAGS_PROMPT = ("List the main objects, people, places and themes in this image as comma-separated tags. "
                       "Answer with the tags only.")
DEFAULT_JSON_PROMPT = "Describe this image. Answer in JSON."  # the schema's own property names are added to it


@dataclass
class Summary:
    total: int                       # images found
    already_done: int                # found in the output before this run
    captioned: int = 0               # written by this run
    errors: dict[str, str] = field(default_factory=dict)  # path -> why it was skipped
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        text = (f"captioned {self.captioned} images in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s); "
                f"{self.already_done} of {self.total} were already done")
        return text + (f"; {len(self.errors)} skipped (unreadable)" if self.errors else "")


# ---------------------------------------------------------------- the folder and the output file

def find_images(root: Path, videos: bool = False) -> list[Path]:
    """Every image file under root (and every video file, with videos=True), by extension (any case), sorted."""
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def video_prompt(prompt: str) -> str:
    """A default prompt asks about "this image": about a video it asks about "this video"."""
    return prompt.replace("this image", "this video") if prompt in (DEFAULT_PROMPT, DEFAULT_TAGS_PROMPT) else prompt


def relative_name(path: Path, root: Path) -> str:
    """path's name in the output: relative to root, or (a listed file outside root) its absolute path."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.absolute().as_posix()


def read_done(out: Path) -> set[str]:
    """The paths already captioned in out. A last line without its newline (a killed run) is cut off the file,
    or completed with a newline when it is whole JSON, so that appending goes on from a clean line."""
    if not out.exists():
        return set()
    done, end = set(), 0
    with out.open("r+b") as f:
        for line in f:
            record = _record(line)
            if not line.endswith(b"\n"):  # the last line, cut short
                if record is None:
                    print(f"smolvlm-fast caption: dropping a truncated last line of {out}", file=sys.stderr)
                    f.truncate(end)
                else:
                    f.write(b"\n")
            if record is not None:
                done.add(record["path"])
            end += len(line)
    return done


def _record(line: bytes) -> dict | None:
    """A captioned record of the output file, or None for a broken or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("path"), str) and (
        isinstance(record.get("caption"), str) or "json" in record)
    return record if ok else None


def errors_path(out: Path) -> Path:
    return out.with_name(out.stem + ".errors.jsonl")


class JsonLines:
    """Appends one JSON object per line and flushes it at once, so that a killed run leaves whole lines."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def write(self, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def parse_tags(text: str) -> list[str]:
    """'cat, red chair,\\n sun.' -> ['cat', 'red chair', 'sun']: split at commas and new lines, stripped, in order,
    without repeats."""
    tags = (t.strip().strip(".;:-*#").strip() for t in text.replace("\n", ",").split(","))
    return list(dict.fromkeys(t for t in tags if t))


# ---------------------------------------------------------------- captioning

@dataclass
class Captioner:
    """Asks the LLM about one image at a time; several captioners' requests share the engine's batches."""
    llm: object
    prompt: str = DEFAULT_PROMPT
    tags_prompt: str | None = None  # None: no tags
    max_new_tokens: int = 96
    model_name: str = ""
    json_schema: dict | None = None  # one JSON value per image instead of a caption (and tags)

    async def caption(self, path: Path, name: str) -> dict:
        """The output record of one image; raises SmolVLMError when the image cannot be read or the request fails."""
        start = time.perf_counter()
        # [H, W, 3] uint8 (a video: its sampled frames), within the processor's pixel limit; decoding overlaps the
        # engine's steps
        image = await asyncio.to_thread(self.load, path)
        prompts = [self.prompt] + ([self.tags_prompt] if self.tags_prompt is not None else [])
        kind = "video" if is_video(path) else "image"
        asks = [self.ask(image, video_prompt(p) if kind == "video" else p, kind) for p in prompts]
        answers = await asyncio.gather(*asks)
        if self.json_schema is not None:
            record = {"path": name, "json": json.loads(answers[0])}  # the grammar made it valid: it parses
        else:
            record = {"path": name, "caption": answers[0]}
        if self.tags_prompt is not None:
            record["tags"] = parse_tags(answers[1])
        return record | {"seconds": round(time.perf_counter() - start, 3), "model": self.model_name}

    def load(self, path: Path):
        processor = self.llm.processor
        if is_video(path):
            return load_video(path, processor.video_config, max_pixels=self.llm.max_image_pixels)
        return load_image(path, max_pixels=self.llm.max_image_pixels)

    async def ask(self, image, text: str, kind: str = "image") -> str:
        chat = [{"role": "user", "content": [{"type": kind, kind: image}, {"type": "text", "text": text}]}]
        final = None
        params = SamplingParams(max_new_tokens=self.max_new_tokens, json_schema=self.json_schema)
        async for final in self.llm.stream(chat, params):
            pass
        if final is None or final.finish_reason == "error":
            raise SmolVLMError(final.error if final is not None else "no output")
        if self.json_schema is not None and final.finish_reason != "stop":
            raise SmolVLMError(f"the JSON answer did not end within max_new_tokens ({self.max_new_tokens}): "
                               f"{final.text[:80]!r}...")
        return final.text.strip()


async def caption_paths(captioner: Captioner, paths: list[Path], root: Path, on_record, on_error,
                        batch_size: int = 8) -> None:
    """Caption paths with at most batch_size images in flight; on_record(record) as each finishes, in any order,
    on_error(name, message) for an image that fails."""
    queue: Iterator[Path] = iter(paths)

    async def worker():
        for path in queue:  # the workers share one iterator: each takes the next image when it is free
            name = relative_name(path, root)
            try:
                record = await captioner.caption(path, name)
            except SmolVLMError as e:
                on_error(name, str(e))
            except Exception as e:  # noqa: BLE001  a decoder or processor bug on one image skips that image only
                on_error(name, f"{type(e).__name__}: {e}")
            else:
                on_record(record)

    await asyncio.gather(*(worker() for _ in range(max(1, batch_size))))


class CaptionLog:
    """One run's output: the images still to do, the JSON Lines file and the errors file, the summary and the
    progress bar. Shared by caption_folder and the Ray driver (ray_caption.py), so both resume and report alike."""

    def __init__(self, images: list[Path], root: Path, out: Path, progress: bool = True):
        from tqdm import tqdm

        self.done = read_done(out)
        self.todo = [p for p in images if relative_name(p, root) not in self.done]
        self.summary = Summary(total=len(images), already_done=len(images) - len(self.todo))
        errors_file = errors_path(out)
        errors_file.unlink(missing_ok=True)  # the images that failed last time are tried again
        self.results, self.failures = JsonLines(out), JsonLines(errors_file)
        self.bar = tqdm(total=len(images), initial=self.summary.already_done, unit="img", desc="captioning",
                        file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def record(self, record: dict) -> None:
        if record["path"] in self.done:  # a batch that Ray ran again after a worker died: written once only
            return
        self.done.add(record["path"])
        self.results.write(record)
        self.summary.captioned += 1
        self.bar.update()

    def error(self, name: str, message: str) -> None:
        if name in self.summary.errors:
            return
        self.summary.errors[name] = message
        self.failures.write({"path": name, "error": message})
        self.bar.write(f"smolvlm-fast caption: skipped {name}: {message}", file=sys.stderr)
        self.bar.update()

    def interrupted(self) -> None:
        self.bar.write(f"smolvlm-fast caption: interrupted after {self.summary.captioned} images; run again to "
                       "resume", file=sys.stderr)

    def close(self, seconds: float) -> None:
        self.summary.seconds = seconds
        self.bar.close()
        self.results.close()
        self.failures.close()


def check_options(tags: bool, json_schema) -> None:
    if json_schema is not None and tags:
        raise InputError("--tags and --json-schema do not go together: put the tags in the schema")


def check_llm(llm, json_schema) -> None:
    """InputError for a text-only model or a schema the grammar compiler refuses, before any image is read."""
    if not llm.model.config.is_vlm:
        raise InputError("captioning needs a vision-language model (a SmolVLM checkpoint): this one is text-only")
    if json_schema is not None:
        llm.check_response_format(SamplingParams(json_schema=json_schema))


def caption_prompt(prompt: str | None, json_schema) -> str:
    """prompt None: DEFAULT_PROMPT, or with json_schema DEFAULT_JSON_PROMPT and the schema's property names."""
    return prompt if prompt is not None else json_prompt(json_schema) if json_schema is not None else DEFAULT_PROMPT


def takes_video(llm) -> bool:
    return getattr(llm.processor, "video_config", None) is not None


def caption_folder(llm, root, out, *, prompt: str | None = None, tags: bool = False,
                   tags_prompt: str = DEFAULT_TAGS_PROMPT, max_new_tokens: int = 96, batch_size: int = 8,
                   model_name: str = "", progress: bool = True, json_schema: dict | None = None) -> Summary:
    """Caption every image under root that out does not hold yet, appending to out; returns what was done.
    prompt None: DEFAULT_PROMPT, or with json_schema DEFAULT_JSON_PROMPT and the schema's property names."""
    root, out = Path(root), Path(out)
    check_options(tags, json_schema)
    check_llm(llm, json_schema)
    prompt = caption_prompt(prompt, json_schema)
    log = CaptionLog(find_images(root, videos=takes_video(llm)), root, out, progress)
    captioner = Captioner(llm, prompt, tags_prompt if tags else None, max_new_tokens, model_name, json_schema)
    start = time.perf_counter()
    try:
        asyncio.run(caption_paths(captioner, log.todo, root, log.record, log.error, batch_size))
    except KeyboardInterrupt:
        log.interrupted()
        raise
    finally:
        log.close(time.perf_counter() - start)
        llm.shutdown()
    return log.summary


def json_prompt(schema) -> str:
    """DEFAULT_JSON_PROMPT, naming the schema's top-level properties (a small model follows named fields better)."""
    names = list(schema.get("properties", {})) if isinstance(schema, dict) else []
    return DEFAULT_JSON_PROMPT[:-1] + f" with the fields {', '.join(names)}." if names else DEFAULT_JSON_PROMPT


def run(args) -> int:
    """The `smolvlm-fast caption` command (arguments from cli.py)."""
    from .llm import LLM

    llm = LLM(args.model, **llm_options(args))
    summary = caption_folder(llm, args.dir, args.out, prompt=args.prompt, tags=args.tags, tags_prompt=args.tags_prompt,
                             max_new_tokens=max_new_tokens(args), batch_size=args.batch_size, model_name=args.model,
                             progress=not args.no_progress, json_schema=args.json_schema)
    print_summary(summary, args.out)
    return 0


def llm_options(args) -> dict:
    """The LLM's keyword arguments for the caption command's flags (the same for the local run and each Ray actor)."""
    from ..inputs.image_budget import ImageBudget

    return dict(backend=args.backend, device=args.device, dtype=args.dtype, quantize=args.quantize,
                max_num_seqs=2 * max(1, args.batch_size), **ImageBudget.of_flags(args).llm_options())


def max_new_tokens(args) -> int:
    return args.max_new_tokens or (256 if args.json_schema is not None else 96)


def print_summary(summary: Summary, out) -> None:
    print(f"smolvlm-fast caption: {summary} -> {out}", file=sys.stderr)
    if summary.errors:
        print(f"smolvlm-fast caption: the skipped images are listed in {errors_path(Path(out))}", file=sys.stderr)
