"""`smolvlm-fast caption --ray SOURCE`: the caption command spread over a pool of Ray actors (Ray Data).

SOURCE is a folder (searched as the local command searches it), a glob (`photos/**/*.jpg`) or a text file listing
one image path a line (relative to the listing's folder, or absolute). The driver finds the images and skips those
already in the output exactly as the local command does (caption.CaptionLog); Ray Data's map_batches hands batches
of paths to K actors (an ActorPoolStrategy), each holding one LLM built once in its __init__ with the command's
model options, whose engine batches the images of a batch; the actors return rows (a record, or an error for an
unreadable image: never an exception that stops the job), and the driver writes them, as they arrive, to the same
JSON Lines file and errors file as the local command. So the output is written in one place and a rerun resumes.

The actors open the image files themselves: every node of the cluster must see them at the same path (a shared
filesystem). Each actor reserves cpus_per_actor CPUs and sizes its compute threads to them.
"""
from __future__ import annotations

import asyncio
import glob
import json
import os
import time
from pathlib import Path

from ..errors import InputError, SmolVLMError
from .caption import (DEFAULT_TAGS_PROMPT, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, CaptionLog, Captioner, Summary,
                      caption_paths, caption_prompt, check_llm, check_options, find_images, max_new_tokens,
                      llm_options, print_summary)

DEFAULT_CPUS_PER_ACTOR = 2  # one actor's engine already uses every thread it gets; more actors overlap the rest


# ---------------------------------------------------------------- the images

def find_source(source, videos: bool = False) -> tuple[Path, list[Path]]:
    """(root the output's paths are relative to, the images) of a folder, a text file listing paths, or a glob."""
    path = Path(source)
    if path.is_dir():
        return path, find_images(path, videos)
    if path.is_file():
        return path.parent, listed_images(path)
    if glob.has_magic(str(source)):
        return glob_root(str(source)), glob_images(str(source), videos)
    raise InputError(f"{source}: not a folder, a listing of image paths or a glob that matches files")


def listed_images(listing: Path) -> list[Path]:
    """The paths of a listing, in its order, each once; blank lines and '#' comments skipped."""
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{listing}: cannot read the listing: {e}") from None
    names = (line.strip() for line in lines)
    return [listing.parent / n for n in dict.fromkeys(n for n in names if n and not n.startswith("#"))]


def glob_root(pattern: str) -> Path:
    """The folder above the pattern's first wildcard: 'photos/2024/*/x.jpg' -> photos/2024."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def glob_images(pattern: str, videos: bool) -> list[Path]:
    extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS
    return sorted(p for p in map(Path, glob.glob(pattern, recursive=True))
                  if p.suffix.lower() in extensions and p.is_file())


def model_takes_video(model) -> bool:
    """Whether the checkpoint's processor takes video (then its videos are captioned too, as locally); read on the
    driver from the processor files only, no weights."""
    from ..auto import AutoProcessor

    try:
        return getattr(AutoProcessor.from_pretrained(model), "video_config", None) is not None
    except Exception:  # noqa: BLE001  no processor here (a GGUF file): the actors load the model and say what is wrong
        return False


# ---------------------------------------------------------------- the actors

class CaptionActor:
    """A Ray Data callable class: one LLM per actor, a batch of paths captioned per call (the engine batches them)."""

    def __init__(self, model, llm_options: dict, captioner: dict, root: str, batch_size: int, threads: int):
        size_threads(threads)
        from .llm import LLM

        self.llm = LLM(model, **llm_options)
        check_llm(self.llm, captioner.get("json_schema"))
        self.captioner = Captioner(self.llm, **captioner)
        self.root, self.batch_size = Path(root), batch_size

    def __call__(self, batch: dict) -> dict:
        rows = {"name": [], "record": [], "error": []}

        def on_record(record):
            add_row(rows, record["path"], json.dumps(record, ensure_ascii=False), "")

        def on_error(name, message):
            add_row(rows, name, "", message)

        paths = [Path(p) for p in batch["file"]]
        asyncio.run(caption_paths(self.captioner, paths, self.root, on_record, on_error, self.batch_size))
        return rows


def add_row(rows: dict, name: str, record: str, error: str) -> None:
    rows["name"].append(name)
    rows["record"].append(record)  # JSON text: records differ in their fields (tags, json), Arrow columns may not
    rows["error"].append(error)


def size_threads(threads: int) -> None:
    """The actor's compute threads to the CPUs Ray reserved for it: the C++ pool would size itself to every core of
    the node (actors are not pinned), and K actors on one node would oversubscribe it."""
    os.environ["SMOLVLM_FAST_NUM_THREADS"] = str(threads)  # read by the pool (and torch's sizing) at first use
    from ..cpu.linear import set_num_threads

    set_num_threads(threads)  # in case the pool was made already


# ---------------------------------------------------------------- the driver

def init_ray(address: str | None, part: str = "data"):
    """Join the cluster at address ('auto': the one `ray start` made here), else start a local one on this
    process's CPUs. part: the half of Ray the caller needs ("data" here, "serve" for the server), each its own
    extra of Ray's. Returns the ray module."""
    import importlib

    try:
        import ray
        importlib.import_module(f"ray.{part}")
    except ImportError as e:
        raise SmolVLMError(f"--ray needs Ray {part.title()}: pip install 'smolvlm_fast[ray]' ({e})") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)
    return ray


def default_actors(ray, cpus_per_actor: float) -> int:
    """As many actors as the cluster's CPUs hold at cpus_per_actor each (at least one)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))


def caption_with_ray(source, out, *, model, llm_options: dict | None = None, prompt: str | None = None,
                     tags: bool = False, tags_prompt: str = DEFAULT_TAGS_PROMPT, max_new_tokens: int = 96,
                     batch_size: int = 8, model_name: str = "", json_schema: dict | None = None,
                     actors: int | None = None, cpus_per_actor: float | None = None, address: str | None = None,
                     progress: bool = True, videos: bool | None = None) -> Summary:
    """caption_folder's work on K Ray actors (the module's docstring); returns the same Summary. Ray is initialised
    here unless it is already (then address is not used)."""
    check_options(tags, json_schema)
    out = Path(out)
    root, images = find_source(source, model_takes_video(model) if videos is None else videos)
    # absolute on the driver as in the actors, so both name a listed absolute path under a relative root alike
    root, images = root.absolute(), [p.absolute() for p in images]
    log = CaptionLog(images, root, out, progress)
    start = time.perf_counter()
    try:
        if log.todo:
            ray = init_ray(address)
            cpus = cpus_per_actor or min(DEFAULT_CPUS_PER_ACTOR, ray.cluster_resources().get("CPU", 1))
            captioner = dict(prompt=caption_prompt(prompt, json_schema), tags_prompt=tags_prompt if tags else None,
                             max_new_tokens=max_new_tokens, model_name=model_name, json_schema=json_schema)
            dataset = pipeline(ray, log.todo, root, model, llm_options or {}, captioner, batch_size,
                               actors or default_actors(ray, cpus), cpus)
            write_rows(dataset, log)
    except KeyboardInterrupt:
        log.interrupted()
        raise
    finally:
        log.close(time.perf_counter() - start)
    return log.summary


def pipeline(ray, paths: list[Path], root: Path, model, options: dict, captioner: dict, batch_size: int,
             actors: int, cpus: float):
    """The dataset of output rows: paths -> map_batches over an actor pool of `actors` CaptionActors. A map call
    takes 2 x batch_size paths, so an actor keeps batch_size images in flight for most of its call."""
    context = ray.data.DataContext.get_current()
    for name in ("enable_progress_bars", "print_on_execution_start"):  # the command's own bar counts the images
        if hasattr(context, name):  # the second one is not in every Ray version
            setattr(context, name, False)
    items = [{"file": str(p)} for p in paths]
    # as many blocks as calls: Ray hands out blocks, so one big block would go to one actor
    blocks = max(1, min(len(items), -(-len(items) // (2 * batch_size))))
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        CaptionActor, batch_size=2 * batch_size, compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),
        num_cpus=cpus,
        fn_constructor_kwargs=dict(model=str(model), llm_options=options, captioner=captioner,
                                   root=str(root), batch_size=batch_size, threads=max(1, int(cpus))))


def write_rows(dataset, log: CaptionLog) -> None:
    """Each row into the output or the errors file as it arrives (the driver is the only writer)."""
    try:
        for row in dataset.iter_rows():
            if row["error"]:
                log.error(row["name"], row["error"])
            else:
                log.record(json.loads(row["record"]))
    except Exception as e:  # an actor that could not start (a bad model, a text-only one): one readable error
        if isinstance(e, SmolVLMError):
            raise
        raise SmolVLMError(f"the Ray job failed: {type(e).__name__}: {str(e)[-2000:]}") from e


def run(args) -> int:
    """`smolvlm-fast caption --ray SOURCE` (arguments from cli.py)."""
    summary = caption_with_ray(args.dir, args.out, model=args.model, llm_options=llm_options(args),
                               prompt=args.prompt, tags=args.tags, tags_prompt=args.tags_prompt,
                               max_new_tokens=max_new_tokens(args), batch_size=args.batch_size, model_name=args.model,
                               json_schema=args.json_schema, actors=args.ray_actors,
                               cpus_per_actor=args.ray_cpus_per_actor, address=args.ray_address,
                               progress=not args.no_progress)
    print_summary(summary, args.out)
    return 0
