"""`smolvlm-fast caption --ray`: two Ray actors caption ~50 generated images of varied sizes into the same JSON
Lines as the local caption_folder (the same captions per path, every image once), a corrupt file listed in the
errors file without stopping the job, and a rerun that captions nothing. Needs Ray Data (pip install
'smolvlm_fast[ray]'): skipped without it. The images' sources (folder, glob, listing) are tested without Ray."""
import json

import numpy as np
import pytest
from PIL import Image

from smolvlm_fast import InputError
from smolvlm_fast.cli import main
from smolvlm_fast.serving.caption import caption_folder, errors_path
from smolvlm_fast.serving.llm import LLM
from smolvlm_fast.serving.ray_caption import find_source, glob_root

MAX_NEW_TOKENS = 3
IMAGES = 50
BROKEN = "b/broken.jpg"
OPTIONS = dict(backend="numpy", max_num_batched_tokens=256)  # the local LLM's and every actor's


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """IMAGES pictures of varied sizes, PNG and JPEG, in two subfolders, and one corrupt JPEG."""
    root = tmp_path_factory.mktemp("ray_photos")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        path = root / ("a" if i % 2 else "b") / f"img_{i:02d}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        size = (int(rng.integers(16, 80)), int(rng.integers(16, 80)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    (root / BROKEN).write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))  # a JPEG signature, then nothing
    return root


@pytest.fixture(scope="module")
def ray_local(request):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    request.addfinalizer(ray.shutdown)
    return ray


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_actors_match_the_local_command_and_resume(ray_local, tiny_idefics3, folder, tmp_path):
    from smolvlm_fast.serving.ray_caption import caption_with_ray

    local = tmp_path / "local.jsonl"
    caption_folder(LLM(tiny_idefics3, **OPTIONS), folder, local, max_new_tokens=MAX_NEW_TOKENS, batch_size=4,
                   model_name="tiny", progress=False)
    out = tmp_path / "ray.jsonl"
    run = dict(model=tiny_idefics3, llm_options=OPTIONS, max_new_tokens=MAX_NEW_TOKENS, batch_size=4,
               model_name="tiny", actors=2, cpus_per_actor=1, progress=False)
    summary = caption_with_ray(folder, out, **run)

    rows = records(out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in records(local))  # each image exactly once
    assert len(rows) == IMAGES and summary.captioned == IMAGES and summary.total == IMAGES + 1
    assert {r["path"]: r["caption"] for r in rows} == {r["path"]: r["caption"] for r in records(local)}
    assert all(set(r) == {"path", "caption", "seconds", "model"} and r["model"] == "tiny" for r in rows)
    assert list(summary.errors) == [BROKEN] and [r["path"] for r in records(errors_path(out))] == [BROKEN]

    again = caption_with_ray(folder, out, **run)  # a rerun: only the corrupt file is tried, and it fails again
    assert (again.captioned, again.already_done, list(again.errors)) == (0, IMAGES, [BROKEN])
    assert len(records(out)) == IMAGES


def test_cli_ray_from_a_listing(ray_local, tiny_idefics3, folder, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    names = ["a/img_01.png", "b/img_00.jpg", BROKEN]
    listing.write_text("# three of them\n" + "".join(f"{folder / n}\n" for n in names))
    out = tmp_path / "cli.jsonl"
    args = ["caption", str(listing), "--ray", "--ray-actors", "1", "--ray-cpus-per-actor", "1", "--out", str(out),
            "--model", str(tiny_idefics3), "--backend", "numpy", "--max-new-tokens", "2", "--no-progress"]
    assert main(args) == 0
    assert sorted(r["path"] for r in records(out)) == sorted(str(folder / n) for n in names[:2])  # absolute: outside
    assert "captioned 2 images" in capsys.readouterr().err
    assert main(args) == 0 and "captioned 0 images" in capsys.readouterr().err


def test_sources(folder, tmp_path):
    root, images = find_source(folder)
    assert root == folder and len(images) == IMAGES + 1
    root, images = find_source(f"{folder}/a/*.png")
    assert root == folder / "a" and images == sorted((folder / "a").glob("*.png"))
    assert find_source(f"{folder}/**/*.JPG")[1] == []  # a glob is matched as written; only then by extension
    assert len(find_source(f"{folder}/**/*")[1]) == IMAGES + 1
    listing = folder / "a" / "list.txt"
    listing.write_text("img_01.png\n\nimg_01.png\n../b/img_00.jpg\n")
    try:
        root, images = find_source(listing)
    finally:
        listing.unlink()
    assert root == folder / "a" and images == [folder / "a" / "img_01.png", folder / "a" / "../b/img_00.jpg"]
    assert glob_root("photos/2024/*/x.jpg").as_posix() == "photos/2024" and glob_root("*.jpg").as_posix() == "."
    with pytest.raises(InputError, match="not a folder"):
        find_source(tmp_path / "missing")
