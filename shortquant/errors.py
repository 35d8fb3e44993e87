"""User-facing error types.

Every kind of bad input has its own class. The CLI catches ``ShortquantError`` once,
prints ``error: <message>`` on one line and exits with ``exit_code`` (2 for bad input).
Anything else escaping is an internal failure (exit 1).
"""

from __future__ import annotations

from pathlib import Path


class ShortquantError(Exception):
    """Base of all errors caused by the user's input or environment."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class SourceError(ShortquantError):
    """A checkpoint folder or one of its files cannot be read as a model."""


class ConfigError(SourceError):
    """config.json is missing, not JSON, or describes an unsupported model."""


class LayoutError(SourceError):
    """The tensors of a checkpoint do not form a consistent set of blocks."""


class WeightError(SourceError):
    """A weight has a wrong shape or non-finite values."""


class TokenizerError(SourceError):
    """The tokenizer files cannot be read or converted."""


class OutputError(ShortquantError):
    """The output location cannot be written."""


class QuantError(ShortquantError):
    """A quantization type, mix, override or importance matrix is unusable."""


class GGUFError(ShortquantError):
    """A GGUF file is unreadable, inconsistent, holds invalid data or fails its checksum."""


class EvalError(ShortquantError):
    """An evaluation input (text, base, GGUF file) is unusable."""


class PublishError(ShortquantError):
    """A card, split or upload cannot be made from the given folder."""


class BackendError(ShortquantError):
    """llama-cpp-python / ggml is missing or lacks a needed feature."""
