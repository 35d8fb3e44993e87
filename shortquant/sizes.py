"""Byte sizes as people write and read them, in decimal units (as llama.cpp's ``--split-max-size``
and the hub's file list): one parser for every option that takes a size, one formatter for every
table that shows one.

>>> parse_size("1.5G"), parse_size("48G"), parse_size("300k"), parse_size(7)
(1500000000, 48000000000, 300000, 7)
>>> format_size(4_081_004_224)
'4.08 GB'
"""

from __future__ import annotations

import re

from .errors import ShortquantError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int, error: type[ShortquantError] = ShortquantError, option: str | None = None) -> int:
    """Bytes in ``48G``, ``1.5G``, ``500M``, ``300K``, ``1000000`` (an optional ``B``; any case).

    A bad or non-positive size raises ``error`` (the caller's kind of bad input), naming
    ``option`` when given.
    """
    where = f"{option}: " if option else ""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        if not match:
            raise error(f"{where}invalid size {text!r}; use a number with K, M, G or T, e.g. 48G or 1.5G")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise error(f"{where}size must be positive, got {text!r}")
    return value


def format_size(n: int) -> str:
    """``n`` bytes in decimal units, two decimals (``4.08 GB``, ``512 B``)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
