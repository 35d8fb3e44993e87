"""Mixture-of-experts weights read as llama.cpp stacks them: one (experts, rows, cols) tensor.

Checkpoints hold experts one tensor each (``mlp.experts.3.gate_proj.weight``, transformers 4 and
most hub files) or fused (transformers 5: ``mlp.experts.gate_up_proj`` of shape (experts, 2F, H),
gate rows first). A stacked view reads only the experts a piece asks for, straight into the
caller's buffer, so a block's experts are never all in memory at once, let alone twice.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .tensor_ref import TensorRef


def stacked_ref(tensors: Mapping[str, TensorRef], name: str, sources: Sequence[str],
                rows: tuple[int, int] | None = None) -> TensorRef:
    """A lazy (experts, rows, cols) tensor: ``sources[e]`` is expert ``e`` (a 2-D tensor), or,
    with ``rows``, ``sources[0]`` is a fused 3-D tensor whose axis-1 rows ``rows[0]:rows[1]``
    are taken. ``load_rows(a, b)`` reads experts ``a:b``."""
    refs = [tensors[s] for s in sources]
    if rows is None:
        shape = (len(refs), *refs[0].shape)
    else:
        shape = (refs[0].shape[0], rows[1] - rows[0], refs[0].shape[2])
    per_expert = int(np.prod(shape[1:], dtype=np.int64))

    def read(start: int, stop: int, buffer: np.ndarray | None) -> np.ndarray:
        count = stop - start
        out = (np.empty(count * per_expert, dtype=np.float32) if buffer is None
               else buffer[:count * per_expert]).reshape(count, *shape[1:])
        if rows is None:
            for k, ref in enumerate(refs[start:stop]):
                out[k] = ref.load_rows(0, shape[1], out[k].reshape(-1)).reshape(shape[1:])
        else:   # one expert at a time: the fused tensor's other half is read but never held whole
            for k in range(count):
                out[k] = refs[0].load_rows(start + k, start + k + 1)[0, rows[0]:rows[1]]
        return out

    return TensorRef(name=name, shape=shape, dtype=refs[0].dtype, path=refs[0].path, reader=read)


def tensor_ref(tensors: Mapping[str, TensorRef], tensor) -> TensorRef:
    """The readable source of a planned tensor (a ``plan.TensorPlan``): the checkpoint's own
    tensor, or the stacked view of its experts."""
    stack = getattr(tensor, "stack", None)
    if stack is None:
        return tensors[tensor.source]
    return stacked_ref(tensors, tensor.source, stack.sources, stack.rows)
