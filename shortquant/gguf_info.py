"""What a written GGUF file holds, for ``shortquant inspect FILE.gguf``: its type, size, the
pruning it records, the type of every tensor by kind and, for an optimized mix, the optimizer's
record (budget, base mix, measured KLDs, the tensors it changed).

>>> info = file_info("out/m-Q4_K_M_OPT.gguf")   # doctest: +SKIP
>>> info["optimize"]["base_mix"]                  # doctest: +SKIP
'q4_k_m'
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import gguf

from . import keys

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _kind(name: str) -> str:
    """``blk.3.attn_v.weight`` -> ``attn_v``; ``output.weight`` -> ``output``."""
    return _BLOCK.sub("", name).removesuffix(".weight").removesuffix(".bias")


def file_info(path: str | Path) -> dict:
    """The facts of one GGUF file (or the first part of a split set) as a plain dict."""
    from .publish.card import read_gguf
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
