"""The state file of one model folder: what is finished, with the sha256 of every finished file.

``OUT/<model>/.shortquant-batch.json`` (hidden, so ``publish`` never uploads it) holds, per step,
a *fingerprint* of the settings the step depended on and the sha256 of what it wrote::

    {"format": 1,
     "files":   {"q8_0": {"fingerprint": "...", "paths": ["M-Q8_0.gguf"], "sha256": ["..."],
                          "bytes": 5480000, "n_params": 5000000, "type": "Q8_0", "seconds": 0.8}},
     "eval":    {"fingerprint": "...", "sha256": {"results.json": "..."}},
     "card":    {"fingerprint": "...", "sha256": {"README.md": "...", "M-Q8_0.Modelfile": "..."}},
     "publish": {"fingerprint": "...", "repo": "me/M-GGUF"}}

A step is done when its fingerprint matches and every file it recorded still has its sha256;
anything else (a missing, changed or truncated file, other settings) is redone. The file is
replaced atomically after each step, so a run killed at any moment leaves either the old or
the new state, never a torn one; an unreadable state file counts as empty.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..checksum import sha256_file
from ..partfiles import write_atomic

STATE_FILE = ".shortquant-batch.json"
FORMAT = 1


def fingerprint(settings: dict) -> str:
    """A short stable hash of JSON-able settings."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_intact(folder: Path, sha256: dict[str, str]) -> bool:
    """Every ``name -> sha256`` still holds in ``folder``."""
    for name, digest in sha256.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


class ModelState:
    """The state of one model folder; ``save()`` after each finished step."""

    def __init__(self, folder: Path, data: dict | None = None):
        self.folder = Path(folder)
        self.data = data if data and data.get("format") == FORMAT else {"format": FORMAT}
        self.data.setdefault("files", {})

    @classmethod
    def load(cls, folder: Path) -> "ModelState":
        try:
            data = json.loads((Path(folder) / STATE_FILE).read_text())
        except (OSError, ValueError):
            data = None
        return cls(folder, data if isinstance(data, dict) else None)

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / STATE_FILE
        write_atomic(target, json.dumps(self.data, indent=1, sort_keys=True), fsync=True)

    # -- files of the ladder ---------------------------------------------------------------
    def finished_file(self, quant: str, expected: str) -> dict | None:
        """The record of ``quant`` when it was made with fingerprint ``expected`` and is intact."""
        entry = self.data["files"].get(quant)
        if not entry or entry.get("fingerprint") != expected:
            return None
        if not files_intact(self.folder, dict(zip(entry["paths"], entry["sha256"]))):
            return None
        return entry

    def record_file(self, quant: str, expected: str, paths: list[Path], *, type_label: str, n_params: int,
                    seconds: float) -> dict:
        entry = {"fingerprint": expected, "paths": [p.name for p in paths], "sha256": [sha256_file(p) for p in paths],
                 "bytes": sum(p.stat().st_size for p in paths), "n_params": n_params, "type": type_label,
                 "seconds": round(seconds, 3)}
        self.data["files"][quant] = entry
        return entry

    def forget_file(self, quant: str) -> None:
        self.data["files"].pop(quant, None)

    # -- later steps (eval, card, publish) -------------------------------------------------
    def step_done(self, step: str, expected: str) -> bool:
        entry = self.data.get(step)
        return bool(entry) and entry.get("fingerprint") == expected and \
            files_intact(self.folder, entry.get("sha256", {}))

    def record_step(self, step: str, expected: str, names: list[str] = (), **extra) -> None:
        self.data[step] = {"fingerprint": expected, "sha256": {n: sha256_file(self.folder / n) for n in names},
                           **extra}

    def forget_step(self, step: str) -> None:
        self.data.pop(step, None)
