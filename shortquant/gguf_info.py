"""Reading written GGUF files: one file or a split set (:func:`read_gguf`), a folder of them
(:func:`find_models`), llama.cpp's split names; and what a file holds, for ``shortquant inspect
FILE.gguf``: its type, size, the pruning it records, the type of every tensor by kind and, for an
optimized mix, the optimizer's record (budget, base mix, measured KLDs, the tensors it changed).
The card, ``verify`` and ``publish`` read folders through here.

>>> info = file_info("out/m-Q4_K_M_OPT.gguf")   # doctest: +SKIP
>>> info["optimize"]["base_mix"]                  # doctest: +SKIP
'q4_k_m'
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from . import keys
from .errors import PublishError

_BLOCK = re.compile(r"^blk\.(\d+)\.")
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_name(prefix: str | Path, index: int, count: int) -> Path:
    """The file name of part ``index`` (0-based) of ``count``.

    >>> split_name("out/m-Q4_K_M", 0, 3).name
    'm-Q4_K_M-00001-of-00003.gguf'
    """
    prefix = Path(prefix)
    return prefix.with_name(f"{prefix.name}-{index + 1:05d}-of-{count:05d}.gguf")


def parse_split_name(path: str | Path) -> tuple[str, int, int] | None:
    """``(prefix, index, count)`` of a split part's name (index 0-based), or None.

    >>> parse_split_name("m-Q8_0-00002-of-00003.gguf")
    ('m-Q8_0', 1, 3)
    """
    match = _SPLIT_NAME.match(Path(path).name)
    if not match:
        return None
    return match.group("prefix"), int(match.group("no")) - 1, int(match.group("count"))


def split_parts(first: str | Path) -> list[Path]:
    """All parts of the split set whose first part is ``first`` (which must exist)."""
    first = Path(first)
    parsed = parse_split_name(first)
    if parsed is None:
        return [first]
    prefix, _, count = parsed
    return [split_name(first.with_name(prefix), i, count) for i in range(count)]


@dataclass
class GGUFFile:
    """One model in the folder: a single GGUF file or a split set (``parts``)."""

    parts: list[Path]
    metadata: dict
    n_params: int
    tensor_bytes: int
    type: str
    sizes: list[int] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.parts[0]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def bytes(self) -> int:
        return sum(self.sizes)

    @property
    def bpw(self) -> float:
        return self.tensor_bytes * 8 / self.n_params if self.n_params else 0.0

    @property
    def is_split(self) -> bool:
        return len(self.parts) > 1

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata, parameter count and type of one GGUF (for a split set, pass its first part).

    >>> read_gguf("out/m-Q8_0.gguf").type       # doctest: +SKIP
    'Q8_0'
    """
    path = Path(path)
    parts = split_parts(path)
    metadata: dict = {}
    n_params = tensor_bytes = 0
    type_counts: dict[str, int] = {}
    for index, part in enumerate(parts):
        if not part.is_file():
            raise PublishError(f"split part missing: {part.name}", part.parent)
        from .gguf_check import read_gguf_checked

        reader = read_gguf_checked(part, PublishError)   # counts checked first; one line for any damage
        if index == 0:
            metadata = {name: f.contents() for name, f in reader.fields.items()
                        if not name.startswith("GGUF.")}
        for tensor in reader.tensors:
            n_params += int(tensor.n_elements)
            tensor_bytes += int(tensor.n_bytes)
            if len(tensor.shape) >= 2:
                type_counts[tensor.tensor_type.name] = type_counts.get(tensor.tensor_type.name, 0) + 1
    file_type = metadata.get(gguf.Keys.General.FILE_TYPE)
    if file_type is not None:
        try:
            type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            type_name = str(file_type)
    else:
        type_name = max(type_counts, key=type_counts.get) if type_counts else "?"
    if keys.OPTIMIZE_BUDGET in metadata:   # a measured mix: a variant of its file type, named so
        type_name += keys.OPT_SUFFIX
    return GGUFFile(parts=parts, metadata=metadata, n_params=n_params, tensor_bytes=tensor_bytes,
                    type=type_name, sizes=[p.stat().st_size for p in parts])


def find_models(outdir: str | Path) -> list[GGUFFile]:
    """Every model in ``outdir``: single files and split sets (by their first part), by size."""
    outdir = Path(outdir)
    firsts = []
    for path in sorted(outdir.glob("*.gguf")):
        parsed = parse_split_name(path)
        if parsed is None or parsed[1] == 0:
            firsts.append(path)
    models = [read_gguf(p) for p in firsts]
    return sorted(models, key=lambda m: (-m.bytes, m.name))


def _kind(name: str) -> str:
    """``blk.3.attn_v.weight`` -> ``attn_v``; ``output.weight`` -> ``output``."""
    return _BLOCK.sub("", name).removesuffix(".weight").removesuffix(".bias")


def file_info(path: str | Path) -> dict:
    """The facts of one GGUF file (or the first part of a split set) as a plain dict."""
    from .gguf_check import read_gguf_checked
    from .errors import GGUFError

    model = read_gguf(path)
    meta = model.metadata
    by_kind: dict[str, Counter] = {}
    for part in model.parts:
        for tensor in read_gguf_checked(part, GGUFError).tensors:
            by_kind.setdefault(_kind(tensor.name), Counter())[tensor.tensor_type.name] += 1
    info = {
        "file": str(model.path), "parts": len(model.parts), "bytes": model.bytes, "type": model.type,
        "architecture": meta.get(gguf.Keys.General.ARCHITECTURE), "name": meta.get(gguf.Keys.General.NAME),
        "parameters": model.n_params, "bpw": round(model.bpw, 4),
        "source_blocks": _list(meta.get(keys.SOURCE_BLOCKS)),
        "source_block_count": meta.get(keys.SOURCE_BLOCK_COUNT),
        "tensor_types": {kind: dict(sorted(c.items())) for kind, c in sorted(by_kind.items())},
        "optimize": None,
    }
    if keys.OPTIMIZE_BUDGET in meta:
        changes = [c for c in _list(meta.get(keys.OPTIMIZE_CHANGES)) or [] if c != "none"]
        info["optimize"] = {
            "base_mix": meta.get(keys.OPTIMIZE_BASE_MIX) or None,
            "budget_bytes": int(meta[keys.OPTIMIZE_BUDGET]),
            "calibration": meta.get(keys.OPTIMIZE_CALIBRATION),
            "kld_calibration": _float(meta.get(keys.OPTIMIZE_KLD)),
            "kld_calibration_base_mix": _float(meta.get(keys.OPTIMIZE_KLD_BASE)),
            "changes": changes,
        }
    return info


def _list(value):
    return list(value) if value is not None else None


def _float(value):
    return float(value) if value is not None else None


def describe_file(info: dict) -> str:
    """The dict of :func:`file_info` as text."""
    lines = [f"{Path(info['file']).name}: {info['type']}, {info['bytes']:,} bytes"
             + (f" in {info['parts']} parts" if info["parts"] > 1 else "")
             + f", {info['parameters']:,} parameters, {info['bpw']:.3f} bpw",
             f"  architecture {info['architecture']}, name {info['name']!r}"]
    if info["source_blocks"] is not None:
        total = info["source_block_count"]
        kept = info["source_blocks"]
        removed = sorted(set(range(total)) - set(kept)) if total else []
        lines.append(f"  blocks: {len(kept)}" + (f" of {total}, removed {removed}" if total else "")
                     + f" (original indices {kept})")
    lines.append("  tensor types:")
    width = max(len(k) for k in info["tensor_types"]) if info["tensor_types"] else 0
    for kind, counts in info["tensor_types"].items():
        lines.append(f"    {kind:<{width}}  " + ", ".join(f"{q} x{n}" for q, n in counts.items()))
    opt = info["optimize"]
    if opt is not None:
        base, kld, kld_base = opt["base_mix"], opt["kld_calibration"], opt["kld_calibration_base_mix"]
        lines.append(f"  optimized mix: budget {opt['budget_bytes']:,} bytes"
                     + (f", compared with {base}" if base else "") + f"; calibration {opt['calibration']}")
        if kld is not None:
            lines.append(f"    KLD on calibration text {kld:.5f}"
                         + (f" (the standard {base}: {kld_base:.5f})" if base and kld_base is not None else ""))
        lines.append(f"    {len(opt['changes'])} tensors differ from {base or 'a uniform type'}"
                     + (":" if opt["changes"] else ""))
        lines.extend(f"      {c}" for c in opt["changes"])
    return "\n".join(lines)
