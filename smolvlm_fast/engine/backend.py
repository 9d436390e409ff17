"""The backend a model computes in, fixed when it is loaded: "torch" (models/smolvlm_torch.SmolVLM, on the CPU or
CUDA) or "numpy" (models/smolvlm_numpy.NumpyModel, no PyTorch at all). Each model class names its own (its
`backend` attribute), and `backend_of(model)` gives the object below; what the engine and the front doors do
differently per backend is here, and nowhere else.

torch is imported inside TorchBackend's methods only: the PyTorch-free path never imports it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np

from ..errors import InputError


def as_numpy(x, dtype=np.float32) -> np.ndarray:
    """A caller's array (a torch tensor on any device, a NumPy array, nested lists) as a NumPy array of dtype."""
    if hasattr(x, "detach"):  # a torch tensor, from a caller: off its device, and bfloat16 (no NumPy type) widened
        x = x.detach().cpu()
        x = (x.float() if x.dtype.is_floating_point else x).numpy()
    return np.asarray(x, dtype=dtype)


class NumpyBackend:
    name = "numpy"

    def inference(self):
        """The context steps run in (per thread): nothing to switch off here."""
        return nullcontext()

    def to_numpy(self, x) -> np.ndarray:
        """The model's output (logits) as float32 NumPy."""
        return np.asarray(x, dtype=np.float32)

    def from_numpy(self, x: np.ndarray):
        """A NumPy array as the backend's array type (what the transformers-style API hands back)."""
        return x

    def model_input(self, x, dtype):
        """A caller's pixel_values or mask as the model takes it (a torch tensor from a caller becomes NumPy)."""
        return as_numpy(x, dtype)

    def scatter_rows(self, rows, keep: np.ndarray):
        """[T, V] rows -> [B, S, V] with the rows at the kept positions and zeros elsewhere."""
        out = np.zeros((*keep.shape, rows.shape[-1]), dtype=rows.dtype)
        out[keep] = rows
        return out

    def kv_itemsize(self, model) -> int:
        return np.dtype(getattr(model, "kv_dtype", np.float32)).itemsize  # float32 or float16 (NumpyModel.kv_dtype)

    def free_memory(self, model) -> tuple[int | None, str]:
        """(bytes free for the KV cache where the model runs, or None when unknown; which memory that is)."""
        return host_available_bytes(), "host"


class TorchBackend:
    name = "torch"

    def inference(self):
        import torch
        return torch.inference_mode()

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def from_numpy(self, x: np.ndarray):
        import torch
        return torch.as_tensor(x)

    def model_input(self, x, dtype):
        return x  # the torch model moves it to its device and dtype itself

    def scatter_rows(self, rows, keep: np.ndarray):
        import torch
        out = torch.zeros(*keep.shape, rows.shape[-1], dtype=rows.dtype, device=rows.device)
        out[torch.as_tensor(keep, device=rows.device)] = rows
        return out

    def kv_itemsize(self, model) -> int:
        return model.dtype.itemsize  # the cache is allocated in the model's dtype

    def free_memory(self, model) -> tuple[int | None, str]:
        import torch
        if model.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(model.device)
            return int(free), "cuda"
        return host_available_bytes(), "host"


BACKENDS = {b.name: b for b in (NumpyBackend(), TorchBackend())}


def backend_named(name: str):
    if name not in BACKENDS:
        raise InputError(f"backend must be 'torch' or 'numpy', got {name!r}")
    return BACKENDS[name]


def backend_of(model):
    """The backend a smolvlm_fast model computes in (the one its class names)."""
    return backend_named(getattr(model, "backend", None))


def host_available_bytes() -> int | None:
    """The memory the host can still give (MemAvailable), or its free pages where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
