"""Block importance on calibration text: one score per block, lower = cheaper to remove.

* ``bi``: ShortGPT's Block Influence (Men et al. 2024, arXiv 2403.03853): 1 - cos(block input,
  block output) per token, averaged over the tokens. A block that hardly turns its input is cheap.
* ``ppl``: the Shortened LLaMA PPL criterion (Kim et al. 2024, arXiv 2402.02834), one-shot: the
  calibration perplexity of the model with that block alone removed.
* ``taylor``: the same paper's first-order Taylor importance, the sum over the block's weights of
  ``|w * dL/dw|`` with L the calibration loss (mean NLL). Gradients are taken block by block from
  the kept block inputs (the gradient at each block's output is carried down), so memory stays
  near one block's weights and activations, never the whole model's gradients; a streamed block
  is read in for its own turn only.

Each function takes a :class:`~shortquant.families.block_runner.BlockRunner` and the split to measure on.
"""

from __future__ import annotations

from ..families.block_runner import BlockRunner, Split

CRITERIA = ("bi", "ppl", "taylor")


def block_influence(runner: BlockRunner, split: Split) -> list[float]:
    """BI of every block from the kept inputs (block b's output is block b+1's input)."""
    torch = runner.torch
    out = []
    for b in range(runner.n_blocks):
        total, count = 0.0, 0
        for i in split.indices:
            x, y = runner.inputs[b][i][0], runner.inputs[b + 1][i][0]
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            total += float((1 - cos).sum())
            count += cos.numel()
        out.append(total / count)
    return out


def one_shot_ppl(runner: BlockRunner, split: Split, progress=None) -> list[float]:
    """Calibration PPL with each block removed alone."""
    return runner.ppl_many([{b} for b in range(runner.n_blocks)], split, progress)


def taylor(runner: BlockRunner, split: Split, progress=None) -> list[float]:
    """Sum of |w * dL/dw| over each block's weights, L = mean NLL over the split's tokens."""
    torch = runner.torch
    start = runner.clock()
    count = sum(runner.chunks[i].shape[1] - 1 for i in split.indices)
    grads = {}   # chunk -> dL/d(input of the block below)
    with torch.enable_grad():
        for i in split.indices:
            h = runner.inputs[runner.n_blocks][i].clone().requires_grad_(True)
            (runner.chunk_nll(i, h) / count).backward()
            grads[i] = h.grad
        scores = [0.0] * runner.n_blocks
        for b in reversed(range(runner.n_blocks)):
            with runner.block(b) as layer:   # streamed blocks: read in for this block's turn only
                params = list(layer.parameters())
                for p in params:
                    p.requires_grad_(True)
                    p.grad = None
                for i in split.indices:
                    x = runner.inputs[b][i].clone().requires_grad_(True)
                    runner.run_block(b, i, x).backward(grads[i])
                    grads[i] = x.grad
                scores[b] = float(sum((p.detach().double() * p.grad.double()).abs().sum()
                                       for p in params if p.grad is not None))
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
            if progress is not None:
                progress.update(1)
    runner.log("taylor", 0, 3 * runner.n_blocks * sum(runner.chunks[i].shape[1] for i in split.indices), start)
    return scores
