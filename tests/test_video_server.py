"""Video through the server and the commands: a {"type": "video_url"} content part (a data: URL or a file in the
allowed directory; remote URLs off by default) answers as LLM.generate does; bad videos are 400s that leave the
server serving; `generate --video` and `caption` over a folder with video files."""
import base64
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("av")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from smolvlm_fast import SamplingParams  # noqa: E402
from smolvlm_fast.serving.llm import LLM  # noqa: E402
from smolvlm_fast.serving.server.app import create_app  # noqa: E402
from smolvlm_fast.serving.server.protocol import Limits  # noqa: E402
from tests.server_harness import running  # noqa: E402
from tests.video_reference import make_video, video_checkpoint  # noqa: E402

MODEL = "tiny-smolvlm2"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return video_checkpoint(tmp_path_factory.mktemp("smolvlm2") / "model", fps=2, max_frames=4)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    clip = make_video(allowed / "clip.mp4", 30, 10, 48, 36, seed=3)
    llm = LLM(checkpoint, backend="numpy", max_num_batched_tokens=256, ignore_eos=True)
    app = create_app(llm, model_name=MODEL, allowed_local_dir=allowed, limits=Limits(max_body_bytes=1 << 20))
    with running(app) as url:
        yield SimpleNamespace(url=url, llm=llm, clip=clip, allowed=allowed)
    llm.shutdown()


def video_data_url(path) -> str:
    return f"data:video/mp4;base64,{base64.b64encode(path.read_bytes()).decode()}"


def ask(server, url: str, max_tokens: int = 6):
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                     {"type": "text", "text": "What happens?"}]}]}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def test_a_video_part_answers_as_generate(server):
    want = server.llm.generate("What happens?", SamplingParams(max_new_tokens=6), video=str(server.clip))[0]
    for url in (video_data_url(server.clip), "clip.mp4", f"file://{server.clip}"):
        reply = ask(server, url)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == want.text
        assert reply.json()["usage"]["prompt_tokens"] == want.num_prompt_tokens


@pytest.mark.parametrize("url, code", [
    ("https://example.com/clip.mp4", "remote_urls_disabled"),
    ("../outside.mp4", "path_not_allowed"),
    ("data:video/mp4;base64,AAAAIGZ0eXBpc29t", None),  # an MP4 header and nothing after it
    ("data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode(), "invalid_video"),
    ("data:image/png;base64,AAAA", "invalid_video"),
    ("missing.mp4", "image_not_found"),
])
def test_bad_videos_are_400s_and_the_server_serves_on(server, url, code):
    reply = ask(server, url)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert ask(server, "clip.mp4", 2).status_code == 200


def test_a_truncated_video_is_a_400(server):
    data = server.clip.read_bytes()
    (server.allowed / "cut.mp4").write_bytes(data[: len(data) // 3])
    reply = ask(server, "cut.mp4")
    assert reply.status_code == 400 and "cannot decode video data URI" in reply.json()["error"]["message"]
    assert str(server.allowed) not in reply.text  # the server's own paths stay its own


def test_a_model_without_video_refuses_video_parts(tiny_idefics3, tmp_path):
    llm = LLM(tiny_idefics3, backend="numpy")
    clip = make_video(tmp_path / "c.mp4", 5, 5, 16, 16)
    with running(create_app(llm, model_name=MODEL, allowed_local_dir=tmp_path)) as url:
        reply = ask(SimpleNamespace(url=url), video_data_url(clip))
    llm.shutdown()
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "video_not_supported"


def test_generate_command_takes_a_video(checkpoint, server, capsys):
    from smolvlm_fast.cli import main

    assert main(["generate", "What happens?", "--model", str(checkpoint), "--video", str(server.clip),
                 "--max-new-tokens", "5", "--backend", "numpy"]) == 0
    printed = capsys.readouterr().out.strip()
    want = LLM(checkpoint, backend="numpy").generate("What happens?", SamplingParams(max_new_tokens=5),
                                                     video=str(server.clip))[0]
    assert printed == want.text.strip()


def test_caption_takes_video_files(checkpoint, tmp_path):
    from smolvlm_fast.serving.caption import caption_folder

    folder = tmp_path / "media"
    folder.mkdir()
    make_video(folder / "a.mp4", 20, 10, 32, 24, seed=1)
    (folder / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really")
    out = tmp_path / "captions.jsonl"
    llm = LLM(checkpoint, backend="numpy", ignore_eos=True)
    summary = caption_folder(llm, folder, out, max_new_tokens=4, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == ["a.mp4"] and records[0]["caption"] is not None
    assert summary.captioned == 1 and list(summary.errors) == ["broken.webm"]
