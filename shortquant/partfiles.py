"""Partial files (``*.part``): owned by the process that holds their lock, stale once it is gone.

A writer creates ``<final>.part`` and holds an exclusive ``flock`` on it until the file is renamed
or removed. The kernel drops the lock when the process dies, however it dies (SIGKILL, OOM
killer, power loss), so a ``.part`` nobody holds a lock on was left by a run that will never
finish it, and the next run into that folder removes it. A ``.part`` that is locked belongs
to an export still running and is left alone; a second export that would write the same file
is refused instead of writing into it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .errors import OutputError
from .signals import signals_deferred

PART_SUFFIX = ".part"
# What shortquant writes under a temporary name and locks while writing: GGUF files and split parts.
STALE_PATTERNS = ("*.gguf" + PART_SUFFIX,)


class PartLock:
    """An exclusive lock on ``path`` (created if missing), held until :meth:`release`.

    >>> lock = PartLock.acquire(Path("out/m-Q8_0.gguf.part"))     # doctest: +SKIP
    >>> lock.release()                                           # doctest: +SKIP
    """

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, path: Path) -> "PartLock":
        """Lock ``path`` for writing; OutputError when another process is writing it.

        A caller that removes the file on failure must record the returned lock inside
        :func:`~shortquant.signals.signals_deferred`, or a signal between this call's creating the
        file and the caller's noting it leaves the file behind."""
        path = Path(path)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write ({exc.strerror or exc})", path) from None
            if not _try_lock(fd, wait=0.5):
                os.close(fd)
                raise OutputError("another shortquant run is writing this file right now; "
                                  "wait for it or write into another folder", path)
            if _same_file(fd, path):
                return cls(path, fd)
            # The file we opened was renamed or removed before we locked it: open the new one.
            os.close(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)   # closing drops the flock
            self.fd = -1


def write_atomic(path: Path, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through ``<path>.part`` and a rename: readers see the old file or
    the whole new one, and an interrupted or failed write leaves no ``.part`` behind.

    >>> write_atomic(Path("out/README.md"), "# card")   # doctest: +SKIP
    """
    path = Path(path)
    tmp = path.with_name(path.name + PART_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # Ctrl-C, SIGTERM, a full disk: nothing half-written stays
        with signals_deferred():
            tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_parts(folder: Path) -> list[Path]:
    """Remove the partial files in ``folder`` that no running process owns; return them."""
    removed = []
    for pattern in STALE_PATTERNS:
        for path in sorted(Path(folder).glob(pattern)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue   # gone already, or not ours to touch
            try:
                # Locked: a live export owns it. Replaced since we opened it: not the same file.
                if _try_lock(fd) and _same_file(fd, path):
                    path.unlink()
                    removed.append(path)
            except OSError:
                pass
            finally:
                os.close(fd)
    return removed


def _try_lock(fd: int, wait: float = 0.0) -> bool:
    """Lock without blocking; retry for ``wait`` seconds (another run's stale-file sweep holds
    a lock only for an instant)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
