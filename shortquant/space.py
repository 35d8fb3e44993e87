"""Free-space check before writing: refuse up front rather than fill the disk and fail late.

The planned sizes are exact (header included, see ``GGUFFileWriter.planned_size``), so the
check only refuses a run that cannot fit. ``--force`` skips it (free space can change while
we write, and quotas are not always visible in ``statvfs``); a write that then hits a full
disk still fails cleanly (ENOSPC: one line, nothing left).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import OutputError


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write in ``folder``'s file system."""
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, needed: int, force: bool = False) -> int:
    """Raise OutputError when ``needed`` bytes do not fit in ``folder``; return the free bytes.

    >>> check_free_space(Path("."), 1)   # doctest: +SKIP
    """
    free = free_bytes(folder)
    if needed > free and not force:
        raise OutputError(f"not enough free space: the planned files need {needed} bytes "
                          f"({needed / 1e9:.2f} GB), {free} bytes ({free / 1e9:.2f} GB) are free "
                          f"(--force to try anyway)", folder)
    return free
