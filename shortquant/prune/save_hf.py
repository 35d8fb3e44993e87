"""``prune --save-hf DIR``: the pruned model as a Hugging Face checkpoint, for retraining (LoRA)
before quantizing.

The kept blocks' tensors are copied byte for byte (their own dtype) into one ``model.safetensors``,
renumbered 0..N-1; ``config.json`` is the source's with the block count and per-block lists
following the kept blocks (:func:`shortquant.layers.pruned_config`), plus where every block came
from, so exporting the saved folder writes the same GGUF as ``export --remove-blocks`` of the
source. The other files (tokenizer, generation config, README) are copied as they are. The
folder is written as ``DIR.part`` and renamed when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Sequence

from ..errors import OutputError

_WEIGHTS = re.compile(r".*\.(safetensors|bin)$|.*\.index\.json$|^config\.json$")


def check_target(out: Path) -> None:
    """Refuse an ``out`` that holds something already (before any measuring)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError("exists and is not an empty folder; --save-hf writes a new checkpoint folder", out)


def save_pruned_checkpoint(source: Path, remove: Sequence[int], out: Path, method: str | None = None,
                           options=None) -> Path:
    """Write ``source`` without the stored blocks ``remove`` into ``out``; return ``out``.
    ``options``: the ExportOptions that say what is known of the source (recipe, --source-blocks).

    >>> save_pruned_checkpoint(Path("models/demo"), [2, 5], Path("demo-pruned"))  # doctest: +SKIP
    """
    import dataclasses

    from ..export import ExportOptions, make_model_plan
    from ..families import find_family
    from ..layers import group_block_tensors, pruned_config
    from ..source.checkpoint import open_checkpoint

    source, out = Path(source), Path(out)
    check_target(out)
    checkpoint = open_checkpoint(source)
    options = dataclasses.replace(options or ExportOptions(), remove_blocks=tuple(remove), pruning_method=method)
    plan = make_model_plan(checkpoint, options)
    prefix = find_family(checkpoint).block_prefix
    blocks, _ = group_block_tensors(checkpoint.tensors, prefix)
    full = sorted(blocks)
    new_index = {s: n for n, s in enumerate(plan.block_map.stored)}
    names: list[tuple[str, str]] = []   # (name in the new checkpoint, source name)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    for name in checkpoint.tensors:
        m = pattern.match(name)
        if m is None:
            names.append((name, name))
        elif int(m.group(1)) in new_index:
            names.append((f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}", name))
    config = pruned_config(checkpoint.config, full, plan.block_map.stored, plan.block_map)

    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        part.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            if f.is_file() and not _WEIGHTS.match(f.name):
                shutil.copy2(f, part / f.name)
        (part / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _write_safetensors(part / "model.safetensors", [(new, checkpoint.tensors[old]) for new, old in names])
        if out.exists():
            out.rmdir()
        part.rename(out)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return out


def _write_safetensors(path: Path, tensors) -> None:
    """The safetensors format: 8-byte header length, JSON header, then the raw bytes, streamed."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, ref in tensors:
        size = ref.n_elements * _ITEMSIZE[ref.dtype]
        header[name] = {"dtype": ref.dtype, "shape": list(ref.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, ref in tensors:
            f.write(ref.raw_bytes())


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
