"""Probing the Hugging Face model itself: how much does changing some weights move its output?

A :class:`Prober` loads the checkpoint's torch model (``families.hf_model``, CPU; float32, or
bfloat16 for a large 16-bit checkpoint: half the memory, see :func:`probe_dtype`; a bfloat16
model still computes in float32, one block at a time, see :func:`compute_in_float32`), runs
the calibration chunks once to keep the reference log-probabilities and, on the way, the statistics the error
weighting needs (mean squared input of every linear layer's columns, token counts). Then any
set of weights can be swapped in and the mean KL divergence from the reference measured on the
same tokens; :meth:`Prober.restore` puts the checkpoint's weights back.

Example::

    prober = Prober("models/demo", chunks)
    prober.set_weight("model.layers.0.mlp.down_proj.weight", decoded)
    print(prober.kld())
    prober.restore()
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import QuantError
from ..families.hf_model import load_torch_model
from ..families.torch_names import torch_name


PROBE_DTYPES = ("float32", "bfloat16")
# From this many parameters a 16-bit checkpoint is probed in bfloat16 ("auto"): float32 would
# need 4 bytes a parameter (28 GB for a 7B); below it float32 is cheap and a little more exact.
BF16_FROM_PARAMS = 500_000_000


def probe_dtype(requested: str, n_params: int, source_dtypes) -> str:
    """The dtype to probe in: ``requested`` unless "auto"; auto is bfloat16 for a model of at
    least BF16_FROM_PARAMS parameters stored in 16 bits (BF16/F16: nothing is lost loading it
    in bfloat16 beyond F16's extra mantissa bits), else float32.

    >>> probe_dtype("auto", 7_000_000_000, {"BF16"}), probe_dtype("auto", 135_000_000, {"BF16"})
    ('bfloat16', 'float32')
    """
    if requested != "auto":
        if requested not in PROBE_DTYPES:
            raise QuantError(f"--probe-dtype must be auto, {' or '.join(PROBE_DTYPES)}, got {requested!r}")
        return requested
    sixteen = set(source_dtypes) <= {"BF16", "F16"}
    return "bfloat16" if sixteen and n_params >= BF16_FROM_PARAMS else "float32"


def compute_in_float32(model, blocks) -> list:
    """Hooks that run a bfloat16 model's arithmetic in float32 while its weights stay bfloat16.

    CPUs without bfloat16 matrix units multiply bfloat16 many times slower than float32 (one
    LLaMA-7B block on 1024 tokens, 2 threads: 50 s against 5 s), so each of ``blocks`` (the
    decoder blocks, final norm and output head) is widened to float32 just while it runs and
    narrowed back after (exact: bfloat16 -> float32 -> bfloat16 changes no bit): memory holds
    one block's float32 copy at a time. Hidden states stay float32 from the embedding on, so
    the rotary tables are computed in float32 too. Returns the hook handles.
    """
    import torch

    def wide(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.float()
        if isinstance(value, tuple):
            return tuple(wide(v) for v in value)
        return value

    def before(module, args, kwargs):
        module.float()
        return wide(args), {k: wide(v) for k, v in kwargs.items()}

    def after(module, args, output):
        module.to(torch.bfloat16)

    hooks = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.float())]
    for module in blocks:
        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(module.register_forward_hook(after))
    return hooks


def hf_name(source: str, stored_blocks: Sequence[int] | None) -> str:
    """The model's parameter name of a checkpoint tensor (blocks renumbered 0..N-1 as
    ``load_torch_model`` numbers them; ``stored_blocks`` None: names as stored)."""
    return source if stored_blocks is None else torch_name(source, stored_blocks)


class Prober:
    """The model, its reference outputs on the calibration chunks, and weight swapping.

    The first ``probe_chunks`` chunks (all by default) are the probe chunks: the reference pass
    keeps every block's input on them (in the model's dtype), so a probe of a tensor in block
    ``b`` reruns only blocks ``b`` onwards (``kld(from_block=b)``). The reference
    log-probabilities are kept in float32 whatever the model's dtype (the KL divergence is summed
    in float64; bfloat16 log-probs would err by ~0.02 nats, more than a probe's whole KLD).
    ``dtype``: "float32" (default) or "bfloat16"; swapped-in weights are rounded to it.
    """

    def __init__(self, model_dir: Path, chunks: Sequence[Sequence[int]], threads: int | None = None,
                 stored_blocks: Sequence[int] | None = None, probe_chunks: int | None = None,
                 dtype: str = "float32"):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.stored_blocks = tuple(stored_blocks) if stored_blocks is not None else None
        if dtype not in PROBE_DTYPES:
            raise QuantError(f"probe dtype must be one of {', '.join(PROBE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.model = load_torch_model(model_dir, getattr(torch, dtype))
        self.params = {name: p for name, p in self.model.named_parameters()}
        self.chunks = [torch.as_tensor(np.asarray(c, dtype=np.int64))[None, :] for c in chunks]
        self.n_probe = len(self.chunks) if probe_chunks is None else min(probe_chunks, len(self.chunks))
        self._originals: dict[str, "torch.Tensor"] = {}
        self.col_sq: dict[str, np.ndarray] = {}   # parameter name -> mean squared input per column
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.token_counts = np.zeros(vocab, dtype=np.float64)
        for chunk in chunks:
            np.add.at(self.token_counts, np.asarray(chunk, dtype=np.int64) % vocab, 1)
        self.layers = list(getattr(getattr(self.model, "model", None), "layers", None) or [])
        self.final_norm = getattr(getattr(self.model, "model", None), "norm", None)
        if dtype != "float32":
            head = [m for m in (self.final_norm, self.model.get_output_embeddings()) if m is not None]
            compute_in_float32(self.model, self.layers + head)
        # block_inputs[b][i]: the input of block b on probe chunk i (b = len(layers): of the final norm)
        self.block_inputs: list[list] = [[] for _ in range(len(self.layers) + 1)]
        self.block_kwargs: list[dict] = []   # the keyword arguments every block got, per probe chunk
        self.reference = self._reference()
        self.replay = self._replay_matches()

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def _reference(self) -> list:
        """Log-probs of every chunk, collecting the input statistics of every linear layer and,
        on the probe chunks, every block's input."""
        torch = self.torch
        sums, counts, hooks = {}, {}, []
        keep = {"on": False}

        def hook_for(name: str):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            return hook

        def block_hook(index: int):
            def hook(module, args, kwargs):
                if keep["on"]:
                    x = args[0] if args else kwargs["hidden_states"]
                    self.block_inputs[index].append(x.detach().clone())
                    if index == 0:
                        self.block_kwargs.append({k: v for k, v in kwargs.items()
                                                  if k not in ("hidden_states", "cache", "past_key_values")})
            return hook

        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_pre_hook(hook_for(name + ".weight")))
        for index, layer in enumerate(self.layers + ([self.final_norm] if self.final_norm is not None else [])):
            hooks.append(layer.register_forward_pre_hook(block_hook(index), with_kwargs=True))
        try:
            out = []
            for i, chunk in enumerate(self.chunks):
                keep["on"] = i < self.n_probe
                out.append(self._log_probs(chunk))
        finally:
            for h in hooks:
                h.remove()
        self.col_sq = {name: (sums[name] / counts[name]).float().numpy() for name in sums}
        return out

    def _replay_matches(self) -> bool:
        """Whether rerunning the last block from its kept input gives the reference (it does for
        every decoder this project loads; anything else falls back to whole forward passes)."""
        if not self.layers or self.final_norm is None or not self.block_kwargs:
            return False
        try:
            with self.torch.inference_mode():
                again = self._tail_log_probs(0, self.n_blocks - 1)
        except (TypeError, RuntimeError, KeyError):
            return False
        return bool(self.torch.allclose(again, self.reference[0], atol=1e-4, rtol=0))

    def _log_probs(self, chunk):
        with self.torch.inference_mode():
            logits = self.model(input_ids=chunk, use_cache=False).logits[0]
            return self.torch.log_softmax(logits.float(), dim=-1)

    def _tail_log_probs(self, i: int, from_block: int):
        """Log-probs of probe chunk ``i``, rerunning blocks ``from_block`` onwards only."""
        h = self.block_inputs[from_block][i]
        for layer in self.layers[from_block:]:
            h = layer(h, **self.block_kwargs[i])
            h = h[0] if isinstance(h, tuple) else h
        logits = self.model.lm_head(self.final_norm(h))[0]
        return self.torch.log_softmax(logits.float(), dim=-1)

    def column_weights(self, source: str) -> np.ndarray | None:
        """Mean squared input per column of the linear layer holding checkpoint tensor ``source``."""
        return self.col_sq.get(hf_name(source, self.stored_blocks))

    def set_weight(self, source: str, value: np.ndarray, keep_original: bool = True) -> None:
        """Use ``value`` (the parameter's shape) for checkpoint tensor ``source`` until :meth:`restore`.

        ``keep_original=False``: no copy of the checkpoint's weight is kept, so :meth:`restore`
        cannot put it back (for whole-mix measurements, which replace every weight: keeping
        them all would hold the model twice)."""
        torch = self.torch
        param = hf_name(source, self.stored_blocks)
        p = self.params.get(param)
        if p is None:
            raise QuantError(f"the Hugging Face model has no parameter {param!r} to probe")
        if tuple(p.shape) != tuple(value.shape):
            raise QuantError(f"probe of {param}: shape {value.shape} does not match {tuple(p.shape)}")
        with torch.no_grad():
            if keep_original and param not in self._originals:
                self._originals[param] = p.detach().clone()
            p.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))   # rounds to p's dtype

    def restore(self) -> None:
        with self.torch.no_grad():
            for param, original in self._originals.items():
                self.params[param].copy_(original)
        self._originals.clear()

    def kld(self, which: slice = slice(None), from_block: int | None = None) -> float:
        """Mean KL(reference || current model) over the tokens of chunks ``which``.

        ``from_block``: the first block whose weights were changed (``n_blocks``: only the output
        was); on probe chunks the blocks before it are not rerun. None: run everything.
        """
        torch = self.torch
        total, n = 0.0, 0
        for i in range(len(self.chunks))[which]:
            ref = self.reference[i]
            if from_block is not None and self.replay and i < self.n_probe:
                with torch.inference_mode():
                    lp = self._tail_log_probs(i, from_block)
            else:
                lp = self._log_probs(self.chunks[i])
            with torch.inference_mode():
                total += float((ref.exp() * (ref - lp)).sum(dtype=torch.float64))
            n += ref.shape[0]
        return max(total / n, 0.0)
