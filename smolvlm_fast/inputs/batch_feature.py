"""BatchFeature (transformers' dict of model inputs with attribute access) and the list -> array/tensor step.

torch is imported only for `return_tensors="pt"` and `BatchFeature.to`."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


class BatchFeature(dict):
    """A dict with attribute access, like transformers.BatchFeature; `.to()` moves torch tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, device=None, dtype=None, non_blocking: bool = False) -> "BatchFeature":
        """Move torch tensors to `device`, casting only floating-point ones to `dtype`:
        `.to("cuda")`, `.to(torch.bfloat16)`, `.to("cuda", dtype=torch.bfloat16)`."""
        import torch

        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and torch.is_floating_point(value) else None
                self[key] = value.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self


def to_tensor(value, return_tensors: str | None, name: str):
    """Nested lists / arrays -> np.ndarray ("np") or torch.Tensor ("pt"); None leaves them as they are."""
    if return_tensors is None:
        return value
    if return_tensors not in ("pt", "np"):
        raise InputError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    if isinstance(value, list) and value and isinstance(value[0], list) and len({len(v) for v in value}) > 1:
        raise InputError(f"{name}: sequences have different lengths; pass padding=True to get a tensor")
    array = np.asarray(value)
    if return_tensors == "np":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))
