"""Source families: one module each, all behind the same two calls.

A converter module exposes ``NAME``, ``recognises(checkpoint) -> bool`` and
``make_plan(checkpoint, options) -> ModelPlan``. ``find_converter`` picks the first that
recognises a checkpoint; adding a family means adding a module to ``CONVERTERS``.
"""

from __future__ import annotations

from shortquant.errors import ConfigError

from . import llama_hf

CONVERTERS = (llama_hf,)


def find_converter(checkpoint):
    """The converter module for ``checkpoint``, or ConfigError listing what is supported."""
    for converter in CONVERTERS:
        if converter.recognises(checkpoint):
            return converter
    archs = checkpoint.config.get("architectures") or [checkpoint.config.get("model_type", "unknown")]
    supported = ", ".join(a for c in CONVERTERS for a in c.SUPPORTED_ARCHITECTURES)
    raise ConfigError(f"unsupported architecture {', '.join(map(str, archs))}; supported: {supported}",
                      checkpoint.folder / "config.json")
