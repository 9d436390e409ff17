"""The backend a model computes in, fixed when it is loaded: "torch" (models/smolvlm_torch.SmolVLM, on the CPU or
CUDA) or "numpy" (models/smolvlm_numpy.NumpyModel, no PyTorch at all). Each model class names its own (its
`backend` attribute), and `backend_of(model)` gives the object below; what the engine and the front doors do
differently per backend is here, and nowhere else, and so is which backend a caller gets who names none
(choose_backend: every front door, the env report too, asks it).

torch is imported inside TorchBackend's methods, and by choose_backend to ask whether a CUDA GPU is there
(device None) or whether torch is there at all (no fused C++ step, torch-only options): a caller who names
backend="numpy", or device="cpu" where the fused step is built, never imports it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np

from ..errors import InputError, SmolVLMError


def as_numpy(x, dtype=np.float32) -> np.ndarray:
    """A caller's array (a torch tensor on any device, a NumPy array, nested lists) as a NumPy array of dtype."""
    if hasattr(x, "detach"):  # a torch tensor, from a caller: off its device, and bfloat16 (no NumPy type) widened
        x = x.detach().cpu()
        x = (x.float() if x.dtype.is_floating_point else x).numpy()
    return np.asarray(x, dtype=dtype)


class NumpyBackend:
    name = "numpy"

    def inference(self):
        """The context steps run in (per thread): nothing to switch off; a torch the caller imported after the
        model loaded gets its threads sized here instead (engine/threads.py, once per process)."""
        from .threads import size_torch_threads
        size_torch_threads()
        return nullcontext()

    def to_numpy(self, x) -> np.ndarray:
        """The model's output (logits) as float32 NumPy."""
        return np.asarray(x, dtype=np.float32)

    def from_numpy(self, x: np.ndarray, like=None):
        """A NumPy array as the transformers-style API hands it back: a torch tensor where the caller's input
        (like) was one, as transformers would return, else NumPy."""
        if hasattr(like, "detach"):  # a torch tensor: torch is imported already
            import torch
            return torch.from_numpy(np.ascontiguousarray(x))
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

    def decode_graphs(self, model, kv_caches, block_size: int, max_batch: int, option: bool | None):
        """None: CUDA graphs are for the torch backend on a GPU (cuda_graphs=True here is an error; the
        environment's SMOLVLM_FAST_CUDA_GRAPHS=1 applies where it can)."""
        return _no_graphs(option, "the numpy backend")


class TorchBackend:
    name = "torch"

    def inference(self):
        import torch
        return torch.inference_mode()

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def from_numpy(self, x: np.ndarray, like=None):
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

    def decode_graphs(self, model, kv_caches, block_size: int, max_batch: int, option: bool | None):
        """A DecodeGraphs over the model and its caches where graphs are wanted and can run (a CUDA device, a
        spliced model), else None (cuda_graphs=True where they cannot is an error)."""
        from ..models.decode_graphs import DecodeGraphs, graphs_wanted
        if not graphs_wanted(option):
            return None
        if model.device.type != "cuda" or model.config.is_xattn:
            where = "a cross-attention model" if model.config.is_xattn else f"device {model.device.type!r}"
            return _no_graphs(option, where)
        return DecodeGraphs(model, kv_caches, block_size=block_size, max_batch=max_batch)


BACKENDS = {b.name: b for b in (NumpyBackend(), TorchBackend())}


def _no_graphs(option: bool | None, where: str) -> None:
    """No CUDA graphs for `where`: an InputError when cuda_graphs=True asked for them, else None."""
    if option:
        raise InputError(f"cuda_graphs=True needs the torch backend on a CUDA GPU with a spliced model; {where} "
                         "runs every step eagerly")


def backend_named(name: str):
    if name not in BACKENDS:
        raise InputError(f"backend must be 'torch' or 'numpy', got {name!r}")
    return BACKENDS[name]


def choose_backend(backend: str | None = None, device=None, torch_only_options: bool = False) -> str:
    """The backend a model loads on: the one named, else backend_choice's."""
    if backend is not None:
        return backend_named(backend).name  # an explicit backend always wins
    name, _why = backend_choice(device, torch_only_options)
    if name == "torch" and not torch_installed():
        raise SmolVLMError("quantize_vision and quantize_lm_head run on the torch backend, and torch is not installed")
    return name


def backend_choice(device=None, torch_only_options: bool = False) -> tuple[str, str]:
    """(backend, why) for a caller who names none. On the CPU (device "cpu", or None with no CUDA GPU) the
    NumPy + C++ path whenever smolvlm_fast._cpu has the fused decoder step, torch installed or not (its decode
    measured ~6x faster than torch's on the CPU); without that step, torch where installed (the pure NumPy
    path is slower). On CUDA, torch. Options only the torch backend has (torch_only_options: quantize_vision,
    quantize_lm_head) pick torch."""
    from ..cpu import decoder as cpu_decoder

    kind = str(device).split(":")[0] if device is not None else None
    if kind not in (None, "cpu"):
        if not torch_installed():
            raise SmolVLMError(f"device {str(device)!r} needs PyTorch with CUDA, and torch is not installed")
        return "torch", f"device {str(device)!r} runs on the torch backend"
    if torch_only_options:
        return "torch", "quantize_vision / quantize_lm_head are options of the torch backend"
    if kind is None and cuda_available():
        return "torch", "a CUDA GPU is visible, and device None means CUDA there"
    if cpu_decoder.available():
        return "numpy", "the CPU's fast path: smolvlm_fast._cpu has the fused decoder step"
    if torch_installed():
        return "torch", ("smolvlm_fast._cpu has no fused decoder step here, not built or SMOLVLM_FAST_FUSED=0, "
                         "and torch's CPU path is faster than pure NumPy")
    return "numpy", "torch is not installed, and smolvlm_fast._cpu has no fused decoder step: pure NumPy"


def torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    """torch is installed and sees a CUDA GPU."""
    if not torch_installed():
        return False
    import torch
    return torch.cuda.is_available()


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
