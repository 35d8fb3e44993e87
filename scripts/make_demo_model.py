"""Make the embedded demo model: a small trained LLaMA, depth-pruned the Shortened-LLaMA way.

shortquant uses ``models/demo/`` when no source checkpoint is given. This script makes it from
scratch, reproducibly (fixed seeds, CPU, 2 threads):

1. tokenizer  rebuild a sentencepiece ``tokenizer.model`` from the 512-piece vocabulary that
              ``stories260K.gguf`` (llama2.c tinyllamas, MIT) embeds, and check it tokenizes like
              the GGUF does through llama-cpp-python;
2. data       sample stories from stories260K through llama-cpp-python (seeded, temperature 0.8,
              every story from BOS), cached under /tmp;
3. train      a transformers ``LlamaForCausalLM`` (hidden 256, FFN 768, 8 heads / 4 kv heads,
              8 blocks) with AdamW and a cosine schedule;
4. prune      Shortened LLaMA, PPL criterion, one shot: score every block by the held-out
              perplexity of the model without it, remove the ``--remove`` lowest-scoring blocks
              together;
5. save       the pruned model as a Hugging Face checkpoint (float16 safetensors, blocks renumbered
              0..N-1), its tokenizer files, a model card, and ``models/recipes/shortquant-demo.json``
              with the original indices of the removed blocks.

    python scripts/make_demo_model.py                      # writes models/demo/ and the recipe
    python scripts/make_demo_model.py --out /tmp/demo --recipe /tmp/demo/recipe.json

Needs torch, transformers, safetensors, sentencepiece, protobuf, gguf and llama-cpp-python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vocab_from_gguf import sentencepiece_model_from_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = REPO.parent / "shared" / "fixtures" / "stories260K.gguf"
BOS, EOS = 1, 2
PROMPT = "Once upon a time"

# Strings the rebuilt tokenizer must split exactly as llama.cpp splits them with the GGUF's vocabulary.
TOKENIZER_PROBES = [
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces",
    "a  b   c    ",
    "tabs\tand\nnewlines\n\n",
    "héllo ünïcode 日本語 🙂",
    "12345 digits 3.14",
    "<s> not special </s>",
    'Lily said, "Let\'s play!" She smiled.',
]


@dataclass(frozen=True)
class Shape:
    """The unpruned architecture."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    num_hidden_layers: int = 8
    vocab_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


def llama_config(shape: Shape, num_hidden_layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        num_hidden_layers=num_hidden_layers or shape.num_hidden_layers,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


# ---------------------------------------------------------------------------------------------
# 1. tokenizer


def build_tokenizer(gguf_path: Path):
    """The serialized tokenizer.model and a processor for it, checked against llama.cpp."""
    import sentencepiece as spm
    from llama_cpp import Llama

    proto = sentencepiece_model_from_gguf(gguf_path)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    reference = Llama(str(gguf_path), vocab_only=True, verbose=False)
    for text in TOKENIZER_PROBES:
        ours = sp.encode(text)
        theirs = reference.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if ours != theirs:
            raise SystemExit(f"tokenizer mismatch on {text!r}: {ours} vs llama.cpp {theirs}")
    return proto, sp


# ---------------------------------------------------------------------------------------------
# 2. data


def sample_stories(gguf_path: Path, count: int, seed: int, temperature: float,
                   max_tokens: int, cache_dir: Path) -> list[str]:
    """``count`` stories sampled from stories260K from BOS, each with its own seeded generator.

    Sampling is plain softmax sampling with numpy over llama.cpp's logits, so the corpus depends
    only on the seed and the logits (deterministic with one thread). Stories whose bytes are not
    valid UTF-8 (byte-fallback tokens sampled out of order) are skipped.
    """
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()[:16]
    cache = cache_dir / f"shortquant-demo-stories-{digest}-s{seed}-t{temperature}-m{max_tokens}.json"
    # Story i depends only on (seed, i), so a cache of fewer stories is extended, not redone.
    state = json.loads(cache.read_text()) if cache.exists() else {"next_index": 0, "stories": []}
    stories, index = state["stories"], state["next_index"]
    if len(stories) >= count:
        return stories[:count]

    from llama_cpp import Llama

    # logits_all keeps every position's logits in llm.scores (the default keeps none).
    llm = Llama(str(gguf_path), n_ctx=max_tokens + 8, n_batch=max_tokens + 8, n_threads=1,
                logits_all=True, verbose=False)
    skipped, started = 0, time.time()
    while len(stories) < count:
        rng = np.random.default_rng([seed, index])
        index += 1
        llm.reset()
        llm.eval([BOS])
        tokens: list[int] = []
        while len(tokens) < max_tokens:
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64) / temperature
            probs = np.exp(logits - logits.max())
            token = int(rng.choice(len(probs), p=probs / probs.sum()))
            if token in (BOS, EOS):  # stories260K ends a story with either
                break
            tokens.append(token)
            llm.eval([token])
        try:
            text = llm.detokenize(tokens).decode("utf-8").strip()
        except UnicodeDecodeError:
            skipped += 1
            continue
        if not text:
            continue
        stories.append(text)
        if len(stories) % 500 == 0:
            print(f"  sampled {len(stories)}/{count} stories ({time.time() - started:.0f} s)",
                  flush=True)
    if skipped:
        print(f"  skipped {skipped} stories that were not valid UTF-8")
    cache.write_text(json.dumps({"next_index": index, "stories": stories}))
    return stories


def token_stream(sp, stories: list[str]) -> torch.Tensor:
    """Stories as one stream of ids, each story ``<s> ... </s>``."""
    ids: list[int] = []
    for text in stories:
        ids.append(BOS)
        ids.extend(sp.encode(text))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# 3. train


def train(model, stream: torch.Tensor, *, steps: int, batch_size: int, seq_len: int, lr: float,
          warmup: int, seed: int) -> list[float]:
    """AdamW with linear warm-up and cosine decay to lr/10 over random windows of the stream."""
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses, started = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"  step {step:4d}/{steps}  loss {recent:.3f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - started:.0f} s", flush=True)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# 4. prune


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the held-out stream."""
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    for batch in windows.split(16):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def without_blocks(model, shape: Shape, removed: list[int]):
    """A new model holding every block but ``removed``, renumbered 0..N-1 (as Shortened LLaMA saves)."""
    from transformers import LlamaForCausalLM

    kept = [i for i in range(shape.num_hidden_layers) if i not in removed]
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            old = int(parts[2])
            if old in removed:
                continue
            parts[2] = str(new_index[old])
        state[".".join(parts)] = tensor
    pruned = LlamaForCausalLM(llama_config(shape, len(kept)))
    pruned.load_state_dict(state, strict=True)
    return pruned.eval()


def block_sensitivity(model, shape: Shape, heldout: torch.Tensor, seq_len: int) -> list[float]:
    """Held-out perplexity with each block removed alone: the PPL criterion of Shortened LLaMA."""
    return [perplexity(without_blocks(model, shape, [i]), heldout, seq_len)
            for i in range(shape.num_hidden_layers)]


@torch.no_grad()
def greedy(model, sp, prompt: str = PROMPT, new_tokens: int = 48) -> str:
    ids = torch.tensor([[BOS] + sp.encode(prompt)])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=EOS)
    return sp.decode(out[0, 1:].tolist())


# ---------------------------------------------------------------------------------------------
# 5. save


def tokenizer_config(shape: Shape) -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "sp_model_kwargs": {},
    }


def recipe(shape: Shape, removed: list[int], ratio: float) -> dict:
    return {
        "name": "shortquant-demo",
        "hub_id": None,
        "basename": "Shortquant-Demo",
        "finetune": "stories",
        "version": None,
        "base_model": None,
        "base_model_description": (
            f"an {shape.num_hidden_layers}-block LLaMA (hidden {shape.hidden_size}, FFN "
            f"{shape.intermediate_size}) trained by scripts/make_demo_model.py on text sampled from "
            "stories260K (karpathy/llama2.c tinyllamas, MIT), with stories260K's 512-token "
            "sentencepiece vocabulary"),
        "pruning": {
            "method": "Shortened LLaMA (PPL)",
            "unit": "block",
            "ratio": round(ratio, 4),
            "criterion": "PPL",
            "source_block_count": shape.num_hidden_layers,
            "removed_blocks": sorted(removed),
        },
        "license": "mit",
        "license_name": None,
        "license_link": None,
        "chat_template": None,
        "language": ["en"],
        "evaluation": [],
        "source": "scripts/make_demo_model.py",
        "notes": (
            "Blocks removed in one shot, the ones whose removal alone raised held-out perplexity "
            "least; no retraining after pruning. Ratio is the parameter reduction. Kept blocks are "
            "saved renumbered 0..N-1."),
    }


def model_card(report: dict) -> str:
    ppl = report["perplexity"]
    rows = "\n".join(f"| {i} | {p:.3f} |" for i, p in enumerate(ppl["without_block"]))
    return f"""---
license: mit
language: [en]
library_name: transformers
pipeline_tag: text-generation
tags: [llama, pruned, shortened-llama, demo]
---

# Shortquant-Demo (stories)

The embedded demo model of shortquant: a {report['source_blocks']}-block LLaMA trained from scratch
on {report['train_tokens']:,} tokens of stories sampled from stories260K (karpathy/llama2.c
tinyllamas, MIT), then depth-pruned the Shortened-LLaMA way (PPL criterion, one shot) to
{report['kept_blocks_count']} blocks. Blocks removed: {report['removed_blocks']} (original indices;
kept blocks are renumbered 0..{report['kept_blocks_count'] - 1}). Made by
`python scripts/make_demo_model.py`; the numbers below are that run's.

| | |
|---|---|
| parameters | {report['parameters_full']:,} before, {report['parameters_pruned']:,} after pruning |
| training | {report['steps']} steps x {report['batch_size']} x {report['seq_len']} tokens, {report['train_seconds']:.0f} s on 2 CPU threads |
| final training loss | {report['final_loss']:.3f} (mean of the last 20 steps) |
| held-out perplexity, 8 blocks | {ppl['full']:.3f} |
| held-out perplexity, pruned | {ppl['pruned']:.3f} (float32), {ppl['pruned_saved']:.3f} (as saved, float16) |

Held-out perplexity with one block removed (the PPL criterion):

| removed block | perplexity |
|---|---|
{rows}

Greedy from "{PROMPT}": {report['greedy_pruned']!r}
"""


def save(pruned, proto: bytes, shape: Shape, out: Path, card: str) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    pruned.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS)
    pruned.to(torch.float16).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.model").write_bytes(proto)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(shape), indent=2) + "\n")
    (out / "README.md").write_text(card)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python scripts/make_demo_model.py --out /tmp/demo")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="stories260K.gguf")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--recipe", type=Path,
                        default=REPO / "models" / "recipes" / "shortquant-demo.json")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stories", type=int, default=3000, help="training stories")
    parser.add_argument("--heldout-stories", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--remove", type=int, default=2, help="blocks to remove")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-unpruned", type=Path, default=None, metavar="DIR",
                        help="also save the trained model before pruning (the demo's unpruned original)")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"{args.gguf}: not found (pass --gguf)")

    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    shape = Shape()

    print("1. tokenizer from", args.gguf)
    proto, sp = build_tokenizer(args.gguf)

    print(f"2. sampling {args.stories + args.heldout_stories} stories (T={args.temperature})")
    stories = sample_stories(args.gguf, args.stories + args.heldout_stories, args.seed,
                             args.temperature, 400, args.cache_dir)
    train_stream = token_stream(sp, stories[: args.stories])
    heldout = token_stream(sp, stories[args.stories:])
    print(f"  {len(train_stream):,} training tokens, {len(heldout):,} held-out tokens")

    print(f"3. training {args.steps} steps x {args.batch_size} x {args.seq_len}")
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(shape)).eval()
    started = time.time()
    losses = train(model, train_stream, steps=args.steps, batch_size=args.batch_size,
                   seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, seed=args.seed)
    train_seconds = time.time() - started
    print(f"  trained in {train_seconds:.0f} s; greedy: {greedy(model, sp)!r}")

    print("4. pruning (PPL criterion, one shot)")
    full_ppl = perplexity(model, heldout, args.seq_len)
    without = block_sensitivity(model, shape, heldout, args.seq_len)
    for i, p in enumerate(without):
        print(f"  without block {i}: ppl {p:.3f}  (+{p - full_ppl:.3f})")
    removed = sorted(sorted(range(shape.num_hidden_layers), key=lambda i: without[i])[: args.remove])
    pruned = without_blocks(model, shape, removed)
    pruned_ppl = perplexity(pruned, heldout, args.seq_len)
    print(f"  full ppl {full_ppl:.3f}; removed {removed}: ppl {pruned_ppl:.3f}")

    params_full = sum(p.numel() for p in model.parameters())
    params_pruned = sum(p.numel() for p in pruned.parameters())
    report = {
        "source_blocks": shape.num_hidden_layers,
        "removed_blocks": removed,
        "kept_blocks_count": shape.num_hidden_layers - len(removed),
        "train_tokens": len(train_stream),
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "train_seconds": train_seconds,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "parameters_full": params_full, "parameters_pruned": params_pruned,
        "greedy_full": greedy(model, sp),
        "greedy_pruned": greedy(pruned, sp),
        "perplexity": {"full": full_ppl, "without_block": without, "pruned": pruned_ppl},
    }

    print("5. saving to", args.out)
    save(pruned, proto, shape, args.out, "")
    reloaded = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    report["perplexity"]["pruned_saved"] = perplexity(reloaded, heldout, args.seq_len)
    report["greedy_saved"] = greedy(reloaded, sp)
    (args.out / "README.md").write_text(model_card(report))
    args.recipe.parent.mkdir(parents=True, exist_ok=True)
    args.recipe.write_text(json.dumps(recipe(shape, removed, 1 - params_pruned / params_full),
                                      indent=2) + "\n")
    if args.save_unpruned:   # last: save() turns the model to float16
        print("6. saving the unpruned model to", args.save_unpruned)
        save(model, proto, shape, args.save_unpruned, f"# Shortquant-Demo, unpruned\n\nThe {shape.num_hidden_layers}-block "
             f"model the demo was pruned from (held-out perplexity {full_ppl:.3f}).\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
