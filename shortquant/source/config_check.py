"""Types and ranges of the ``config.json`` fields every family reads, checked once on reading.

The families read these fields with their own rules (which are required, which default); this
table only makes sure that a field which is present has a usable kind of value, so a config
saying ``"hidden_size": "4096"`` or ``"rope_scaling": 2.0`` is bad input in one line, never a
TypeError deep inside a converter. ``null`` counts as absent (Hugging Face writes it for
unset fields).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError

# GGUF stores these as uint32: a value past that range cannot be written.
_MAX_COUNT = 2**31 - 1

_COUNTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "vocab_size", "head_dim", "max_position_embeddings")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_STRINGS = ("model_type", "torch_dtype", "hidden_act")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_ROPE_COUNTS = ("original_max_position_embeddings",)
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_COUNT


def _is_positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def check_config(config: dict, path: Path) -> dict:
    """Raise ConfigError naming the first field whose value cannot be right; return ``config``."""
    def bad(key, value, want):
        raise ConfigError(f"{key!r} must be {want}, not {json_repr(value)}", path)

    for key in _COUNTS:
        value = config.get(key)
        if value is not None and not _is_count(value):
            bad(key, value, f"a whole number from 1 to {_MAX_COUNT}")
    for key in _POSITIVE_NUMBERS:
        value = config.get(key)
        if value is not None and not _is_positive_number(value):
            bad(key, value, "a positive number")
    for key in _FLAGS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            bad(key, value, "true or false")
    for key in _STRINGS:
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            bad(key, value, "a string")
    for key in _TOKEN_IDS:
        value = config.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(_is_token_id(i) for i in ids):
            bad(key, value, "a token id or a list of token ids")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        bad("architectures", archs, "a list of class names")
    scaling = config.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            bad("rope_scaling", scaling, "an object or null")
        for key in ("type", "rope_type"):
            if scaling.get(key) is not None and not isinstance(scaling[key], str):
                bad(f"rope_scaling.{key}", scaling[key], "a string")
        for key in _ROPE_COUNTS:
            if scaling.get(key) is not None and not _is_count(scaling[key]):
                bad(f"rope_scaling.{key}", scaling[key], "a positive whole number")
        for key in _ROPE_NUMBERS:
            if scaling.get(key) is not None and not _is_positive_number(scaling[key]):
                bad(f"rope_scaling.{key}", scaling[key], "a positive number")
    return config


def json_repr(value) -> str:
    """A short one-line rendering of a JSON value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
