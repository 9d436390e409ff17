"""Structured outputs from the commands: `generate --json-schema FILE` prints a JSON value that satisfies the schema
(as LLM.generate gives it), `caption --json-schema FILE` writes one validated object per image into the JSONL; a
missing, malformed or uncompilable schema is an error (exit 2) before any work, and so is --tags with a schema."""
import json

import numpy as np
import pytest
from PIL import Image

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from smolvlm_fast import LLM, SamplingParams  # noqa: E402
from smolvlm_fast.cli import main  # noqa: E402
from smolvlm_fast.serving.caption import caption_folder, json_prompt  # noqa: E402
from tests.structured_schemas import FINITE, INVALID, MAX_FINITE_TOKENS, NESTED, PERSON  # noqa: E402


def schema_file(tmp_path, schema, name="schema.json"):
    path = tmp_path / name
    path.write_text(json.dumps(schema))
    return path


def test_generate_prints_json_that_validates(tiny_llama, tmp_path, capsys):
    path = schema_file(tmp_path, PERSON)
    assert main(["generate", "A person as JSON.", "--model", str(tiny_llama), "--backend", "numpy",
                 "--max-new-tokens", str(MAX_FINITE_TOKENS), "--json-schema", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    jsonschema.validate(json.loads(printed), PERSON)
    chat = [{"role": "user", "content": "A person as JSON."}]
    llm = LLM(tiny_llama, backend="numpy")
    assert printed == llm.generate(chat, SamplingParams(max_new_tokens=MAX_FINITE_TOKENS, json_schema=PERSON,
                                                        top_k=50))[0].text.strip()


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{oops", "is not JSON"),
    ("[1, 2]", "must hold a JSON Schema object"),
    (json.dumps(INVALID[0]), "cannot be used for structured output"),
])
def test_generate_refuses_a_bad_schema_file(tiny_llama, tmp_path, capsys, content, message):
    """argparse refuses an unreadable or non-object file (SystemExit 2); one llguidance cannot compile returns 2."""
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    try:
        code = main(["generate", "hi", "--model", str(tiny_llama), "--backend", "numpy", "--json-schema", str(path)])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_caption_writes_one_validated_object_per_image(tiny_smolvlm, photos, tmp_path, capsys):
    out = tmp_path / "tags.jsonl"
    path = schema_file(tmp_path, NESTED)
    args = ["caption", str(photos), "--out", str(out), "--model", str(tiny_smolvlm), "--backend", "numpy",
            "--json-schema", str(path), "--max-new-tokens", str(MAX_FINITE_TOKENS), "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == ["a.png", "b.jpg", "sub/c.png"]
    for row in rows:
        assert set(row) == {"path", "json", "seconds", "model"}
        jsonschema.validate(row["json"], NESTED)
    assert main(args) == 0 and len(out.read_text().splitlines()) == 3  # resumed: nothing left to do
    assert "captioned 0 images" in capsys.readouterr().err


def test_caption_reports_json_cut_by_max_new_tokens(tiny_smolvlm, photos, tmp_path):
    llm = LLM(tiny_smolvlm, backend="numpy")
    out = tmp_path / "short.jsonl"
    summary = caption_folder(llm, photos, out, json_schema=FINITE[0][1], max_new_tokens=3, progress=False)
    assert summary.captioned == 0 and len(summary.errors) == 3
    assert all("did not end within max_new_tokens" in e for e in summary.errors.values())


def test_caption_refuses_tags_with_a_schema_and_an_uncompilable_schema(tiny_smolvlm, photos, tmp_path, capsys):
    base = ["caption", str(photos), "--out", str(tmp_path / "x.jsonl"), "--model", str(tiny_smolvlm),
            "--backend", "numpy", "--no-progress"]
    assert main(base + ["--tags", "--json-schema", str(schema_file(tmp_path, NESTED))]) == 2
    assert "--tags and --json-schema" in capsys.readouterr().err
    assert main(base + ["--json-schema", str(schema_file(tmp_path, INVALID[1], "bad.json"))]) == 2
    assert "cannot be used for structured output" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists() or not (tmp_path / "x.jsonl").read_text()


def test_json_prompt_names_the_fields():
    assert json_prompt(NESTED) == "Describe this image. Answer in JSON with the fields scene, confidence."
    assert json_prompt({"type": "object"}) == "Describe this image. Answer in JSON."
