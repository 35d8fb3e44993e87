"""The torch model on calibration chunks, with every block's input kept from one reference pass.

Two jobs measure with it: ``prune`` (a candidate is a set of removed blocks) and ``--optimize``'s
probes and verification (a candidate is a set of changed weights, ``quant/probe.py``).

A set of removed blocks changes nothing before its first block, so its calibration NLL reruns
only from there: the kept input of that block, then every later block that is not removed, the
final norm and the output head. Each block also keeps the keyword arguments it was called with
(rotary embeddings, its own attention mask: layers of different attention types get different
masks), so a rerun calls it exactly as the full forward pass did.

Work goes block-major: the reference pass and every measurement sweep the blocks once in order,
and all the candidate sets of one :meth:`BlockRunner.nll_many` call advance together, so each
block is needed once per sweep whatever the number of sets, and the states that run a block
go through it in batched calls (:meth:`BlockRunner.run_block_many`). Sets that removed the same blocks so
far share one hidden state (the ones that removed none share the kept reference input). That
is what lets a model larger than memory run streamed (``load_torch_model(..., stream_blocks=True)``):
embedding, final norm and head stay resident and each block is read from the checkpoint in
float32 only while it runs. Streamed and resident blocks give the same numbers (the same
computation on the same float32 weights).

Kept block inputs are float32: n_blocks x tokens x hidden x 4 bytes (0.54 GB for 32 blocks of
4096 wide on 1024 tokens). bfloat16 would halve that but round every rerun's starting point, so
a removed set's NLL would no longer equal the model's forward pass without those blocks.

Example::

    runner = BlockRunner(load_torch_model(folder), chunks)
    runner.nll(frozenset({3}), runner.search)    # (summed NLL, tokens) with block 3 left out
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import QuantError

STREAM_SHARE = 0.25   # stream the blocks when the float32 model would take more of the free memory
BATCH_TOKENS = 1024   # tokens one batched block call takes (run_block_many): ~45 MB per 11008-wide activation


@dataclass(frozen=True)
class Split:
    """Which calibration chunks a measurement uses."""

    name: str
    indices: tuple[int, ...]


class _Share:
    """A progress bar that counts only the first ``total`` of a sweep's jobs (queued ones ride along)."""

    def __init__(self, bar, total: int):
        self.bar, self.total, self.seen = bar, total, 0

    def update(self, step: int) -> None:
        step = max(0, min(step, self.total - self.seen))
        self.seen += step
        if step:
            self.bar.update(step)


class _Stop(Exception):
    """Ends the kwargs-recording forward pass at the final norm."""


def _same_arguments(a: dict, b: dict) -> bool:
    """Whether two blocks' call arguments are equal (tensors by value, nested tuples too)."""
    import torch

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and bool(torch.equal(x, y)))
        if isinstance(x, (tuple, list)) or isinstance(y, (tuple, list)):
            return type(x) is type(y) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        try:
            return x is y or bool(x == y)
        except Exception:   # an object without a plain equality: not batched with others
            return False

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def stream_blocks(checkpoint, available: int | None = None) -> bool:
    """Whether ``checkpoint``'s model should run streamed: its float32 weights would take more
    than a quarter of the available memory (a 7B model: 27 GB)."""
    if available is None:
        from ..system import available_memory

        available = available_memory() or 32 << 30   # unknown: as if 32 GiB
    f32 = 4 * sum(t.n_elements for t in checkpoint.tensors.values())
    return f32 > STREAM_SHARE * available


class BlockRunner:
    """``model`` (a transformers causal LM, float32, eval mode; its blocks resident or streamed
    through ``model.block_weights``) on ``chunks`` (lists of token ids)."""

    def __init__(self, model, chunks: Sequence[Sequence[int]], held_apart: int = 0, progress=None):
        import torch

        self.torch = torch
        self.model = model
        inner = getattr(model, "model", None)
        self.layers = list(getattr(inner, "layers", None) or [])
        self.norm = getattr(inner, "norm", None)
        if not self.layers or self.norm is None:
            raise QuantError(f"{type(model).__name__} has no decoder blocks to prune")
        self.weights = getattr(model, "block_weights", None)   # None: every block resident
        for p in model.parameters():
            p.requires_grad_(False)
        self.chunks = [torch.as_tensor(list(c), dtype=torch.long)[None, :] for c in chunks]
        n = len(self.chunks)
        if held_apart >= n:
            raise QuantError(f"{n} calibration chunk(s) leave none to search on beside {held_apart} held apart")
        self.search = Split("search", tuple(range(n - held_apart)))
        self.held = Split("held-apart", tuple(range(n - held_apart, n))) if held_apart else self.search
        # inputs[b][i]: the input of block b on chunk i (b = n_blocks: the final norm's input)
        self.inputs: list[list] = [[None] * n for _ in range(self.n_blocks + 1)]
        self.kwargs: list[list[dict]] = [[{}] * n for _ in range(self.n_blocks)]
        self.known: dict[tuple[frozenset, tuple[int, ...]], float] = {}   # (set, chunks) -> summed NLL
        self.costs: list[dict] = []   # one entry per sweep: what, sets, block-token runs, seconds
        self.pending: list[tuple[frozenset, Split]] = []   # queued to ride along with the next sweep
        self.stage = "measure"        # what the sweeps are for (the search sets it; in the cost log)
        self._alike_memo: dict[tuple[int, int], int] = {}   # (block, chunk) -> first chunk called alike
        start = self.clock()
        self._reference(progress)
        self.log("reference", 0, self.n_blocks * sum(c.shape[1] for c in self.chunks), start)

    @staticmethod
    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def log(self, what: str, sets: int, block_token_runs: int, start: tuple[float, float]) -> None:
        """Record one sweep's work, wall and CPU seconds (``prune --json`` prints them: the cost
        model's check; on a shared machine CPU seconds are the steadier figure)."""
        wall, cpu = self.clock()
        self.costs.append({"what": what, "sets": sets, "block_token_runs": int(block_token_runs),
                           "seconds": round(wall - start[0], 2), "cpu_s": round(cpu - start[1], 2)})

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    @contextmanager
    def block(self, b: int):
        """Block ``b``'s module with its weights (read in for the while when streamed)."""
        layer = self.layers[b]
        if self.weights is None:
            yield layer
            return
        self.weights.load(layer, b)
        for p in layer.parameters():
            p.requires_grad_(False)
        try:
            yield layer
        finally:
            self.weights.release(layer)

    def _reference(self, progress) -> None:
        """Every block's call kwargs and block 0's input from a forward pass whose blocks pass
        their input through (no block runs), then the real blocks block-major."""
        torch = self.torch

        def keep(index: int):
            def hook(module, args, kwargs):
                if index == 0:
                    self.inputs[0][self._chunk] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                self.kwargs[index][self._chunk] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return hook

        def stop(module, args):
            raise _Stop

        def passthrough(*args, **kwargs):
            return args[0] if args else kwargs["hidden_states"]

        hooks = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(self.layers)]
        hooks.append(self.norm.register_forward_pre_hook(stop))
        for layer in self.layers:
            layer.forward = passthrough   # an instance attribute: nn.Module.__call__ finds it first
        try:
            with torch.no_grad():   # not inference_mode: Taylor differentiates through the kept inputs
                for self._chunk, chunk in enumerate(self.chunks):
                    try:
                        self.model(input_ids=chunk, use_cache=False)
                    except _Stop:
                        pass
        finally:
            for h in hooks:
                h.remove()
            for layer in self.layers:
                del layer.forward
        with torch.no_grad():
            for b in range(self.n_blocks):
                with self.block(b):
                    self.inputs[b + 1] = self.run_block_many(b, list(enumerate(self.inputs[b])))
                if progress is not None:
                    progress.update(1)

    def run_block(self, b: int, i: int, h):
        """Block ``b`` (loaded: inside :meth:`block` when streamed) on chunk ``i``'s hidden ``h``."""
        out = self.layers[b](h, **self.kwargs[b][i])
        return out[0] if isinstance(out, tuple) else out

    def run_block_many(self, b: int, items: Sequence[tuple[int, object]]) -> list:
        """Block ``b`` on each (chunk, hidden) of ``items``, as :meth:`run_block` would, in
        batched calls: states on chunks the block is called alike for (same length, equal
        rotary and mask arguments) are stacked, up to BATCH_TOKENS tokens a call. The states of
        a batch never mix in a block, so each gets what a call of its own gives (bit for bit on
        this machine's CPU; the tests allow float rounding). On the optimizer's probes of a
        LLaMA-7B-shaped model (128-token chunk, 2 threads) the block calls took 10 % less CPU."""
        torch = self.torch
        groups: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(items):
            groups.setdefault(self._alike(b, i), []).append(k)
        out: list = [None] * len(items)
        for first, ks in groups.items():
            per_call = max(1, BATCH_TOKENS // self.chunks[first].shape[1])
            for start in range(0, len(ks), per_call):
                batch = ks[start:start + per_call]
                if len(batch) == 1:
                    out[batch[0]] = self.run_block(b, items[batch[0]][0], items[batch[0]][1])
                    continue
                stacked = self.run_block(b, first, torch.cat([items[k][1] for k in batch]))
                for k, h in zip(batch, stacked.split(1)):
                    out[k] = h
        return out

    def _alike(self, b: int, i: int) -> int:
        """The first chunk block ``b`` is called for exactly as for chunk ``i`` (its batch key)."""
        key = (b, i)
        if key not in self._alike_memo:
            self._alike_memo[key] = next(j for j in range(i + 1) if j == i or (
                self.chunks[j].shape == self.chunks[i].shape and _same_arguments(self.kwargs[b][j], self.kwargs[b][i])))
        return self._alike_memo[key]

    def chunk_nll(self, i: int, h):
        """Summed NLL of chunk ``i``'s next tokens (positions 1..) given the final hidden ``h``."""
        torch = self.torch
        logits = self.model.lm_head(self.norm(h))[0, :-1].float()
        targets = self.chunks[i][0, 1:]
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    def queue(self, candidates: Iterable[Iterable[int]], split: Split) -> None:
        """Measure these sets on ``split`` with the next sweep whatever it is for (the held-apart
        checks of a search ride along with its next step instead of taking a sweep of their own;
        a streamed model reads every block once per sweep). :meth:`nll_many` then finds them known."""
        for c in candidates:
            job = (frozenset(c), split)
            if (job[0], split.indices) not in self.known and job not in self.pending:
                self.pending.append(job)

    def final_hidden_many(self, candidates: Sequence[Iterable[int]], split: Split, progress=None) -> list[list]:
        """The final norm's input of each removed set on each chunk of ``split`` (one sweep)."""
        return self._sweep([(frozenset(c), split) for c in candidates], progress)

    def _sweep(self, jobs: Sequence[tuple[frozenset, Split]], progress=None) -> list[list]:
        """The final norm's input of each (removed set, split) job, all in one sweep of the blocks:
        jobs on the same chunks that removed the same blocks so far share one hidden state."""
        n = self.n_blocks
        for s, _ in jobs:
            if any(not 0 <= b < n for b in s):
                raise QuantError(f"removed blocks {sorted(s)}: the model has blocks 0..{n - 1}")
        # (chunks, prefix: the job's removed blocks below the current one) -> the jobs sharing it,
        # and their hidden state per chunk; None = the kept reference input of the current block
        members: dict[tuple, list[int]] = {}
        for j, (s, split) in enumerate(jobs):
            members.setdefault((split.indices, frozenset()), []).append(j)
        states: dict[tuple, list | None] = dict.fromkeys(members)
        start, clock, runs = min((min(s) for s, _ in jobs if s), default=n), self.clock(), 0
        done = 0
        for b in range(start, n):
            after: dict[tuple, list[int]] = {}
            for (chunks, prefix), idx in members.items():
                for j in idx:
                    key = (chunks, prefix | {b} if b in jobs[j][0] else prefix)
                    after.setdefault(key, []).append(j)
            following: dict[tuple, list | None] = {}
            run = []
            for key in after:
                chunks, removed = key
                if b in removed:        # removed here: the state passes block b unchanged
                    before = (chunks, removed - {b})
                    following[key] = states[before] if before[1] else [self.inputs[b][i] for i in chunks]
                elif removed:
                    run.append(key)
                else:
                    following[key] = None   # nothing removed yet: the reference pass's next input
            if run:   # every state that runs block b, in batched calls
                items = [(key, i, h) for key in run for i, h in zip(key[0], states[key])]
                with self.torch.no_grad(), self.block(b):
                    outs = self.run_block_many(b, [(i, h) for _, i, h in items])
                for key in run:
                    following[key] = []
                for (key, i, _), h in zip(items, outs):
                    following[key].append(h)
                    runs += self.chunks[i].shape[1]
            members, states = after, following
            if progress is not None:
                step = len(jobs) * (b - start + 1) // (n - start) - done
                progress.update(step)
                done += step
        if progress is not None and done < len(jobs):
            progress.update(len(jobs) - done)
        if start < n:   # a sweep that read blocks (sets that remove none need only the head)
            names = " + ".join(dict.fromkeys(split.name for _, split in jobs))
            self.log(f"{self.stage}: sweep on {names}", len(jobs), runs, clock)
        final = {key: states[key] or [self.inputs[n][i] for i in key[0]] for key in members}
        out: list[list | None] = [None] * len(jobs)
        for key, idx in members.items():
            for j in idx:
                out[j] = final[key]
        return out

    def nll_many(self, candidates: Sequence[Iterable[int]], split: Split, progress=None) -> list[tuple[float, int]]:
        """(summed NLL, token count) on ``split`` of each removed set in ``candidates``; a set
        measured before on the same chunks is not rerun (greedy's first step is one-shot PPL), and
        the sets :meth:`queue`d so far are measured in the same sweep."""
        count = sum(self.chunks[i].shape[1] - 1 for i in split.indices)
        sets = [frozenset(c) for c in candidates]
        new = [(s, split) for s in dict.fromkeys(sets) if (s, split.indices) not in self.known]
        if progress is not None and len(new) < len(sets):
            progress.update(len(sets) - len(new))
        extra = []
        if new:   # queued sets ride along with a sweep that runs anyway, never make one of their own
            extra = [job for job in self.pending if job not in new and (job[0], job[1].indices) not in self.known]
            self.pending = []
        hidden = self._sweep(new + extra, _Share(progress, len(new)) if progress is not None else None)
        totals: dict[int, float] = {}   # id of a shared final state -> its NLL
        with self.torch.no_grad():
            for (s, sp), states in zip(new + extra, hidden):
                if id(states) not in totals:
                    totals[id(states)] = sum(float(self.chunk_nll(i, h).double())
                                             for i, h in zip(sp.indices, states))
                self.known[s, sp.indices] = totals[id(states)]
        return [(self.known[s, split.indices], count) for s in sets]

    def nll(self, removed: Iterable[int], split: Split) -> tuple[float, int]:
        """(summed NLL, token count) on ``split`` with the blocks ``removed`` left out."""
        return self.nll_many([removed], split)[0]

    def ppl(self, removed: Iterable[int], split: Split) -> float:
        total, count = self.nll(removed, split)
        return math.exp(total / count)

    def ppl_many(self, candidates: Sequence[Iterable[int]], split: Split, progress=None) -> list[float]:
        """The PPL of each removed set in ``candidates`` on ``split``: the one call every search
        makes, measured in one sweep of the blocks for all the sets together."""
        return [math.exp(total / count) for total, count in self.nll_many(candidates, split, progress)]

    def kld_many(self, candidates: Sequence[Iterable[int]], split: Split, progress=None) -> list[float]:
        """``ppl_many``'s shape for the KL divergence: for each removed set, the mean over the
        split's scored positions (those ``chunk_nll`` scores) of KL(full model || model without the
        set), in nats, from one sweep for all the sets. The full model's distribution is recomputed
        from the kept final-norm input for each set (no vocabulary-sized cache)."""
        count = sum(self.chunks[i].shape[1] - 1 for i in split.indices)
        out = []
        with self.torch.no_grad():
            for states in self.final_hidden_many(candidates, split, progress):
                total = 0.0
                for i, h in zip(split.indices, states):
                    ref, got = self._log_probs(self.inputs[self.n_blocks][i]), self._log_probs(h)
                    total += float((ref.exp() * (ref - got)).sum().double())
                out.append(total / count)
        return out

    def _log_probs(self, h):
        return self.torch.log_softmax(self.model.lm_head(self.norm(h))[0, :-1].float(), dim=-1)
