"""What both torch-model builders share (``hf_model`` for dense checkpoints, ``moe_torch`` for
mixtures of experts, which ``hf_model`` hands them to): the config.json keys that are not the
model's, a family's transformers class, and the model's name of a checkpoint tensor."""

from __future__ import annotations

# config.json keys that describe the checkpoint's file rather than the model transformers builds
NOT_MODEL_KEYS = ("architectures", "auto_map", "model_type", "block_configs", "drop_attn_list", "drop_mlp_list",
                  "transformers_version")


def model_class(family):
    import transformers

    return getattr(transformers, family.torch_model)


def torch_name(name: str, stored, prefix: str = "model.layers") -> str:
    """The model's parameter name of checkpoint tensor ``name`` (block ``stored[n]`` is block ``n``).

    >>> torch_name("model.layers.4.mlp.up_proj.weight", (0, 1, 4))
    'model.layers.2.mlp.up_proj.weight'
    """
    if not name.startswith(prefix + "."):
        return name
    index, rest = name[len(prefix) + 1:].split(".", 1)
    return f"{prefix}.{list(stored).index(int(index))}.{rest}"
