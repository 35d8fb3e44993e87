"""Probing the Hugging Face model itself: how much does changing some weights move its output?

A :class:`Prober` runs the checkpoint's torch model (``families.hf_model``, float32 arithmetic)
on calibration chunks through the block runner ``prune`` uses
(:class:`~shortquant.families.block_runner.BlockRunner`): one reference pass keeps every block's input,
the reference log-probabilities and, on the way, the statistics the error weighting needs (mean
squared input of every linear layer's columns, token counts).

A measurement takes *variants*, each a set of checkpoint tensors with other values (a probe:
one tensor decoded from a low-bit type; a verification: every tensor decoded from a whole mix),
and sweeps the blocks once for all of them (:meth:`Prober.kld_many`): a variant starts at its
first changed block from the kept input there, its changed weights are put in only while its
own turn in a block runs, and its mean KL divergence from the reference comes out at the end.
A value may be a function that makes it, called when its block's turn comes, so a sweep holds
one block's decoded weights at a time.

The model is read one of two ways, with the same numbers (:func:`probe_from`): held in memory
(small models: fastest), or streamed from the checkpoint a block at a time (the blocks are read
in float32 while they run, only embedding, final norm and head stay resident): a 32-block
LLaMA-7B-shaped run of ``--optimize`` peaks at 5.3 GiB, not the 28 GB its float32 weights take.
Either way every measurement is a handful of sweeps, so streaming adds a few block reads per block.
The variants that share a block's weights (those whose changes lie in earlier blocks) go through
it together in batched calls (:meth:`BlockRunner.run_block_many`).

Example::

    prober = Prober("models/demo", chunks)
    print(prober.kld_many([{"model.layers.0.mlp.down_proj.weight": decoded}]))
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from ..errors import QuantError
from ..families.hf_model import load_torch_model
from ..families.torch_names import torch_name

PROBE_FROM = ("auto", "memory", "disk")
# From this many parameters "auto" streams the blocks from disk: the float32 model would take
# more than its 16-bit checkpoint's bytes (the optimizer's memory target is 1.2x of those),
# while a sweep's block reads cost a few per cent of an export.
STREAM_FROM_PARAMS = 500_000_000

# A new value for a checkpoint tensor (its Hugging Face shape), or what makes it when needed.
Weight = Union[np.ndarray, Callable[[], np.ndarray]]


def probe_from(requested: str, n_params: int, checkpoint=None) -> str:
    """Where the probed model's blocks live: ``requested`` unless "auto"; auto is "disk" for a
    model of at least STREAM_FROM_PARAMS parameters or one whose float32 weights would not fit
    a quarter of the free memory, else "memory".

    >>> probe_from("auto", 7_000_000_000), probe_from("auto", 135_000_000), probe_from("disk", 10)
    ('disk', 'memory', 'disk')
    """
    if requested not in PROBE_FROM:
        raise QuantError(f"--probe-from must be one of {', '.join(PROBE_FROM)}, got {requested!r}")
    if requested != "auto":
        return requested
    if n_params >= STREAM_FROM_PARAMS:
        return "disk"
    if checkpoint is not None:
        from ..families.block_runner import stream_blocks

        return "disk" if stream_blocks(checkpoint) else "memory"
    return "memory"


def hf_name(source: str, stored_blocks: Sequence[int] | None) -> str:
    """The model's parameter name of a checkpoint tensor (blocks renumbered 0..N-1 as
    ``load_torch_model`` numbers them; ``stored_blocks`` None: names as stored)."""
    return source if stored_blocks is None else torch_name(source, stored_blocks)


class _Stop(Exception):
    """Ends a forward pass at block 0's input."""


class Prober:
    """The model, its reference outputs on the calibration chunks, and measurements of variants.

    The first ``probe_chunks`` chunks (all by default) are the probe chunks, the rest are for
    whole-mix verification; every chunk's block inputs are kept (float32). The reference
    log-probabilities are float32, the KL divergence is summed in float64. ``source`` names are
    the checkpoint's tensor names; ``stored_blocks`` maps a pruned checkpoint's block numbers.
    ``stream``: read the blocks from disk one at a time (:func:`probe_from`).
    """

    def __init__(self, model_dir: Path, chunks: Sequence[Sequence[int]], threads: int | None = None,
                 stored_blocks: Sequence[int] | None = None, probe_chunks: int | None = None,
                 stream: bool = False):
        import torch

        from ..families.block_runner import BlockRunner

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.stored_blocks = tuple(stored_blocks) if stored_blocks is not None else None
        self.streamed = bool(stream)
        self.model = load_torch_model(model_dir, torch.float32, stream_blocks=self.streamed)
        if self.streamed and getattr(self.model, "block_weights", None) is None:
            self.streamed = False   # a mixture of experts is always loaded whole
        self.params = dict(self.model.named_parameters())   # streamed blocks: meta until read in
        self.n_probe = len(chunks) if probe_chunks is None else min(probe_chunks, len(chunks))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.token_counts = np.zeros(vocab, dtype=np.float64)
        for chunk in chunks:
            np.add.at(self.token_counts, np.asarray(chunk, dtype=np.int64) % vocab, 1)
        self._pending: dict[str, Weight] = {}
        self.col_sq: dict[str, np.ndarray] = {}   # parameter name -> mean squared input per column
        sums, counts = {}, {}

        def hook_for(name: str):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            return hook

        hooks = [module.register_forward_pre_hook(hook_for(name + ".weight"))
                 for name, module in self.model.named_modules() if isinstance(module, torch.nn.Linear)]
        try:
            self.runner = BlockRunner(self.model, chunks)
            n = self.runner.n_blocks
            self.reference = [self._log_probs(self.runner.inputs[n][i]) for i in range(len(chunks))]
        finally:
            for h in hooks:
                h.remove()
        self.col_sq = {name: (sums[name] / counts[name]).float().numpy() for name in sums}
        self.chunks = self.runner.chunks
        names = {id(m): name for name, m in self.model.named_modules()}
        self.block_prefix = [names[id(layer)] + "." for layer in self.runner.layers]

    @property
    def n_blocks(self) -> int:
        return self.runner.n_blocks

    @property
    def probe_chunks(self) -> slice:
        return slice(0, self.n_probe)

    def column_weights(self, source: str) -> np.ndarray | None:
        """Mean squared input per column of the linear layer holding checkpoint tensor ``source``."""
        return self.col_sq.get(hf_name(source, self.stored_blocks))

    # -- measuring ----------------------------------------------------------------------------
    def kld_many(self, variants: Sequence[Mapping[str, Weight]], which: slice = slice(None),
                 progress=None) -> list[float]:
        """Mean KL(reference || model with a variant's weights) over the tokens of chunks
        ``which``, for each variant (checkpoint tensor name -> new value), from one sweep of
        the blocks."""
        torch = self.torch
        n = self.n_blocks
        chunks = list(range(len(self.chunks)))[which]
        parts = [self._by_block(v) for v in variants]   # per variant: {block or "head": {param: weight}}
        # where each variant starts: the embedding (-1) when it changes it, else its first changed block
        starts = [-1 if p.get("embedding") else min([b for b in p if isinstance(b, int)], default=n)
                  for p in parts]
        states: dict[int, list] = {}
        with torch.no_grad():
            for v, part in enumerate(parts):
                if starts[v] < 0:
                    with self._swapped(part.get("embedding", {})):
                        states[v] = [self._block0_input(i) for i in chunks]
            for b in range(max(0, min(starts, default=n)), n):
                active = [v for v in range(len(parts)) if starts[v] <= b]
                if not active:
                    continue
                with self.runner.block(b):
                    # decoded values shared by several variants, kept until their last user ran
                    uses = Counter(getattr(w, "key", None) for v in active for w in parts[v].get(b, {}).values())
                    decoded: dict = {}
                    for v in active:
                        if v not in states:
                            states[v] = [self.runner.inputs[b][i] for i in chunks]
                    # the variants that changed an earlier block run this one's own weights: together
                    shared = [v for v in active if not parts[v].get(b)]
                    outs = self.runner.run_block_many(b, [(i, h) for v in shared for i, h in zip(chunks, states[v])])
                    for k, v in enumerate(shared):
                        states[v] = outs[k * len(chunks):(k + 1) * len(chunks)]
                    for v in (v for v in active if parts[v].get(b)):
                        with self._swapped(parts[v][b], decoded):
                            states[v] = self.runner.run_block_many(b, list(zip(chunks, states[v])))
                        for w in parts[v][b].values():
                            key = getattr(w, "key", None)
                            uses[key] -= 1
                            if not uses[key]:
                                decoded.pop(key, None)
                if progress is not None:
                    progress.update(1)
            out = []
            for v, part in enumerate(parts):
                final = states.get(v) or [self.runner.inputs[n][i] for i in chunks]
                total, count = 0.0, 0
                with self._swapped(part.get("head", {})):
                    for i, h in zip(chunks, final):
                        ref, got = self.reference[i], self._log_probs(h)
                        total += float((ref.exp() * (ref - got)).sum(dtype=torch.float64))
                        count += ref.shape[0]
                out.append(max(total / count, 0.0) if count else 0.0)
        return out

    def _by_block(self, variant: Mapping[str, Weight]) -> dict:
        """A variant's weights by where they act: block number, "embedding" or "head" (the
        output, final norm; a tied embedding acts in both places)."""
        out: dict = {}
        embedding = self.model.get_input_embeddings().weight
        for source, value in variant.items():
            param = hf_name(source, self.stored_blocks)
            p = self.params.get(param)
            if p is None:
                raise QuantError(f"the Hugging Face model has no parameter {param!r} to probe")
            block = next((b for b, prefix in enumerate(self.block_prefix) if param.startswith(prefix)), None)
            if block is not None:
                out.setdefault(block, {})[param] = value
                continue
            if p is embedding:
                out.setdefault("embedding", {})[param] = value
            if p is not embedding or self.model.get_output_embeddings().weight is embedding:
                out.setdefault("head", {})[param] = value
        return out

    def _swapped(self, weights: Mapping[str, Weight], decoded: dict | None = None):
        """A context in which the named parameters hold ``weights`` (their own values after)."""
        from contextlib import contextmanager

        torch = self.torch

        @contextmanager
        def swap():
            saved = []
            try:
                for param, value in weights.items():
                    p = self.model.get_parameter(param)   # a streamed block's: the one just read in
                    if callable(value):   # made now; variants naming the same ``key`` share it
                        key = getattr(value, "key", None)
                        if decoded is not None and key is not None and key in decoded:
                            value = decoded[key]
                        else:
                            value = value()
                            if decoded is not None and key is not None:
                                decoded[key] = value
                    if tuple(p.shape) != tuple(value.shape):
                        raise QuantError(f"probe of {param}: shape {tuple(value.shape)} does not match {tuple(p.shape)}")
                    # the parameter points at the new values (no copy either way; the
                    # checkpoint's stay where they are and are pointed at again after)
                    saved.append((p, p.data))
                    p.data = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
                yield
            finally:
                for p, original in saved:
                    p.data = original

        return swap()

    def _block0_input(self, i: int):
        """Block 0's input on chunk ``i`` from the embedding as it is now (a forward pass that
        stops there, so a model's own embedding scaling applies)."""
        captured = {}

        def grab(module, args, kwargs):
            captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            raise _Stop

        handle = self.runner.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(input_ids=self.chunks[i], use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured["h"]

    def _log_probs(self, h):
        with self.torch.no_grad():
            logits = self.model.lm_head(self.runner.norm(h))[0]
            return self.torch.log_softmax(logits.float(), dim=-1)

    # -- one variant at a time ----------------------------------------------------------------
    def set_weight(self, source: str, value: Weight) -> None:
        """Use ``value`` for checkpoint tensor ``source`` in :meth:`kld` until :meth:`restore`."""
        self._pending[source] = value

    def restore(self) -> None:
        self._pending.clear()

    def kld(self, which: slice = slice(None)) -> float:
        """Mean KL divergence of the model with the weights :meth:`set_weight` gave."""
        return self.kld_many([dict(self._pending)], which)[0]
