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
from .sizes import format_size


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
                          f"({format_size(needed)}), {free} bytes ({format_size(free)}) are free "
                          f"(--force to try anyway)", folder)
    return free


# Each split part repeats a GGUF header and its tensor infos, and is padded to the alignment;
# generous for any model (a tensor info is under 300 bytes).
SPLIT_PART_OVERHEAD = 1024 * 1024


def split_reserve(sizes, split_limit: int | None) -> int:
    """Bytes that splitting the files of ``sizes`` (over ``split_limit`` each) needs beyond them:
    the parts of the largest such file, written before it is removed.

    >>> split_reserve([3_000, 10_000], 4_000)
    4204304
    """
    over = [size for size in sizes if split_limit and size > split_limit]
    if not over:
        return 0
    largest = max(over)
    return largest + (-(-largest // split_limit) + 1) * SPLIT_PART_OVERHEAD
