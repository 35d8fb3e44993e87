""""Did you mean ...?" for names typed on the command line (quant types, recipes, templates).

A name is first compared with its separators dropped (``q4km`` is ``q4_k_m``, ``Llama2`` is
``llama-2``), then by similarity (difflib), so the likeliest intended name comes first and the
full list after it.

>>> closest_name("q4km", ["q4_k_s", "q4_k_m", "q8_0"])
'q4_k_m'
>>> unknown_name("quantization type", "q4km", ["q4_k_s", "q4_k_m"])
"unknown quantization type 'q4km': did you mean q4_k_m? valid: q4_k_s, q4_k_m"
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_SEPARATORS = re.compile(r"[\s_.\-]+")


def _squash(name: str) -> str:
    return _SEPARATORS.sub("", name.casefold())


def closest_name(name: str, choices: Iterable[str]) -> str | None:
    """The choice ``name`` most likely meant, or None when nothing is close."""
    squashed: dict[str, str] = {}
    for choice in choices:
        squashed.setdefault(_squash(choice), choice)
    key = _squash(name)
    if key in squashed:
        return squashed[key]
    # cutoff 0.6 (difflib's default): one wrong or missing character in a short name still matches
    match = difflib.get_close_matches(key, list(squashed), n=1, cutoff=0.6)
    return squashed[match[0]] if match else None


def unknown_name(kind: str, name: str, choices: Iterable[str], listed: str = "valid") -> str:
    """One line: the unknown name, the likeliest intended one, then every valid one."""
    choices = list(choices)
    hint = closest_name(name, choices)
    guess = f": did you mean {hint}?" if hint else ";"
    return f"unknown {kind} {name!r}{guess} {listed}: {', '.join(choices)}"
