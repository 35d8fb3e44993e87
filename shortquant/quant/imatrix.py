"""Importance matrices (imatrix): llama.cpp's files, checks, and computing one with torch.

An imatrix holds, for every weight matrix, the sum over calibration tokens of the squared input
activation of each input column (``<name>.in_sum2``) and how many tokens were summed
(``<name>.counts``). The quantizers weigh each column's error by the mean, ``in_sum2 / count``.

Files are llama.cpp's: the GGUF format that ``llama-imatrix`` writes today (``general.type =
imatrix``, keys ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``) and the
legacy ``.dat`` binary. Means are taken exactly as ``llama-quantize`` loads them.

>>> import numpy as np, tempfile, os
>>> im = Imatrix({"blk.0.attn_q.weight": np.full((1, 4), 6.0, np.float32)},
...              {"blk.0.attn_q.weight": np.array([3.0], np.float32)}, chunk_count=1, chunk_size=3)
>>> path = os.path.join(tempfile.mkdtemp(), "m.imatrix.gguf")
>>> write_imatrix(path, im)
>>> read_imatrix(path).importance()["blk.0.attn_q.weight"]
array([2., 2., 2., 2.], dtype=float32)
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from gguf import MODEL_ARCH, TENSOR_NAMES, GGUFReader, GGUFWriter, Keys, get_tensor_name_map

from ..errors import QuantError

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
IMATRIX_TYPE = "imatrix"   # general.type of an imatrix GGUF


@dataclass
class Imatrix:
    """Raw imatrix statistics, keyed by GGUF tensor name.

    ``sums[name]``: float32 (n_mat, n_cols), the summed squared activations (one row per expert
    for MoE tensors, one row otherwise); ``counts[name]``: float32 (n_mat,), tokens per row.
    ``legacy``: read from a ``.dat`` file, whose sums are already means times the call count.
    """

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self) -> dict[str, np.ndarray]:
        """Per-column importance as llama-quantize hands it to the quantizers (flat float32).

        GGUF: ``sums / count`` per matrix (1.0 where a matrix saw no tokens);
        legacy: ``sums / ncall`` (sums unchanged when ncall is 0).
        """
        out = {}
        for name in self.names():
            sums = self.sums[name].astype(np.float32)
            counts = self.counts[name].astype(np.float32).reshape(-1)
            if self.legacy:
                ncall = counts[0] if counts.size else 0
                values = sums / np.float32(ncall) if ncall > 0 else sums
            else:
                sums = sums.reshape(counts.size, -1)
                safe = np.where(counts > 0, counts, 1).astype(np.float32)
                values = np.where(counts[:, None] > 0, sums / safe[:, None], np.float32(1))
            out[name] = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        return out


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp imatrix file, GGUF or legacy ``.dat`` (told apart by the GGUF magic).

    Raises QuantError for unreadable or inconsistent files and for non-finite values.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise QuantError(f"cannot read imatrix: {exc.strerror}", path) from exc
    imatrix = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    check_finite(imatrix, path)
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    from shortquant.gguf_check import read_gguf_checked

    reader = read_gguf_checked(path, QuantError)   # counts checked first; one line for any damage

    def field_value(key):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    sums, counts = {}, {}
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(SUMS_SUFFIX):
            sums[t.name[: -len(SUMS_SUFFIX)]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNTS_SUFFIX):
            counts[t.name[: -len(COUNTS_SUFFIX)]] = data.reshape(-1)
    if not sums:
        raise QuantError("imatrix GGUF has no <name>.in_sum2 tensors", path)
    for name in sorted(set(sums) ^ set(counts)):
        raise QuantError(f"imatrix has {'sums' if name in sums else 'counts'} but not "
                         f"{'counts' if name in sums else 'sums'} for {name}", path)
    for name in sums:
        if sums[name].shape[0] != counts[name].size:
            raise QuantError(f"imatrix entry {name}: {sums[name].shape[0]} matrices but "
                             f"{counts[name].size} counts", path)
    datasets = field_value(Keys.IMatrix.DATASETS)
    return Imatrix(
        sums=sums,
        counts=counts,
        datasets=list(datasets) if isinstance(datasets, list) else ([datasets] if datasets else []),
        chunk_count=int(field_value(Keys.IMatrix.CHUNK_COUNT) or 0),
        chunk_size=int(field_value(Keys.IMatrix.CHUNK_SIZE) or 0),
    )


def _read_legacy(path: Path) -> Imatrix:
    """The ``.dat`` format: int32 n_entries, then per entry (int32 len, name, int32 ncall,
    int32 nval, float32[nval]), then optionally int32 chunk count, int32 len, dataset name."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise QuantError("truncated legacy imatrix (.dat) file", path)
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise QuantError("not an imatrix file (neither GGUF nor legacy .dat with entries)", path)
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length <= 0 or length > 4096:
            raise QuantError("not an imatrix file (bad entry name length)", path)
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise QuantError(f"imatrix entry {name} has no values", path)
        if nval > (len(raw) - pos) // 4:   # checked before reading: the count is the file's claim
            raise QuantError("truncated legacy imatrix (.dat) file", path)
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        sums[name] = values.reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.float32)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if 0 < length <= len(raw) - pos:
                datasets.append(bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace"))
    return Imatrix(sums, counts, datasets, chunk_count=chunk_count, chunk_size=0, legacy=True)


def write_imatrix(path: str | Path, imatrix: Imatrix) -> None:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format (what ``llama-imatrix`` writes).

    Tensors in sorted name order, ``<name>.in_sum2`` of shape (n_mat, n_cols) and
    ``<name>.counts`` of shape (n_mat, 1), both F32. Written to a temporary name, then renamed.
    """
    path = Path(path)
    if imatrix.legacy:
        raise QuantError("cannot write legacy imatrix data as GGUF (its counts are call counts)")
    check_finite(imatrix, path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        writer = GGUFWriter(tmp, arch="")
        # llama-imatrix writes no architecture key; GGUFWriter always adds one
        writer.kv_data[0].pop(Keys.General.ARCHITECTURE, None)
        writer.add_type(IMATRIX_TYPE)
        # llama-quantize insists on the datasets key; gguf-py cannot write an empty array
        writer.add_array(Keys.IMatrix.DATASETS, list(imatrix.datasets) or ["(unknown)"])
        writer.add_uint32(Keys.IMatrix.CHUNK_COUNT, int(imatrix.chunk_count))
        writer.add_uint32(Keys.IMatrix.CHUNK_SIZE, int(imatrix.chunk_size))
        for name in imatrix.names():
            counts = np.asarray(imatrix.counts[name], dtype=np.float32).reshape(-1)
            sums = np.asarray(imatrix.sums[name], dtype=np.float32).reshape(counts.size, -1)
            writer.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(sums))
            writer.add_tensor(name + COUNTS_SUFFIX, counts.reshape(-1, 1).copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QuantError(f"cannot write imatrix: {exc.strerror}", path) from exc


def check_finite(imatrix: Imatrix, path: str | Path | None = None) -> None:
    """QuantError naming the first entry with a NaN or infinite value."""
    for name in imatrix.names():
        if not (np.isfinite(imatrix.sums[name]).all() and np.isfinite(imatrix.counts[name]).all()):
            raise QuantError(f"imatrix entry {name} has non-finite values", path)


def match_model(imatrix: Imatrix, tensors: Mapping[str, tuple[int, ...]],
                path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The importance vector of every model tensor the imatrix covers, after checking it fits.

    ``tensors``: GGUF name -> numpy shape ((rows, cols) or (n_expert, rows, cols)). An entry
    whose name is not a model tensor, or whose size is not cols x n_expert, means the imatrix
    was made for another model: QuantError naming the tensor. (llama.cpp tolerates a wrong
    size only for token_embd; so do we.)
    """
    values = imatrix.importance()
    unknown = [name for name in values if name not in tensors]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise QuantError(f"imatrix has entries for tensors this model does not have: "
                         f"{', '.join(unknown[:3])}{more}; was it made for another model?", path)
    out = {}
    for name, vec in values.items():
        shape = tuple(tensors[name])
        expected = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if vec.size != expected:
            if name == "token_embd.weight":
                continue
            raise QuantError(f"imatrix entry {name} has {vec.size} values but the model's tensor "
                             f"{name} {list(shape)} needs {expected}; was it made for another model?", path)
        out[name] = vec
    return out


# ---------------------------------------------------------------------------------------------
# Computing an imatrix from a Hugging Face model
# ---------------------------------------------------------------------------------------------

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
MIN_CTX = 16  # llama-imatrix ignores matrix products over fewer than 16 tokens


def linear_gguf_names(model, block_map: Mapping[int, int] | None = None) -> dict[str, str]:
    """HF module name -> GGUF weight name for every block ``nn.Linear`` of a LLaMA-family model.

    ``block_map`` maps source layer indices to ``blk`` indices (pruned models keep gapped
    indices); by default the sorted source indices are numbered 0, 1, 2, ... The output head
    is left out, as llama-imatrix leaves it out by default.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> linear_gguf_names(m)["model.layers.1.mlp.down_proj"]
    'blk.1.ffn_down.weight'
    """
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sources = sorted({int(m.group(1)) for n in linears if (m := _LAYER_INDEX.search(n))})
    if block_map is None:
        block_map = {src: blk for blk, src in enumerate(sources)}
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, (max(sources) + 1) if sources else 1)
    out = {}
    for hf_name in linears:
        found = _LAYER_INDEX.search(hf_name)
        if found is None:
            continue
        src = int(found.group(1))
        if src not in block_map:
            raise QuantError(f"block_map has no entry for source layer {src} ({hf_name})")
        mapped = name_map.get_type_and_name(hf_name)
        if mapped is None:
            continue  # a projection llama.cpp has no tensor for
        kind, _ = mapped
        out[hf_name] = TENSOR_NAMES[kind].format(bid=block_map[src]) + ".weight"
    return out


def expert_gguf_names(model, block_map: Mapping[int, int] | None = None) -> dict[str, tuple[str, ...]]:
    """HF module name -> GGUF names for the mixture-of-experts modules of a transformers 5 model:
    ``...mlp.experts`` (3-D ``gate_up_proj`` / ``down_proj``) -> (ffn_gate_exps, ffn_up_exps,
    ffn_down_exps); ``...mlp.gate`` (the router, not an ``nn.Linear``) -> (ffn_gate_inp,).
    Blocks numbered as :func:`linear_gguf_names` numbers them."""
    import torch

    found = {}
    for name, module in model.named_modules():
        m = _LAYER_INDEX.search(name + ".")
        if m is None:
            continue
        if name.endswith(".mlp.experts") and getattr(getattr(module, "gate_up_proj", None), "ndim", 0) == 3:
            found[name] = (int(m.group(1)), ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        elif name.endswith(".mlp.gate") and not isinstance(module, torch.nn.Linear) and \
                getattr(getattr(module, "weight", None), "ndim", 0) == 2:
            found[name] = (int(m.group(1)), ("ffn_gate_inp",))
    sources = sorted({src for src, _ in found.values()})
    if block_map is None:
        block_map = {src: blk for blk, src in enumerate(sources)}
    return {name: tuple(f"blk.{block_map[src]}.{kind}.weight" for kind in kinds)
            for name, (src, kinds) in found.items()}


def _expert_hook(sums: dict, counts: dict, names: tuple[str, str, str]):
    """A pre-hook on a transformers 5 experts module, called with (tokens, chosen experts, weights):
    per expert, the squares of the tokens routed to it (gate and up read them) and of the
    activations its down projection reads, as llama-imatrix's 3-D entries sum them."""
    import torch

    gate, up, down = names

    def hook(module, args):
        x, chosen = args[0].detach().float(), args[1]
        for e in torch.unique(chosen).tolist():
            rows = (chosen == e).any(dim=-1).nonzero().squeeze(-1)
            xe = x[rows]
            squares = (xe * xe).sum(dim=0).double()
            sums[gate][e] += squares
            sums[up][e] += squares
            g, u = (xe @ module.gate_up_proj[e].float().T).chunk(2, dim=-1)
            h = module.act_fn(g) * u
            sums[down][e] += (h * h).sum(dim=0).double()
            for n in names:
                counts[n][e] += len(rows)
    return hook


def chunk_tokens(tokens: Sequence[int], *, ctx: int, chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """Split tokens into llama-imatrix's chunks: consecutive ``ctx``-token windows, at most
    ``chunks`` of them, the first token of each replaced by BOS (when the vocabulary adds one).

    >>> [c[:3] for c in chunk_tokens(list(range(100, 140)), ctx=16, chunks=None, bos_id=1)]
    [[1, 101, 102], [1, 117, 118]]
    """
    if ctx < MIN_CTX:
        raise QuantError(f"--ctx must be at least {MIN_CTX} (llama-imatrix skips shorter batches)")
    n_chunk = len(tokens) // ctx
    if chunks is not None:
        n_chunk = min(n_chunk, chunks)
    if n_chunk < 1:
        raise QuantError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}")
    out = []
    for i in range(n_chunk):
        window = list(tokens[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            window[0] = bos_id
        out.append(window)
    return out


def compute_imatrix(model, tokens: Sequence[int], *, ctx: int = 512, chunks: int | None = None,
                    bos_id: int | None = 1, block_map: Mapping[int, int] | None = None,
                    dataset: str = "", progress: bool = True) -> Imatrix:
    """An imatrix from a Hugging Face causal LM, computed as llama-imatrix defines it.

    The token stream is cut into ``ctx``-token chunks (first token of each set to BOS), each
    chunk is run through ``model``, and a forward pre-hook on every block ``nn.Linear`` adds the
    squares of its input, per input column, to ``in_sum2`` and the number of tokens to
    ``counts``. Keyed by GGUF weight name (see :func:`linear_gguf_names`).

    The model runs in its own dtype (a bf16 model stays bf16: no float32 copy of it); the
    squares are summed in float32 per chunk and added into float64 accumulators allocated once.
    Projections that read the same input (q/k/v, gate/up) share one sum of squares. Only the
    decoder runs: the output head, which no block weight needs, is skipped.

    >>> # im = compute_imatrix(model, sp.encode(text), ctx=512, chunks=100)
    """
    import torch
    from tqdm import tqdm

    windows = chunk_tokens(tokens, ctx=ctx, chunks=chunks, bos_id=bos_id)
    names = linear_gguf_names(model, block_map)
    if not names and not expert_gguf_names(model, block_map):
        raise QuantError("the model has no LLaMA-style block linear layers to collect statistics for")
    modules = dict(model.named_modules())
    sums = {g: torch.zeros(modules[hf].in_features, dtype=torch.float64) for hf, g in names.items()}
    counts = dict.fromkeys(sums, 0)
    last = {"input": None, "squares": None}  # the last input seen, and its column sums of squares

    def hook_for(gguf_name: str):
        def hook(module, args):
            x = args[0]
            if last["input"] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                last["input"], last["squares"] = x, (flat * flat).sum(dim=0).cpu()
            sums[gguf_name].add_(last["squares"])
            counts[gguf_name] += x.numel() // x.shape[-1]
        return hook

    handles = [modules[hf].register_forward_pre_hook(hook_for(g)) for hf, g in names.items()]
    for hf, gguf_names in expert_gguf_names(model, block_map).items():   # mixture of experts
        module = modules[hf]
        if len(gguf_names) == 1:      # the router reads the block's normed input, like any linear
            sums[gguf_names[0]] = torch.zeros(module.weight.shape[1], dtype=torch.float64)
            counts[gguf_names[0]] = 0
            handles.append(module.register_forward_pre_hook(hook_for(gguf_names[0])))
            continue
        n_expert, _, hidden = module.gate_up_proj.shape
        width = module.down_proj.shape[-1]
        for n, cols in zip(gguf_names, (hidden, hidden, width)):
            sums[n] = torch.zeros((n_expert, cols), dtype=torch.float64)
            counts[n] = np.zeros(n_expert, dtype=np.int64)
        handles.append(module.register_forward_pre_hook(_expert_hook(sums, counts, gguf_names)))
    device = next(model.parameters()).device
    # the decoder alone: the block weights' inputs are all there, the logits are not needed
    body = model.get_decoder() if hasattr(model, "get_decoder") and model.get_decoder() is not None else model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for window in tqdm(windows, desc="imatrix", unit="chunk", disable=not progress):
                body(input_ids=torch.tensor([window], dtype=torch.long, device=device), use_cache=False)
                last["input"] = last["squares"] = None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    result = Imatrix(   # experts: one row and one count per expert
        sums={n: s.to(torch.float32).numpy().reshape(np.size(counts[n]), -1) for n, s in sums.items()
              if np.any(counts[n])},
        counts={n: np.asarray(c, dtype=np.float32).reshape(-1) for n, c in counts.items() if np.any(c)},
        datasets=[dataset] if dataset else [],
        chunk_count=len(windows),
        chunk_size=ctx,
    )
    check_finite(result)
    return result
