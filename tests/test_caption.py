"""`smolvlm-fast caption DIR`: every image of a nested folder captioned once through the batching engine, a corrupt
file reported and skipped, a rerun (after lost and truncated lines, or an interrupt) doing only what is missing,
tags as lists, and captions equal to LLM.generate on the same image and prompt."""
import json
import time

import numpy as np
import pytest
from PIL import Image

from smolvlm_fast import InputError, SamplingParams
from smolvlm_fast.serving.caption import Captioner, caption_folder, errors_path, find_images, parse_tags, read_done
from smolvlm_fast.cli import main
from smolvlm_fast.serving.llm import LLM

MAX_NEW_TOKENS = 5
GOOD = ["beach.jpg", "cats/ginger.PNG", "cats/kittens/small.webp", "moving.gif", "old/scan.bmp",
        "old/deep/negative.TIFF", "photo.jpeg"]
BROKEN = "cats/broken.png"


def picture(seed: int, size=(36, 52)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gif"):  # two frames: the first one is captioned
            picture(i).save(path, save_all=True, append_images=[picture(100 + i)], duration=100)
        else:
            picture(i, size=(36 + 8 * i, 52)).save(path, format=Image.registered_extensions()[path.suffix.lower()])
    (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))  # a PNG signature, then garbage
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "old" / "thumbs.db").write_bytes(b"\0" * 16)
    return root


@pytest.fixture(scope="module")
def llm(tiny_idefics3):
    return LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=256)


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def generate(llm, image, prompt: str) -> str:
    chat = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": prompt}]}]
    return llm.generate(chat, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))[0].text.strip()


def test_finds_images_recursively_by_extension_in_any_case(folder):
    found = [p.relative_to(folder).as_posix() for p in find_images(folder)]
    assert found == sorted(GOOD + [BROKEN])


def test_every_image_captioned_once_and_the_corrupt_one_skipped(llm, folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "captions.jsonl"
    forward, batch_sizes = llm.model.forward, []

    def spy(ids, meta, *args):
        if not batch_sizes:  # hold the first step so the other images' requests have surely joined by the next
            time.sleep(1.0)
        batch_sizes.append(len(meta.seq_lens))
        return forward(ids, meta, *args)

    open_now, most_open, real_stream = [0], [0], llm.stream

    async def counting_stream(*args, **kwargs):  # requests in flight, as the captioner sees them
        open_now[0] += 1
        most_open[0] = max(most_open[0], open_now[0])
        try:
            async for out in real_stream(*args, **kwargs):
                yield out
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(llm.model, "forward", spy)
    monkeypatch.setattr(llm, "stream", counting_stream)
    summary = caption_folder(llm, folder, out, max_new_tokens=MAX_NEW_TOKENS, batch_size=3, model_name="tiny",
                             progress=False)
    # three images in flight at once (the held first step leaves time for all three to join), never more; how many
    # of them share an engine step depends on the token budget and when each finishes, so that is only bounded
    assert most_open[0] == 3 and 1 <= max(batch_sizes) <= 3
    rows = records(out)
    assert sorted(r["path"] for r in rows) == sorted(GOOD)
    assert (summary.total, summary.already_done, summary.captioned) == (len(GOOD) + 1, 0, len(GOOD))
    assert list(summary.errors) == [BROKEN] and "cannot read image file" in summary.errors[BROKEN]
    assert [r["path"] for r in records(errors_path(out))] == [BROKEN]
    assert BROKEN in capsys.readouterr().err
    for r in rows:
        assert set(r) == {"path", "caption", "seconds", "model"} and r["model"] == "tiny" and r["seconds"] >= 0
        assert r["caption"] == generate(llm, folder / r["path"], "Describe this image in one or two sentences.")


def test_rerun_does_only_the_missing_images(llm, folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    caption_folder(llm, folder, out, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    kept, lost = lines[:2] + lines[3:-1], [json.loads(lines[2])["path"], json.loads(lines[-1])["path"]]
    out.write_bytes(b"".join(kept) + lines[-1][:25])  # one line lost, the last one cut off by a killed run
    assert read_done(out) == {json.loads(line)["path"] for line in kept}
    assert out.read_bytes() == b"".join(kept)  # the broken tail is gone, so appending starts on a clean line

    summary = caption_folder(llm, folder, out, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert summary.captioned == 2 and summary.already_done == len(GOOD) - 2 and list(summary.errors) == [BROKEN]
    rows = records(out)
    assert sorted(r["path"] for r in rows) == sorted(GOOD)
    assert sorted(r["path"] for r in rows[-2:]) == sorted(lost)

    again = caption_folder(llm, folder, out, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert again.captioned == 0 and len(records(out)) == len(GOOD)


def test_an_interrupted_run_leaves_valid_lines_and_resumes(llm, folder, tmp_path, monkeypatch):
    out = tmp_path / "captions.jsonl"
    caption = Captioner.caption
    calls = []

    async def interrupted(self, path, name):
        calls.append(name)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while other images are in flight
        return await caption(self, path, name)

    monkeypatch.setattr(Captioner, "caption", interrupted)
    with pytest.raises(KeyboardInterrupt):
        caption_folder(llm, folder, out, max_new_tokens=MAX_NEW_TOKENS, batch_size=2, progress=False)
    monkeypatch.setattr(Captioner, "caption", caption)
    first = records(out) if out.exists() else []  # every line whole JSON
    assert len(first) < len(GOOD)
    summary = caption_folder(llm, folder, out, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert summary.captioned == len(GOOD) - len(first)
    assert sorted(r["path"] for r in records(out)) == sorted(GOOD)


def test_tags_are_a_list(llm, folder, tmp_path):
    out = tmp_path / "tags.jsonl"
    prompt = "List the things in this picture, separated by commas."
    caption_folder(llm, folder, out, tags=True, tags_prompt=prompt, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    rows = records(out)
    assert len(rows) == len(GOOD)
    for r in rows:
        assert isinstance(r["tags"], list) and all(isinstance(t, str) and t == t.strip() and t for t in r["tags"])
    first = rows[0]
    assert first["tags"] == parse_tags(generate(llm, folder / first["path"], prompt))


def test_parse_tags():
    assert parse_tags("cat, red chair,\n sun.") == ["cat", "red chair", "sun"]
    assert parse_tags(" - dog\n- dog\n,, ") == ["dog"]
    assert parse_tags("") == []


def test_text_only_model_is_refused(tiny_llama, folder, tmp_path):
    with pytest.raises(InputError, match="vision"):
        caption_folder(LLM(tiny_llama, backend="numpy"), folder, tmp_path / "x.jsonl", progress=False)


def test_cli_caption_command(tiny_idefics3, folder, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["caption", str(folder), "--out", str(out), "--model", str(tiny_idefics3), "--backend", "numpy",
            "--max-new-tokens", "3", "--batch-size", "4", "--tags", "--no-progress"]
    assert main(args) == 0
    rows = records(out)
    assert sorted(r["path"] for r in rows) == sorted(GOOD) and all(isinstance(r["tags"], list) for r in rows)
    err = capsys.readouterr().err
    assert f"skipped {BROKEN}" in err and f"captioned {len(GOOD)} images" in err
    assert main(args) == 0 and len(records(out)) == len(GOOD)
    assert "captioned 0 images" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "missing"), "--model", str(tiny_idefics3), "--backend", "numpy"]) == 2
