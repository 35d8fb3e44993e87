"""Source families, chosen by ``config.json``'s ``architectures`` (or ``model_type``).

Each module holds one ``FAMILY`` (``family.Family``): its tensor table, hyper-parameters and
quirks. ``planner.plan_model`` does everything they share. Adding a family: one module here, one
line in ``FAMILIES``, and a test.
"""

from __future__ import annotations

from shortquant.errors import ConfigError

from . import deci, llama, mixtral, nemotron, qwen2, qwen3, qwen3moe
from .family import Family
from .planner import plan_model

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, deci.DECILM, qwen3moe.FAMILY,
                                mixtral.FAMILY, nemotron.FAMILY)


def find_family(checkpoint) -> Family:
    """The family of ``checkpoint``, or a ConfigError listing the supported architectures."""
    for family in FAMILIES:
        if family.recognises(checkpoint.config):
            return family
    archs = checkpoint.config.get("architectures") or [checkpoint.config.get("model_type", "unknown")]
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise ConfigError(f"unsupported architecture {', '.join(map(str, archs))}; supported: {supported}",
                      checkpoint.folder / "config.json")


def make_model_plan(checkpoint, options):
    """The ``ModelPlan`` of ``checkpoint`` (no weights read)."""
    return plan_model(find_family(checkpoint), checkpoint, options)


__all__ = ["FAMILIES", "Family", "find_family", "make_model_plan", "plan_model"]
