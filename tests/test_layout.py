"""The package's layers hold: every import inside smolvlm_fast goes down (or sideways within a layer), never up, and
no module imports one that imports it back (imports inside functions count too). Read from the source with ast, so
nothing is imported; the README's "Layout" section describes the same layers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smolvlm_fast"
KERNELS = PACKAGE.parent / "kernels"  # installed as smolvlm_fast.kernels

# Top to bottom. A module belongs to the first entry its name starts with (a package name covers its modules).
LAYERS = [
    ("smolvlm_fast", "smolvlm_fast.cli", "smolvlm_fast.env"),   # the package's front, the command line, the report
    ("smolvlm_fast.serving",),                                  # LLM, the server, the captioner
    ("smolvlm_fast.auto", "smolvlm_fast.random_checkpoint"),    # the transformers-shaped API; checkpoints to test with
    ("smolvlm_fast.engine", "smolvlm_fast.patch"),              # the generation loop; transformers models patched
    ("smolvlm_fast.models",),                                   # the forward passes (torch, NumPy)
    ("smolvlm_fast.cpu", "smolvlm_fast.formats"),               # C++-backed NumPy pieces; file formats
    ("smolvlm_fast.config", "smolvlm_fast.inputs", "smolvlm_fast.response_format"),  # configs; inputs; JSON formats
    ("smolvlm_fast.ops", "smolvlm_fast.errors", "smolvlm_fast.kernels", "smolvlm_fast._cpu", "smolvlm_fast._C"),
]


def module_files() -> dict[str, Path]:
    files = {}
    for root, name in ((PACKAGE, "smolvlm_fast"), (KERNELS, "smolvlm_fast.kernels")):
        for path in root.rglob("*.py"):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()
EXTENSIONS = {"smolvlm_fast._cpu", "smolvlm_fast._C"}  # built from csrc/; imported like modules


def layer(module: str) -> int:
    """The layer's index (0 at the top), by the longest entry that names the module or a package above it."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's Layout)"
    return best


def imports(module: str, path: Path) -> set[str]:
    """The package modules `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("smolvlm_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("smolvlm_fast"):
                target = node.module
            else:
                continue
            # `from package import submodule` imports the submodule; other names come from the module itself
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES.keys() | EXTENSIONS}
            found |= subs or {target}
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m != module}


GRAPH = {m: imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    if module == "smolvlm_fast":
        return  # the package's front re-exports the public API from every layer
    up = sorted(t for t in GRAPH[module] if t in MODULES.keys() | EXTENSIONS and layer(t) < layer(module))
    assert not up, f"{module} (layer {layer(module)}: {LAYERS[layer(module)]}) imports upward: {up}"


def test_no_import_circle():
    """Depth-first search over the import graph; the package's front (which re-exports everything) is left out."""
    graph = {m: {t for t in ts if t in MODULES and t != "smolvlm_fast"} for m, ts in GRAPH.items() if m != "smolvlm_fast"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_walk_sees_imports():
    """The walk itself finds what is there (else the tests above could not fail)."""
    assert "smolvlm_fast.engine.scheduler" in GRAPH["smolvlm_fast.engine.engine"]
    assert "smolvlm_fast.cpu.native" in GRAPH["smolvlm_fast.cpu.linear"]
    assert layer("smolvlm_fast.serving.server.app") < layer("smolvlm_fast.engine.engine") < layer("smolvlm_fast.ops")


def test_subpackages_import_without_torch():
    """Every subpackage's __init__ (the PyTorch-free install imports them) works with torch unavailable."""
    packages = sorted(m for m, p in MODULES.items() if p.name == "__init__.py" and m != "smolvlm_fast.kernels")
    code = "import sys\nsys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in packages)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-2000:]


def test_pyproject_lists_every_package():
    """An editable install finds a package pyproject.toml forgets; a real install (and the fresh-clone CI) does not."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == packages, f"missing: {sorted(packages - listed)}, not a package: {sorted(listed - packages)}"
