"""Block discovery: which transformer blocks a checkpoint really holds, and where they came from.

Pruned checkpoints disagree with their own config in several ways (gapped indices, a stale
``num_hidden_layers``). We trust the tensor names: every ``<prefix>.<i>.<suffix>`` is a block
tensor, blocks are renumbered 0..N-1 in source order, and the original index of each written
block is recorded whenever it can be known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import LayoutError


@dataclass(frozen=True)
class BlockMap:
    """How source blocks become GGUF blocks.

    ``stored`` are the block indices as found in the tensor names (sorted), ``blk.N`` is
    ``stored[N]``. ``original`` is the index of each written block in the *unpruned* model when
    known (from gaps, ``--source-blocks`` or a recipe), else None. ``source_block_count`` is the
    block count of the unpruned model when known.
    """

    stored: tuple[int, ...]
    original: tuple[int, ...] | None
    source_block_count: int | None
    provenance: str          # where ``original`` came from, for humans
    warnings: tuple[str, ...] = ()
    method: str | None = None   # how the removed blocks were chosen, when this tool (or its --save-hf) knows

    @property
    def block_count(self) -> int:
        return len(self.stored)

    @property
    def removed(self) -> tuple[int, ...] | None:
        if self.original is None or self.source_block_count is None:
            return None
        kept = set(self.original)
        return tuple(i for i in range(self.source_block_count) if i not in kept)

    def describe(self) -> str:
        lines = [f"blocks: {self.block_count} written"
                 + (f" of {self.source_block_count} in the source model" if self.source_block_count else "")
                 + f" (original indices: {self.provenance})"]
        for n, stored in enumerate(self.stored):
            orig = self.original[n] if self.original else None
            src = f"source block {stored}" + (f", original block {orig}" if orig is not None and orig != stored else "")
            lines.append(f"  blk.{n:<3d} <- {src}")
        if self.removed is not None:
            lines.append(f"  removed original blocks: {list(self.removed) or 'none'}")
        return "\n".join(lines)


def group_block_tensors(names: Iterable[str], prefix: str) -> tuple[dict[int, dict[str, str]], list[str]]:
    """Split tensor names into ``{block index: {suffix: name}}`` and the non-block names.

    ``prefix`` is e.g. ``model.layers``. Two names that denote the same block and suffix (for
    example ``layers.1.x`` and ``layers.01.x``) are a LayoutError.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    blocks: dict[int, dict[str, str]] = {}
    others: list[str] = []
    for name in names:
        m = pattern.match(name)
        if not m:
            others.append(name)
            continue
        index, suffix = int(m.group(1)), m.group(2)
        block = blocks.setdefault(index, {})
        if suffix in block:
            raise LayoutError(f"block {index} has tensor {suffix!r} twice ({block[suffix]!r} and {name!r})")
        block[suffix] = name
    return blocks, others


def check_block_tensors(blocks: dict[int, dict[str, str]], required: Sequence[str],
                        ignored: Sequence[str] = ()) -> None:
    """Every block must hold every required suffix and nothing unknown."""
    known = set(required) | set(ignored)
    for index in sorted(blocks):
        present = blocks[index]
        for suffix in required:
            if suffix not in present:
                raise LayoutError(f"block {index} is missing tensor {suffix!r}")
        for suffix, name in present.items():
            if suffix not in known:
                raise LayoutError(f"block {index} has unexpected tensor {name!r}")


def make_block_map(stored: Sequence[int], config_count: int | None, *,
                   source_blocks: Sequence[int] | None = None,
                   recipe_kept: Sequence[int] | None = None,
                   recipe_source_count: int | None = None,
                   recipe_name: str | None = None,
                   saved: dict | None = None) -> BlockMap:
    """Decide the block map from the stored indices, the config and any user-given provenance.

    Precedence for original indices: ``--source-blocks``, then a recipe, then the provenance a
    checkpoint saved by ``prune --save-hf`` carries in its config (``saved``, see
    :data:`CONFIG_PRUNING`), then gaps in the stored indices. A contiguous 0..N-1 range says
    nothing about what was removed.
    """
    stored = tuple(sorted(stored))
    if not stored:
        raise LayoutError("no transformer blocks found")
    n = len(stored)
    warnings: list[str] = []
    contiguous = stored == tuple(range(n))

    if config_count is not None and config_count != n:
        if config_count > n:
            warnings.append(f"config says num_hidden_layers={config_count} but the weights hold {n} blocks; "
                            f"following the weights (block_count={n})")
        else:
            raise LayoutError(f"config says num_hidden_layers={config_count} but the weights hold "
                              f"{n} blocks ({_ranges(stored)})")

    if source_blocks is not None:
        original = _check_original(source_blocks, n, "--source-blocks")
        count = max(recipe_source_count or 0, config_count or 0, max(original) + 1)
        return BlockMap(stored, original, count, "from --source-blocks", tuple(warnings))
    if recipe_kept is not None:
        original = _check_original(recipe_kept, n, f"recipe {recipe_name}")
        if not contiguous and original != stored:
            raise LayoutError(f"recipe {recipe_name} keeps blocks {_ranges(original)} but the checkpoint "
                              f"stores blocks {_ranges(stored)}")
        return BlockMap(stored, original, recipe_source_count, f"from recipe {recipe_name}", tuple(warnings))
    if saved is not None:
        original, count, method = _read_saved(saved, n)
        return BlockMap(stored, original, count, f"from config.json's {CONFIG_PRUNING}", tuple(warnings), method)
    if not contiguous:
        count = max(config_count or 0, stored[-1] + 1)
        known_count = count if (config_count and config_count > stored[-1]) else None
        return BlockMap(stored, stored, known_count, "from the gaps in the stored block indices",
                        tuple(warnings))
    source_count = config_count if config_count and config_count > n else None
    return BlockMap(stored, None, source_count, "unknown; give --source-blocks or --recipe", tuple(warnings))


# config.json key under which ``prune --save-hf`` records where the saved blocks came from, so that
# exporting the saved checkpoint (even after retraining, which keeps unknown config keys) writes the
# same provenance as ``export --remove-blocks`` of the original.
CONFIG_PRUNING = "shortquant_pruning"

# config.json fields that hold one entry per block (by position), and fields that list block indices
_PER_BLOCK_LISTS = ("layer_types", "block_configs")
_BLOCK_INDEX_LISTS = ("drop_attn_list", "drop_mlp_list", "mlp_only_layers")


def remove_blocks(block_map: BlockMap, remove: Sequence[int], method: str | None = None) -> BlockMap:
    """The block map once the stored blocks ``remove`` are left out (``--remove-blocks``).

    The kept blocks keep their original indices (this checkpoint's own numbering when nothing
    older is known), so the GGUF records where every block came from. A block the checkpoint
    does not hold, or removing every block, is a LayoutError.
    """
    remove = tuple(sorted(set(int(i) for i in remove)))
    missing = [i for i in remove if i not in block_map.stored]
    if missing:
        raise LayoutError(f"--remove-blocks names block {missing[0]}, but the checkpoint holds blocks "
                          f"{_ranges(block_map.stored)}")
    if len(remove) == block_map.block_count:
        raise LayoutError(f"--remove-blocks would remove all {block_map.block_count} blocks")
    keep = [n for n, s in enumerate(block_map.stored) if s not in remove]
    if block_map.original is not None:
        original, count = block_map.original, block_map.source_block_count
    else:
        original, count = block_map.stored, block_map.block_count
    said = f"blocks {_ranges(remove)} removed with --remove-blocks"
    method = method or "blocks removed by hand (--remove-blocks)"
    return BlockMap(tuple(block_map.stored[n] for n in keep), tuple(original[n] for n in keep), count,
                    f"{block_map.provenance}; {said}", block_map.warnings,
                    f"{block_map.method}; then {method}" if block_map.method else method)


def pruned_config(config: dict, stored: Sequence[int], kept: Sequence[int], block_map: BlockMap | None = None,
                  renumber: bool = True) -> dict:
    """``config`` as it reads for a checkpoint saved with only the ``kept`` of its ``stored`` blocks:
    the block count and the per-block lists follow the kept blocks; the lists and tables keyed by
    block index keep only the kept blocks, renumbered 0..N-1 (``renumber``, as saved) or under
    their stored indices (the view export plans from, whose block map still names them so);
    ``block_map`` (already pruned) adds the provenance key."""
    stored, kept = list(stored), list(kept)
    position = {s: n for n, s in enumerate(stored)}
    index = {s: (n if renumber else s) for n, s in enumerate(kept)}
    out = dict(config)
    out["num_hidden_layers"] = len(kept)
    for key in _PER_BLOCK_LISTS:
        value = config.get(key)
        if isinstance(value, list) and len(value) == len(stored):
            out[key] = [value[position[s]] for s in kept]
        elif isinstance(value, list) and len(value) > stored[-1]:   # indexed by the stored index
            out[key] = [value[s] for s in kept]
    for key in _BLOCK_INDEX_LISTS:
        value = config.get(key)
        if isinstance(value, list):
            out[key] = [index[i] for i in value if isinstance(i, int) and i in index]
    table = config.get("per_layer_config")   # transformers' sparse per-layer overrides, keyed by index
    if isinstance(table, dict) and renumber:
        out["per_layer_config"] = {str(index[int(k)]): v for k, v in table.items()
                                   if str(k).isdigit() and int(k) in index}
    if block_map is not None and block_map.original is not None:
        out[CONFIG_PRUNING] = {"source_blocks": list(block_map.original),
                               "source_block_count": block_map.source_block_count,
                               "method": block_map.method}
    return out


def _read_saved(saved, n: int) -> tuple[tuple[int, ...], int | None, str | None]:
    """(original indices, source block count, method) from config.json's :data:`CONFIG_PRUNING`."""
    what = f"config.json's {CONFIG_PRUNING}"
    if not isinstance(saved, dict) or not isinstance(saved.get("source_blocks"), list):
        raise LayoutError(f"{what} must be an object with a source_blocks list")
    try:
        original = _check_original(saved["source_blocks"], n, what)
    except (TypeError, ValueError):
        raise LayoutError(f"{what}: source_blocks must be whole numbers") from None
    count, method = saved.get("source_block_count"), saved.get("method")
    if count is not None and (not isinstance(count, int) or count <= max(original)):
        raise LayoutError(f"{what}: source_block_count {count!r} does not cover source block {max(original)}")
    return original, count, method if isinstance(method, str) else None


def parse_block_list(text: str) -> tuple[int, ...]:
    """``"0-3,5,7"`` -> ``(0, 1, 2, 3, 5, 7)``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return tuple(out)


def _check_original(indices: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    indices = tuple(int(i) for i in indices)
    if len(indices) != n:
        raise LayoutError(f"{what} names {len(indices)} blocks but the checkpoint holds {n}")
    if len(set(indices)) != n or any(i < 0 for i in indices):
        raise LayoutError(f"{what} must name {n} distinct non-negative block indices")
    return indices


def _ranges(indices: Sequence[int]) -> str:
    """(0,1,2,5,6) -> '0-2,5-6'."""
    parts: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)
