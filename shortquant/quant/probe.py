"""Probing the Hugging Face model itself: how much does changing some weights move its output?

A :class:`Prober` loads the checkpoint with transformers (float32, CPU), runs the calibration
chunks once to keep the reference log-probabilities and, on the way, the statistics the error
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

from ..errors import QuantError, SourceError, TokenizerError


def calibration_tokens(model_dir: Path, text: str) -> tuple[list[int], int | None]:
    """Token ids of ``text`` (BOS first when the vocabulary has one) and the BOS id.

    sentencepiece's ``tokenizer.model`` when present, else the Hugging Face ``tokenizer.json``.
    """
    model_dir = Path(model_dir)
    sp_file, hf_file = model_dir / "tokenizer.model", model_dir / "tokenizer.json"
    if sp_file.is_file():
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load sentencepiece model: {exc}", sp_file) from None
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        return ([bos] if bos is not None else []) + sp.encode(text), bos
    if hf_file.is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        bos = tok.bos_token_id
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ([bos] if bos is not None else []) + list(ids), bos
    raise TokenizerError("no tokenizer.model or tokenizer.json to tokenize the calibration text", model_dir)


def load_hf_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"transformers cannot load the model to measure it: {first}", model_dir) from None


class Prober:
    """The model, its reference outputs on the calibration chunks, and weight swapping."""

    def __init__(self, model_dir: Path, chunks: Sequence[Sequence[int]], threads: int | None = None):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.model = load_hf_model(model_dir)
        self.params = dict(self.model.named_parameters())
        self.chunks = [torch.as_tensor(np.asarray(c, dtype=np.int64))[None, :] for c in chunks]
        self._originals: dict[str, "torch.Tensor"] = {}
        self.col_sq: dict[str, np.ndarray] = {}   # parameter name -> mean squared input per column
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.token_counts = np.zeros(vocab, dtype=np.float64)
        for chunk in chunks:
            np.add.at(self.token_counts, np.asarray(chunk, dtype=np.int64) % vocab, 1)
        self.reference = self._reference()
        self.reference_p = [lp.exp() for lp in self.reference]

    def _reference(self) -> list:
        """Log-probs of every chunk, collecting the input statistics of every linear layer."""
        torch = self.torch
        sums, counts, hooks = {}, {}, []

        def hook_for(name: str):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            return hook

        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_pre_hook(hook_for(name + ".weight")))
        try:
            out = [self._log_probs(chunk) for chunk in self.chunks]
        finally:
            for h in hooks:
                h.remove()
        self.col_sq = {name: (sums[name] / counts[name]).float().numpy() for name in sums}
        return out

    def _log_probs(self, chunk):
        with self.torch.inference_mode():
            logits = self.model(input_ids=chunk).logits[0].double()
        return self.torch.log_softmax(logits, dim=-1)

    def has(self, param: str) -> bool:
        return param in self.params

    def set_weight(self, param: str, value: np.ndarray) -> None:
        """Use ``value`` (the parameter's shape) for ``param`` until :meth:`restore`."""
        torch = self.torch
        p = self.params.get(param)
        if p is None:
            raise QuantError(f"the Hugging Face model has no parameter {param!r} to probe")
        if tuple(p.shape) != tuple(value.shape):
            raise QuantError(f"probe of {param}: shape {value.shape} does not match {tuple(p.shape)}")
        with torch.no_grad():
            if param not in self._originals:
                self._originals[param] = p.detach().clone()
            p.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    def restore(self) -> None:
        with self.torch.no_grad():
            for param, original in self._originals.items():
                self.params[param].copy_(original)
        self._originals.clear()

    def kld(self, which: slice = slice(None)) -> float:
        """Mean KL(reference || current model) over the tokens of chunks ``which``."""
        total, n = 0.0, 0
        for chunk, ref, p in zip(self.chunks[which], self.reference[which], self.reference_p[which]):
            lp = self._log_probs(chunk)
            total += float((p * (ref - lp)).sum())
            n += ref.shape[0]
        return max(total / n, 0.0)
