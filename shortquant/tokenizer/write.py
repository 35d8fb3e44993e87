"""``TokenizerSpec`` -> the ``tokenizer.*`` keys of a GGUF file."""

from __future__ import annotations

import gguf

from .spec import TokenizerSpec


def write_tokenizer(writer: gguf.GGUFWriter, spec: TokenizerSpec) -> None:
    """Add the ``tokenizer.ggml.*`` keys and ``tokenizer.chat_template`` to ``writer``.

        >>> writer = gguf.GGUFWriter("out.gguf", "llama")           # doctest: +SKIP
        >>> write_tokenizer(writer, read_tokenizer(Path("vicuna")))  # doctest: +SKIP
    """
    writer.add_tokenizer_model(spec.model)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(list(spec.tokens))
    if spec.scores is not None:
        writer.add_token_scores(list(spec.scores))
    writer.add_token_types([int(t) for t in spec.token_types])
    if spec.merges:
        writer.add_token_merges(list(spec.merges))
    for kind, token_id in (("bos", spec.bos_id), ("eos", spec.eos_id), ("eot", spec.eot_id),
                           ("unk", spec.unk_id), ("pad", spec.pad_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_add_eos_token(spec.add_eos)
    if spec.add_space_prefix is not None:
        writer.add_add_space_prefix(spec.add_space_prefix)
    if isinstance(spec.chat_template, str):
        writer.add_chat_template(spec.chat_template)
    elif spec.chat_template is not None:
        writer.add_chat_template([{"name": name, "template": text}
                                  for name, text in spec.chat_template])
