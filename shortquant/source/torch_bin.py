"""Reading PyTorch ``.bin`` weight files without ever running pickled code.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; anything else
(a whole pickled model, custom classes, code) is refused and reported as bad input. Files in
the zip format are memory-mapped, so tensors are read from disk only when asked for.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import SourceError
from .tensor_ref import TensorRef


def read_torch_bin_index(path: Path) -> dict[str, TensorRef]:
    """Every tensor of a ``pytorch_model.bin``-style state dict as a lazy ``TensorRef``.

    >>> refs = read_torch_bin_index(Path("pytorch_model.bin"))  # doctest: +SKIP
    """
    import torch

    state = _load_state_dict(path, torch)
    if not isinstance(state, dict):
        raise SourceError(f"not a weights file: holds a {type(state).__name__}, expected a dict of tensors", path)
    refs: dict[str, TensorRef] = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise SourceError(f"not a plain weights file: entry {name!r} is not a tensor", path)
        refs[name] = TensorRef(name=name, shape=tuple(tensor.shape), dtype=_dtype_name(tensor.dtype),
                               path=path, reader=_TensorReader(tensor))
    return refs


def _load_state_dict(path: Path, torch):
    try:
        mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused"
        raise SourceError(
            f"not a plain weights file; refusing to unpickle code ({first[:160]}). A whole pickled model "
            f"(e.g. LLM-Pruner's torch.save({{'model': ...}})) must be re-saved as weights where its code is "
            f"trusted: torch.load(path, weights_only=False)['model'].save_pretrained(folder) (safetensors) "
            f"next to the original config.json and tokenizer", path) from None
    except Exception as exc:   # a damaged zip or pickle fails in many ways (KeyError, struct.error, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot read PyTorch weights ({type(exc).__name__}: {first[:160]})", path) from None


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.").upper().replace("BFLOAT16", "BF16").replace(
        "FLOAT16", "F16").replace("FLOAT32", "F32").replace("FLOAT64", "F64")


class _TensorReader:
    def __init__(self, tensor):
        self.tensor = tensor

    def __call__(self, start: int, stop: int, buffer: np.ndarray | None = None) -> np.ndarray:
        import torch

        part = self.tensor[start:stop] if self.tensor.dim() else self.tensor
        rows = part.detach().to(torch.float32).numpy()
        if buffer is None:
            return rows.copy()
        out = buffer[: rows.size].reshape(rows.shape)
        out[...] = rows
        return out

    def raw(self) -> bytes:
        import torch

        return self.tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
