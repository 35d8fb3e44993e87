"""What this machine has (memory), read where the operating system says it."""

from __future__ import annotations


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
