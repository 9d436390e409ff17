#!/usr/bin/env bash
# The Python install steps of both container images (docker/Dockerfile.cpu and docker/Dockerfile.cuda RUN this file),
# kept in one script so that tests/test_docker.py can run the very same steps outside Docker, in a fresh virtual
# environment. System packages (a C++ compiler, Python's headers) are the Dockerfiles' business, since they differ
# by base image.
#
# Settings (environment variables):
#   SRC              the source tree to install (default: the folder above this script)
#   VENV             the virtual environment to create and install into (default: /opt/venv)
#   PYTHON           the interpreter that creates it (default: python3)
#   EXTRAS           the package's extras, comma-separated (default: server)
#   BUILD_CUDA       1: build the CUDA kernels (smolvlm_fast._C, needs nvcc) and fail if they do not build;
#                    0: skip them (default). The C++ CPU kernels (smolvlm_fast._cpu) are always built, and a failed
#                    build is an error: an image without them would silently run the slow pure-NumPy path.
#   TORCH_INDEX_URL  install torch from this index first (a CUDA build, e.g. https://download.pytorch.org/whl/cu130);
#                    empty (the default): no torch at all, and the script checks that nothing pulled it in
#   TORCH_SPEC       the requirement installed from TORCH_INDEX_URL (default: torch)
#   CUDA_ARCH        SMOLVLM_FAST_CUDA_ARCH for the CUDA build (default: setup.py's: the local GPU's, else 8.0+PTX;
#                    a `docker build` sees no GPU, so the CUDA Dockerfile always passes a list)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SRC="${SRC:-$(dirname "$here")}"
VENV="${VENV:-/opt/venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-server}"
BUILD_CUDA="${BUILD_CUDA:-0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
TORCH_SPEC="${TORCH_SPEC:-torch}"
CUDA_ARCH="${CUDA_ARCH:-}"

say() { echo "install.sh: $*" >&2; }
fail() { say "ERROR: $*"; exit 1; }

command -v "$PYTHON" >/dev/null || fail "PYTHON=$PYTHON is not an interpreter on PATH"
[ -f "$SRC/pyproject.toml" ] || fail "SRC=$SRC holds no pyproject.toml (point SRC at the smolvlm_fast checkout)"
SRC="$(cd "$SRC" && pwd)"  # absolute: the checks below run from another folder
case "$BUILD_CUDA" in 0|1) ;; *) fail "BUILD_CUDA must be 0 or 1, got '$BUILD_CUDA'";; esac
if [ "$BUILD_CUDA" = 1 ] && [ -z "$TORCH_INDEX_URL" ]; then
    fail "BUILD_CUDA=1 without TORCH_INDEX_URL: the CUDA image runs the torch backend, so it needs a CUDA build of torch"
fi

say "creating the virtual environment $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"  # no --system-site-packages: only what this script installs is importable
py="$VENV/bin/python"
# --no-cache-dir: nothing of pip's cache stays in an image layer
pip_install() { "$py" -m pip install --no-cache-dir --disable-pip-version-check "$@"; }

if [ -n "$TORCH_INDEX_URL" ]; then
    # First, and from its own index: the package's extras ask for torch>=2.5, which this then satisfies, so the
    # second step cannot swap in PyPI's build.
    say "installing $TORCH_SPEC from $TORCH_INDEX_URL"
    pip_install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
fi

export SMOLVLM_FAST_BUILD_CPU=1
export SMOLVLM_FAST_BUILD_CUDA="$BUILD_CUDA"
if [ -n "$CUDA_ARCH" ]; then export SMOLVLM_FAST_CUDA_ARCH="$CUDA_ARCH"; fi
say "installing smolvlm_fast[$EXTRAS] from $SRC (building the C++ kernels$([ "$BUILD_CUDA" = 1 ] && echo ' and the CUDA kernels'))"
# A regular (not editable) install: the image keeps the installed package, not the source tree.
pip_install "$SRC[$EXTRAS]"

say "checking the install"
# from the venv's folder, not the source tree: `python -c` and `-m` put the current folder first on sys.path, and
# the checks must see the installed package, not the source's
cd "$VENV"
"$py" -c "import smolvlm_fast, smolvlm_fast._cpu; print('smolvlm_fast', smolvlm_fast.__version__, 'with _cpu')" \
    || fail "smolvlm_fast or its C++ CPU kernels (smolvlm_fast._cpu) do not import"
if [ "$BUILD_CUDA" = 1 ]; then
    # _C links the CUDA runtime statically, so it imports at build time, without a GPU or a driver
    "$py" -c "import smolvlm_fast._C" || fail "the CUDA kernels (smolvlm_fast._C) do not import"
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)" \
        || fail "torch or triton does not import"
    "$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
        || fail "the torch installed is not a CUDA build (TORCH_INDEX_URL=$TORCH_INDEX_URL)"
elif [ -z "$TORCH_INDEX_URL" ]; then
    # The PyTorch-free image: a dependency that pulled torch in would add gigabytes and change the default backend
    if "$py" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 1)"; then
        fail "torch got installed into the PyTorch-free environment (by a dependency of smolvlm_fast[$EXTRAS])"
    fi
fi
"$VENV/bin/smolvlm-fast" serve --help >/dev/null || fail "smolvlm-fast serve does not start (is the server extra in EXTRAS?)"
# the versions, the extensions and the backend a CPU user gets, into the build log
"$py" -m smolvlm_fast.env || fail "python -m smolvlm_fast.env failed"
say "done: $VENV/bin/smolvlm-fast"
