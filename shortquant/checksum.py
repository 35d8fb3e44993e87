"""The one sha256 of a file: the card's checksum table, ``verify``, the upload manifest and the
batch state files all use it.

>>> import tempfile, os
>>> with tempfile.NamedTemporaryFile(delete=False) as f:
...     _ = f.write(b"abc")
>>> sha256_file(f.name)[:16]
'ba7816bf8f01cfea'
>>> os.unlink(f.name)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | Path, progress=None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (``progress``: a tqdm bar to advance, or None)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()
