"""Model names and size labels, following the GGUF naming convention.

The size label always comes from the parameters actually written, so a 7B model pruned to
5.5B is labelled 5.5B whatever its folder or hub id says.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
from gguf.metadata import Metadata

from .plan import Naming

# A size token inside a model id, e.g. "7b", "5.5B", "260K": it is replaced by the measured label.
_SIZE_TOKEN = re.compile(r"^\d+(\.\d+)?[KMBT]$", re.IGNORECASE)


def size_label(n_params: int) -> str:
    """The GGUF size label of the parameters written, as llama.cpp's converter rounds it.

    >>> size_label(5_496_000_000), size_label(4_984_064)
    ('5.5B', '5.0M')
    """
    return gguf.utility.size_label(n_params, n_params, 0, 0)


def make_naming(folder: Path, n_params: int, recipe=None, name: str | None = None) -> Naming:
    """Name fields for a model: from a recipe when given, else guessed from the folder name."""
    label = size_label(n_params)
    if recipe is not None and recipe.basename:
        return Naming(name=name or recipe.name, basename=recipe.basename, size_label=label,
                      finetune=recipe.finetune, version=recipe.version)
    model_id = name or Path(folder).resolve().name
    _, _, basename, finetune, version, _ = Metadata.get_model_id_components(model_id, n_params)
    basename = basename or model_id
    if finetune:  # drop a stale size token the heuristics left in, e.g. "10.5b-ppl" -> "ppl"
        parts = [p for p in finetune.split("-") if not _SIZE_TOKEN.match(p)]
        finetune = "-".join(parts) or None
    return Naming(name=model_id, basename=basename, size_label=label, finetune=finetune, version=version)
