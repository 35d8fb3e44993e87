"""The torch model on calibration chunks, with every block's input kept from one reference pass.

A set of removed blocks changes nothing before its first block, so its calibration NLL reruns
only from there: the kept input of that block, then every later block that is not removed, the
final norm and the output head. Each block also keeps the keyword arguments it was called with
(rotary embeddings, its own attention mask: layers of different attention types get different
masks), so a rerun calls it exactly as the full forward pass did.

Example::

    runner = BlockRunner(load_torch_model(folder), chunks)
    runner.nll(frozenset({3}), runner.search)    # (summed NLL, tokens) with block 3 left out
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import QuantError


@dataclass(frozen=True)
class Split:
    """Which calibration chunks a measurement uses."""

    name: str
    indices: tuple[int, ...]


class BlockRunner:
    """``model`` (a transformers causal LM, float32, eval mode) on ``chunks`` (lists of token ids)."""

    def __init__(self, model, chunks: Sequence[Sequence[int]], held_apart: int = 0, progress=None):
        import torch

        self.torch = torch
        self.model = model
        inner = getattr(model, "model", None)
        self.layers = list(getattr(inner, "layers", None) or [])
        self.norm = getattr(inner, "norm", None)
        if not self.layers or self.norm is None:
            raise QuantError(f"{type(model).__name__} has no decoder blocks to prune")
        for p in model.parameters():
            p.requires_grad_(False)
        self.chunks = [torch.as_tensor(list(c), dtype=torch.long)[None, :] for c in chunks]
        n = len(self.chunks)
        if held_apart >= n:
            raise QuantError(f"{n} calibration chunk(s) leave none to search on beside {held_apart} held apart")
        self.search = Split("search", tuple(range(n - held_apart)))
        self.held = Split("held-apart", tuple(range(n - held_apart, n))) if held_apart else self.search
        # inputs[b][i]: the input of block b on chunk i (b = n_blocks: the final norm's input)
        self.inputs: list[list] = [[] for _ in range(self.n_blocks + 1)]
        self.kwargs: list[list[dict]] = [[] for _ in range(self.n_blocks)]
        self._reference(progress)

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def _reference(self, progress) -> None:
        torch = self.torch

        def keep(index: int):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                self.inputs[index].append(x.detach().clone())
                if index < self.n_blocks:
                    self.kwargs[index].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        hooks = [m.register_forward_pre_hook(keep(i), with_kwargs=True)
                 for i, m in enumerate(self.layers + [self.norm])]
        try:
            with torch.no_grad():   # not inference_mode: Taylor differentiates through the kept inputs
                for chunk in self.chunks:
                    self.model(input_ids=chunk, use_cache=False)
                    if progress is not None:
                        progress.update(1)
        finally:
            for h in hooks:
                h.remove()

    def run_block(self, b: int, i: int, h):
        out = self.layers[b](h, **self.kwargs[b][i])
        return out[0] if isinstance(out, tuple) else out

    def final_hidden(self, i: int, removed: frozenset[int] = frozenset()):
        """The final norm's input on chunk ``i`` with ``removed`` left out (from the kept inputs)."""
        first = min(removed, default=self.n_blocks)
        h = self.inputs[first][i]
        for b in range(first, self.n_blocks):
            if b not in removed:
                h = self.run_block(b, i, h)
        return h

    def chunk_nll(self, i: int, h):
        """Summed NLL of chunk ``i``'s next tokens (positions 1..) given the final hidden ``h``."""
        torch = self.torch
        logits = self.model.lm_head(self.norm(h))[0, :-1].float()
        targets = self.chunks[i][0, 1:]
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    def nll(self, removed: Iterable[int], split: Split) -> tuple[float, int]:
        """(summed NLL, token count) on ``split`` with the blocks ``removed`` left out."""
        removed = frozenset(removed)
        total, count = 0.0, 0
        with self.torch.no_grad():
            for i in split.indices:
                total += float(self.chunk_nll(i, self.final_hidden(i, removed)).double())
                count += self.chunks[i].shape[1] - 1
        return total, count

    def ppl(self, removed: Iterable[int], split: Split) -> float:
        total, count = self.nll(removed, split)
        return math.exp(total / count)

    def ppl_many(self, candidates: Sequence[Iterable[int]], split: Split, progress=None) -> list[float]:
        """The PPL of each removed set in ``candidates`` on ``split``: the one call every search
        makes, so a runner may share work between the sets (here: one set after another)."""
        out = []
        for removed in candidates:
            out.append(self.ppl(removed, split))
            if progress is not None:
                progress.update(1)
        return out
