"""Termination signals handled like Ctrl-C, so a scheduler's stop leaves nothing half-written.

``docker stop``, systemd, Slurm, Ray and ``timeout`` send SIGTERM; a closed terminal sends
SIGHUP. Python's default for both is to die at once, skipping every ``finally`` and so
leaving ``*.part`` files behind. Inside :func:`handle_termination` both raise
:class:`Terminated` (a ``KeyboardInterrupt``) instead, so the same clean-up that serves
Ctrl-C runs, and the CLI exits with the shell's code for that signal (128 + its number).

A second signal while cleaning up is ignored: cleaning up is short, and an interrupted
clean-up is what leaves stale files. SIGXFSZ (a file-size limit, ``ulimit -f``) is ignored
too, so writing past the limit fails with EFBIG, which the writer reports and cleans up,
instead of killing the process.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when a termination signal arrives."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


# Inside signals_deferred(): a signal that arrives is held here and raised when the block ends.
_defer_depth = 0
_held: list[int] = []


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, a signal that :func:`handle_termination` turns into :class:`Terminated`
    is held, and raised when the block ends.

    For the few steps that create something and record it for clean-up (open a ``.part``, then
    note that we own it): a signal between the two would leave the file with nobody to remove it.
    (Blocking the signal in this thread would not do: the kernel then hands it to another thread,
    and Python still runs its handler here.)
    """
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if not _defer_depth and _held:
            raise Terminated(_held.pop())


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, as a shell reports a process killed by it (130 for Ctrl-C)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def signal_name(exc: KeyboardInterrupt) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise :class:`Terminated` once; SIGXFSZ is ignored.

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def on_signal(signum, frame):
        if received:          # already cleaning up: let it finish
            return
        received.append(signum)
        if _defer_depth:      # between creating a file and owning it: raised when that ends
            _held.append(signum)
            return
        raise Terminated(signum)

    previous = {}
    for signum in _HANDLED:
        previous[signum] = signal.signal(signum, on_signal)
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
