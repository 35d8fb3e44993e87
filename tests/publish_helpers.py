"""Tiny GGUF files with the metadata an export writes, for the publish tests.

They are written with gguf-py's own writer and read back by the code under test with gguf-py's
reader; they are not meant to run (the split test uses the real stories260K fixture for that).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from shortquant import keys

FILE_TYPES = {
    "F16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "Q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}


def make_gguf(path: Path, kind: str = "Q8_0", *, name: str = "St-Vicuna-v1.3 5.5B Taylor",
              chat_template: str | None = None, source_blocks=(0, 1, 3), source_block_count: int = 4,
              recipe: str | None = None, seed: int = 0, extra: dict | None = None) -> Path:
    """A small llama-architecture GGUF with general.* and shortquant.* provenance keys."""
    file_type, tensor_type = FILE_TYPES[kind]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_basename("St-Vicuna-v1.3")
    writer.add_size_label("5.5B")
    writer.add_file_type(int(file_type))
    writer.add_block_count(len(source_blocks))
    writer.add_array(keys.SOURCE_BLOCKS, [int(i) for i in source_blocks])
    writer.add_uint32(keys.SOURCE_BLOCK_COUNT, source_block_count)
    if recipe:
        writer.add_string(keys.RECIPE, recipe)
    if chat_template:
        writer.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", rng.standard_normal((32, 64), dtype=np.float32))
    for block in range(len(source_blocks)):
        weight = rng.standard_normal((64, 64), dtype=np.float32)
        if tensor_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(f"blk.{block}.attn_q.weight", weight.astype(np.float16))
        else:
            data = gguf.quants.quantize(weight, tensor_type)
            writer.add_tensor(f"blk.{block}.attn_q.weight", data,
                              raw_dtype=tensor_type)
        writer.add_tensor(f"blk.{block}.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_results(folder: Path, entries: dict[str, dict]) -> Path:
    """A results.json as the verify stage writes it (only the keys the card reads)."""
    import json

    files = []
    for name, values in entries.items():
        files.append({"file": name, "path": str(folder / name), "type": values.get("type", "Q8_0"),
                      "bytes": (folder / name).stat().st_size, "n_params": 1, "bpw": 8.5,
                      "ppl": values.get("ppl"), "ppl_err": values.get("ppl_err", 0.01),
                      "kld": values.get("kld"), "speed": None})
    data = {"settings": {"ctx": 512, "chunks": 4, "text": {"path": "wiki.test.raw"}},
            "hardware": {"cpu": "Test CPU", "llama_cpp_version": "0.3.36"}, "files": files}
    path = folder / "results.json"
    path.write_text(json.dumps(data, indent=2))
    return path
