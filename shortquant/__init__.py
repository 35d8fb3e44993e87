"""shortquant: pruned LLaMA-family checkpoints -> verified GGUF files."""

__version__ = "0.1.0"
