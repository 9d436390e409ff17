"""`smolvlm-fast demo` (serving/demo.py): the handlers against LLM.generate on the tiny checkpoints, then the page
itself in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): upload, ask, the
streamed answer equal to the Python API's greedy one, a bad upload shown as an error while the app goes on."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess

import pytest

gr = pytest.importorskip("gradio", reason="the demo needs its extra: pip install -e '.[demo]'")

from smolvlm_fast import LLM, SamplingParams  # noqa: E402
from smolvlm_fast.serving.demo import Demo, DemoLimits, build_demo  # noqa: E402

QUESTION = "What is in the picture?"
TOKENS = 8  # short answers: the point is the page, not the model


@pytest.fixture(scope="module")
def llm(tiny_smolvlm):
    llm = LLM(tiny_smolvlm, backend="numpy")
    yield llm
    llm.shutdown()


@pytest.fixture
def image_file(tmp_path, large_rgb):
    path = tmp_path / "photo.png"
    large_rgb.save(path)
    return path


def greedy_text(llm, image, question=QUESTION) -> str:
    chat = [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": question}]}]
    out = llm.generate(chat, SamplingParams(max_new_tokens=TOKENS, temperature=0))[0]
    assert out.error is None, out.error
    return out.text


def answers(demo: Demo, image, question=QUESTION, video=None) -> list[tuple[str, str]]:
    """Every (answer so far, stats line) the handler yields."""
    async def collect():
        return [item async for item in demo.answer(image and str(image), video, question, TOKENS, 0.0)]
    return asyncio.run(collect())


# -- the handlers -------------------------------------------------------------------------------------------------

def test_streamed_answer_is_the_greedy_one(llm, image_file):
    steps = answers(Demo(llm, "tiny"), image_file)
    text, stats = steps[-1]
    assert text == greedy_text(llm, image_file)
    assert len(steps) >= 2 and all(text.startswith(t) for t, _ in steps)  # streamed: each step extends the last
    for part in ("model: tiny", "backend: numpy", "time to first token:", "tokens/s", "finished (length)"):
        assert part in stats, stats


def test_users_share_the_engine(llm, image_file):
    """Two users at once: both through the one LLM (its engine batches them), each answer its own greedy one."""
    demo = Demo(llm, "tiny")

    async def two():
        async def one(q):
            return [t async for t, _ in demo.answer(str(image_file), None, q, TOKENS, 0.0)][-1]
        return await asyncio.gather(one(QUESTION), one("Describe this image in detail."))

    first, second = asyncio.run(two())
    assert first == greedy_text(llm, image_file)
    assert second == greedy_text(llm, image_file, "Describe this image in detail.")


def test_bad_uploads_are_errors(llm, image_file, tmp_path):
    demo = Demo(llm, "tiny", DemoLimits(max_image_bytes=os.path.getsize(image_file) + 100, max_image_pixels=55_000))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image at all")
    with pytest.raises(gr.Error, match="Not a usable image"):
        answers(demo, not_image)
    big = tmp_path / "big.png"
    big.write_bytes(image_file.read_bytes() + b"\0" * 200)
    with pytest.raises(gr.Error, match="too large"):
        answers(demo, big)
    from PIL import Image
    Image.new("RGB", (300, 200)).save(tmp_path / "wide.png")  # 60,000 pixels, over the 55,000 asked for
    with pytest.raises(gr.Error, match="over the limit"):
        answers(demo, tmp_path / "wide.png")
    with pytest.raises(gr.Error, match="question"):
        answers(demo, image_file, question="  ")
    with pytest.raises(gr.Error, match="takes no video"):
        answers(demo, None, video=str(image_file))
    assert answers(demo, image_file)[-1][0] == greedy_text(llm, image_file)  # and the demo goes on


def test_text_only_model(tiny_llama, image_file):
    llm = LLM(tiny_llama, backend="numpy")
    try:
        demo = Demo(llm, "tiny-llama")
        assert not demo.takes_images
        with pytest.raises(gr.Error, match="text-only"):
            answers(demo, image_file)
        chat = [{"role": "user", "content": "Tell me a story."}]
        expected = llm.generate(chat, SamplingParams(max_new_tokens=TOKENS, temperature=0))[0].text
        assert answers(demo, None, "Tell me a story.")[-1][0] == expected
        assert isinstance(build_demo(llm, "tiny-llama"), gr.Blocks)
    finally:
        llm.shutdown()


def test_cli_has_the_command():
    from smolvlm_fast.cli import build_parser, run_demo
    args = build_parser().parse_args(["demo", "DIR", "--port", "7000", "--max-image-bytes", "5"])
    assert (args.run, args.model, args.port, args.host, args.max_image_bytes) == (run_demo, "DIR", 7000, "127.0.0.1", 5)


# -- the page in a headless Chromium ------------------------------------------------------------------------------

def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver), installed with apt-get when missing and this runs as root; else the test skips."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver); not "
                    "root or no apt-get here, so they were not installed")
    try:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                       check=True, capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"could not install chromium and chromium-driver with apt-get: {e}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("apt-get ran but chromium or chromedriver is still missing")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")
    chromium, chromedriver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture
def page(llm, image_file):
    """The demo on a free port of this machine, answering at most TOKENS tokens (the slider's default then), taking
    images up to a little more than image_file's bytes."""
    limits = DemoLimits(max_new_tokens=TOKENS, max_image_bytes=os.path.getsize(image_file) + 100)
    blocks = build_demo(llm, "tiny-smolvlm", limits, concurrency=4)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    blocks.close()


def ask(driver, url: str, image, question: str):
    """Load the page, upload image, ask question; the WebDriverWait for the next thing to look at."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))  # uploaded: the preview is there
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#ask").click()
    return wait


def streamed_answer(driver, url, image, question) -> str:
    from selenium.webdriver.common.by import By

    wait = ask(driver, url, image, question)
    wait.until(lambda d: "finished" in d.find_element(By.ID, "stats").text)
    return driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")


def shown(text: str) -> str:
    """Text as a textarea's value holds it: the HTML spec turns CR and CRLF into LF (the tiny random model writes
    any byte), and outer whitespace is left out on both sides."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def test_page_in_chromium(browser, page, llm, image_file, tmp_path):
    from selenium.webdriver.common.by import By

    assert shown(streamed_answer(browser, page, image_file, QUESTION)) == shown(greedy_text(llm, image_file))
    stats = browser.find_element(By.ID, "stats").text
    assert "tiny-smolvlm" in stats and "time to first token" in stats and "tokens/s" in stats, stats
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    not_image = tmp_path / "notes.png"  # an image's name, so that only the app's own check can refuse it
    not_image.write_text("not an image at all")
    wait = ask(browser, page, not_image, QUESTION)
    wait.until(lambda d: "Not a usable image" in d.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(tmp_path / "demo-error.png"))
    too_large = tmp_path / "large.png"
    too_large.write_bytes(image_file.read_bytes() + b"\0" * 200)  # still a PNG, over the page's byte limit
    wait = ask(browser, page, too_large, QUESTION)
    wait.until(lambda d: "too large" in d.find_element(By.TAG_NAME, "body").text)

    second = "Describe this image in detail."  # the app goes on serving
    assert shown(streamed_answer(browser, page, image_file, second)) == shown(greedy_text(llm, image_file, second))
