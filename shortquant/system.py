"""What this machine has (memory), read where the operating system says it."""

from __future__ import annotations


def _kib_field(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a /proc file, in bytes; None when unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None when unknown."""
    return _kib_field("/proc/meminfo", "MemAvailable")


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _kib_field("/proc/self/status", "VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak
