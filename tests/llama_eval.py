"""Running a GGUF through llama-cpp-python in tests: logits of a token sequence, greedy text."""

from __future__ import annotations

import numpy as np


def load(path, n_ctx: int = 128):
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=2, seed=0, type_k=0, type_v=0)


def gguf_logits(path, tokens) -> np.ndarray:
    llm = load(path)
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def gguf_greedy(path, prompt, n: int) -> list[int]:
    llm = load(path)
    llm.eval(list(prompt))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].float().numpy()


def hf_greedy(model, prompt, n: int) -> list[int]:
    import torch

    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out
