"""README.md stays true: its test command is what CI runs, and its quick-start code runs."""
import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("pip install")]
    assert len(ci_lines) == 1 and ci_lines[0] in README


def python_block(containing: str) -> str:
    """The README's first ```python block that contains the text."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if containing in b]
    assert blocks, f"no python block in README.md holds {containing!r}"
    return blocks[0]


@pytest.mark.slow
@pytest.mark.parametrize("containing", ["AutoModelForCausalLM.from_pretrained()", "llm = LLM()",
                                        "json_schema=capital"])
def test_default_model_examples_run(smollm2_gguf, containing, capsys):
    """The examples that need no checkpoint of the reader's own run as written, on the real default model."""
    exec(compile(python_block(containing), "README.md", "exec"), {})
    assert "Paris" in capsys.readouterr().out


def test_quick_start_runs(tiny_idefics3, tmp_path, capsys):
    code = python_block("AutoModelForVision2Seq")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "photo.jpg")
    code = code.replace('"HuggingFaceTB/SmolVLM-256M-Instruct"', repr(str(tiny_idefics3)))
    code = code.replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg"))).replace("max_new_tokens=500", "max_new_tokens=8")
    exec(compile(code, "README.md", "exec"), {})
    assert "Assistant:" in capsys.readouterr().out


def test_image_budget_example_runs(tiny_idefics3, tmp_path, capsys):
    code = python_block('image_detail="low"')
    Image.new("RGB", (80, 60), (30, 200, 30)).save(tmp_path / "photo.jpg")
    code = code.replace('"./SmolVLM-256M-Instruct"', repr(str(tiny_idefics3)))
    code = code.replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg")))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["inputs"]["pixel_values"].shape[1] == 5  # 80 x 60 -> 192 x 144 -> 3 x 3, capped to 2 x 2, + 1
    scope["llm"].shutdown()


def test_video_example_runs(tmp_path_factory, capsys):
    pytest.importorskip("av")
    from tests.video_reference import make_videos, small_checkpoint

    code = python_block('video="clip.mp4"')
    checkpoint = small_checkpoint(tmp_path_factory)
    (clip,) = make_videos(tmp_path_factory, [(8, 4, 64, 48)])
    code = code.replace('"./SmolVLM2-256M-Video-Instruct"', repr(str(checkpoint)))
    code = code.replace('"clip.mp4"', repr(str(clip)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(capsys.readouterr().out.splitlines()) >= 2
    stats = scope["llm"].stats
    assert stats.images_encoded == 4  # 4 frames sampled (2 a second of 2 s), encoded for the first question only
    scope["llm"].shutdown()
