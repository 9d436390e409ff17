"""Hostile images (tests/hostile_images.py) through every door: each is processed correctly or refused with a clear
InputError by load_image and the Processor (thin ones through both vision encoders, finite), skipped with its error by
`smolvlm-fast caption`, and answered 200 or an OpenAI-style 400 by the server. Also: the pixel limit, the image-count
limit and the format allowlist are checked before any pixel is decoded, and an EPS never reaches Ghostscript."""
import base64
import re

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from smolvlm_fast.errors import InputError
from smolvlm_fast.inputs import images
from smolvlm_fast.inputs.image_config import ImageConfig
from smolvlm_fast.inputs.images import load_image
from smolvlm_fast.inputs.processor import Processor
from smolvlm_fast.inputs.tiling import image_to_frames, tile_multiple_size
from smolvlm_fast.serving.llm import LLM
from tests.hostile_images import (
    EPS,
    LIMIT,
    NOT_ALLOWED,
    header_only_png,
    hostile_images,
    palette_transparent,
)

HOSTILE = hostile_images()
GOOD = [h for h in HOSTILE if h.error is None]
BAD = [h for h in HOSTILE if h.error is not None]
THIN = ["one_pixel.png", "strip_1x5000.png", "strip_5000x1.png"]


def by_name(name: str):
    return next(h for h in HOSTILE if h.name == name)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()  # the bytes decide the format, not the type


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for h in HOSTILE:
        (root / h.name).write_bytes(h.data)
    return root


@pytest.fixture(scope="module")
def processor(tiny_idefics3):
    return Processor.from_pretrained(tiny_idefics3)


# --- the library -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", HOSTILE, ids=lambda h: h.name)
def test_load_image_processes_or_refuses(h, folder):
    for source in (folder / h.name, data_uri(h.data)):
        if h.error is not None:
            with pytest.raises(InputError, match=h.error):
                load_image(source)
            continue
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == h.expected.shape
        np.testing.assert_allclose(out, h.expected, rtol=0, atol=h.atol, err_msg=h.name)


@pytest.mark.parametrize("h", HOSTILE, ids=lambda h: h.name)
def test_processor_processes_or_refuses(h, folder, processor):
    if h.error is not None:
        with pytest.raises(InputError, match=h.error):
            processor([folder / h.name], "<image>")
        return
    out = processor([folder / h.name], "<image>")
    pixels, mask = out["pixel_values"], out["pixel_attention_mask"]
    tile = processor.image_config.tile_size
    assert pixels.shape[2:] == (3, tile, tile) and np.isfinite(pixels).all() and mask.all()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_thin_images_through_the_vision_encoder(tiny_idefics3, folder, processor, backend):
    model = LLM(tiny_idefics3, backend=backend).model
    for name in THIN:
        out = processor([folder / name], "<image>")
        n_frames = out["pixel_values"].shape[1]
        features = model.image_features_per_row(out["pixel_values"], out["pixel_attention_mask"])[0]
        features = np.asarray(features.detach() if hasattr(features, "detach") else features)
        assert features.shape[0] == n_frames * processor.image_seq_len, name
        assert np.isfinite(features).all() and features.std() > 0, name


def test_a_one_pixel_wide_image_never_rounds_to_zero_width():
    """49 * (1 / 49) < 1 in floating point: the tile-multiple width of a 1-pixel-wide image became 0 (PIL cannot
    resize to that); it is one tile now."""
    assert tile_multiple_size(49, 1, 49) == (49, 49)
    frames, rows, cols = image_to_frames(np.zeros((98, 1, 3), np.uint8), ImageConfig(longest_edge=98, tile_size=49),
                                         splitting=True, upscale=True)
    assert (rows, cols) == (2, 1) and all(f.shape == (49, 49, 3) for f in frames)


def test_the_pixel_limit_is_configurable_and_checked_before_decoding(folder, processor, tiny_idefics3, monkeypatch):
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    with pytest.raises(InputError, match=LIMIT):
        load_image(folder / "bomb_7000x7000.png")  # 49 M pixels claimed
    assert loads == []  # refused from the header: nothing was decoded
    monkeypatch.undo()
    small = folder / "plain.bmp"  # 9 x 7 = 63 pixels
    with pytest.raises(InputError, match=r"9x7 = 63 pixels, over the limit of 62 pixels \(max_image_pixels\)"):
        load_image(small, max_pixels=62)
    with pytest.raises(InputError, match="limit of 62 pixels"):
        load_image(Image.open(small), max_pixels=62)  # a PIL image is checked before it is decoded too
    with pytest.raises(InputError, match="limit of 62 pixels"):
        Processor.from_pretrained(tiny_idefics3, max_image_pixels=62)([small], "<image>")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 62)  # the module-wide default
    with pytest.raises(InputError, match="limit of 62 pixels"):
        processor([small], "<image>")
    assert load_image(np.zeros((10, 10, 3), np.uint8)).shape == (10, 10, 3)  # arrays are decoded already: no limit


def test_pillows_own_bomb_limit_is_an_input_error_too(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(header_only_png(20000, 10000))  # 200 M: over Pillow's error limit, even when ours is raised
    with pytest.raises(InputError, match="bomb.png has more pixels than the limit of 300,000,000 pixels"):
        load_image(path, max_pixels=300_000_000)


def test_the_image_count_limit_is_checked_before_any_image_is_read(tiny_idefics3, processor, tmp_path):
    missing = [tmp_path / f"missing{i}.png" for i in range(3)]  # reading any of them would fail otherwise
    limited = Processor.from_pretrained(tiny_idefics3, max_images=2)
    with pytest.raises(InputError, match=r"prompt 0 has 3 images, over the limit of 2 \(max_images\)"):
        limited(missing, "<image>" * 3)
    with pytest.raises(InputError, match="over the limit of 2"):
        limited(images=[missing])  # without text too
    many = [tmp_path / "x.png"] * 33
    with pytest.raises(InputError, match="33 images, over the limit of 32"):
        processor(many, "<image>" * 33)


def test_eps_never_reaches_ghostscript(folder, monkeypatch):
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append("Ghostscript"))
    real_open = EpsImagePlugin.EpsImageFile._open

    def spy_open(self):
        calls.append("EpsImageFile._open")
        return real_open(self)

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy_open)
    for source in (folder / "postscript.jpg", data_uri(EPS)):
        with pytest.raises(InputError, match=NOT_ALLOWED):
            load_image(source)
    assert calls == []
    Image.open(folder / "postscript.jpg")  # the spy sees Pillow's own open of the same file, so it is armed
    assert calls == ["EpsImageFile._open"]


def test_palette_transparency(folder):
    """A palette PNG with a transparent colour: as a file it gives the palette colours, as transformers' load_image
    does (convert('RGB'), which drops transparency, like an RGBA file's alpha); as a PIL image it is composited on
    white, as transformers' convert_to_rgb does."""
    transformers_image_utils = pytest.importorskip("transformers.image_utils")
    path = folder / "palette_transparent.png"
    _, palette_rgb = palette_transparent()
    ours = load_image(path)
    np.testing.assert_array_equal(ours, np.asarray(transformers_image_utils.load_image(str(path))))
    np.testing.assert_array_equal(ours, palette_rgb)
    composited = load_image(Image.open(path))
    transparent = np.asarray(Image.open(path)) == 0
    assert (composited[transparent] == 255).all()
    np.testing.assert_array_equal(composited[~transparent], palette_rgb[~transparent])


# --- the caption command -----------------------------------------------------------------------------------------


def test_caption_command_skips_the_bad_and_captions_the_rest(tiny_idefics3, folder, tmp_path, capsys):
    import json

    from smolvlm_fast.cli import main
    from smolvlm_fast.serving.caption import errors_path

    out = tmp_path / "captions.jsonl"
    args = ["caption", str(folder), "--out", str(out), "--model", str(tiny_idefics3), "--backend", "numpy",
            "--max-new-tokens", "2", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    captioned = {json.loads(line)["path"] for line in out.read_text().splitlines()}
    errors = {r["path"]: r["error"] for r in map(json.loads, errors_path(out).read_text().splitlines())}
    assert captioned == {h.name for h in GOOD}
    assert set(errors) == {h.name for h in BAD}
    for h in BAD:
        assert re.search(h.error, errors[h.name]), (h.name, errors[h.name])
    err = capsys.readouterr().err
    assert all(f"skipped {h.name}" in err for h in BAD) and f"captioned {len(GOOD)} images" in err


# --- the server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_idefics3):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from smolvlm_fast.serving.server.app import create_app

    llm = LLM(tiny_idefics3, backend="numpy", max_num_batched_tokens=256)
    with TestClient(create_app(llm, model_name="tiny")) as client:
        yield client
    llm.shutdown()


@pytest.mark.parametrize("h", HOSTILE, ids=lambda h: h.name)
def test_server_answers_200_or_an_openai_400(client, h):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(h.data)}}, {"type": "text", "text": "What is it?"}]}]}
    response = client.post("/v1/chat/completions", json=body)
    if h.error is None:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return
    assert response.status_code == 400, (h.name, response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"].startswith("messages"), error
