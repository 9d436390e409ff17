"""The one import of the C++ CPU extension (smolvlm_fast._cpu, built from csrc/cpu/ by `pip install -e .`).

`_cpu` is None when the extension is not built (or was built for another CPU); every caller then runs its NumPy
code instead. Modules take `_cpu` from here, never from the package, so one place decides whether it loads.
"""
from __future__ import annotations

try:
    from .. import _cpu
    import_error: str | None = None
except ImportError as e:  # not built, or built for another CPU (the message says which)
    _cpu, import_error = None, str(e)


def available() -> bool:
    return _cpu is not None
