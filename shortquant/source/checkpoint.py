"""Opening a Hugging Face checkpoint folder: config, tokenizer files and a lazy tensor index.

Nothing here reads weights: the index records each tensor's name, shape, dtype and file, and
``TensorRef.load()`` reads it later, one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LayoutError, SourceError
from .config_check import check_config
from .safetensors_file import read_safetensors_index
from .tensor_ref import TensorRef
from .torch_bin import read_torch_bin_index

# Weight layouts in the order we look for them; the first present wins.
_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


@dataclass
class Checkpoint:
    """A checkpoint folder, opened lazily.

    >>> from shortquant.resources import demo_model
    >>> ckpt = open_checkpoint(demo_model())
    >>> ckpt.config["hidden_size"], len(ckpt.tensors)
    (256, 57)
    """

    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    weight_files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)


def open_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    if not folder.exists():
        raise SourceError("no such folder", folder)
    if not folder.is_dir():
        raise SourceError("not a folder (give the checkpoint folder that holds config.json)", folder)
    if not any(folder.iterdir()):
        raise SourceError("empty folder: expected config.json and weight files", folder)
    config = read_config(folder / "config.json")
    files = _weight_files(folder)
    tensors: dict[str, TensorRef] = {}
    for path in files:
        refs = read_safetensors_index(path) if path.suffix == ".safetensors" else read_torch_bin_index(path)
        for name, ref in refs.items():
            if name in tensors:
                raise LayoutError(f"tensor {name!r} appears twice (also in {tensors[name].path.name})", path)
            tensors[name] = ref
    return Checkpoint(folder=folder, config=config, tensors=tensors, weight_files=files)


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("missing config.json", path.parent) if path.name == "config.json" else \
            ConfigError("missing file", path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid JSON ({exc})", path) from None
    if not isinstance(config, dict):
        raise ConfigError("not a JSON object", path)
    return check_config(config, path)


def _weight_files(folder: Path) -> list[Path]:
    for index_name, single_name in ((_SAFE_INDEX, _SAFE_SINGLE), (_BIN_INDEX, _BIN_SINGLE)):
        index = folder / index_name
        if index.is_file():
            return _shards_from_index(index)
        if (folder / single_name).is_file():
            return [folder / single_name]
    # Unindexed shards or other names (e.g. model-00001-of-00002.safetensors without an index).
    loose = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    loose = [p for p in loose if p.name != "training_args.bin"]
    if loose:
        return loose
    raise SourceError("no weights found (expected model.safetensors, pytorch_model.bin or a sharded index)",
                      folder)


def _shards_from_index(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SourceError(f"not a valid shard index ({exc})", index) from None
    folder = index.parent.resolve()
    shards: list[Path] = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:
            raise SourceError(f"index entry {name!r} does not name a shard file ({shard!r:.80})", index)
        path = (index.parent / shard).resolve()
        if folder not in path.parents:
            raise SourceError(f"index entry {name!r} points outside the checkpoint folder ({shard})", index)
        if not path.is_file():
            raise SourceError(f"shard {shard} named in the index is missing", index)
        if path not in shards:
            shards.append(path)
    return shards
