"""Seeded, time-bounded fuzzing of every reader of user input.

Each target starts from a valid input (a tiny checkpoint, its tokenizers, GGUF files) and runs
a public entry point on mutated copies: bytes flipped, integers set to extremes, files cut
short, JSON values swapped for wrong types and out-of-range numbers. Every case must end in
success or a ``ShortquantError`` (exit code 2, a one-line message): anything else (another
exception, a hang, a crash, an allocation a size field asked for) is a defect. Memory is capped
with RLIMIT_AS a few GB above what the process uses after setup, so a header that claims 2^40
bytes and is believed shows up as a MemoryError.

    python3 tests/fuzz_readers.py --seconds 60 --seed 0 --json fuzz.json
    python3 tests/fuzz_readers.py --target config-json --case 17 --seed 0     # replay one case

Run in a subprocess by tests/test_fuzz.py; a crash then names the case it died in (the
``--progress`` file holds the case being run).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO_TOKENIZER = REPO / "models" / "demo" / "tokenizer.model"
CASE_SECONDS = 20          # a case running longer than this is a hang
MEMORY_HEADROOM = 3 << 30  # bytes of address space allowed beyond the post-setup footprint

INTERESTING_INTS = [0, 1, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1,
                    2**64 - 1]
INTERESTING_JSON = [None, True, False, 0, -1, 1, 3, 2**31, 2**53 + 1, 2**63, 2**64 + 5, -(2**63), 1e308, -1e308,
                    0.5, float("nan"), float("inf"), "", "x", "../../etc/passwd", "/tmp", "model.safetensors",
                    "F16", "BF16", "I64", [], [1, 2], [-1], [2**40, 2**40], {}, {"a": 1}, "\u0000", "é" * 3]


class FuzzTimeout(BaseException):
    """Raised by the alarm in a case that runs too long (a BaseException: no handler swallows it)."""


# -- mutators ------------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random, protect: int = 0) -> bytes:
    """One to four byte-level changes, none in the first ``protect`` bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if len(buf) <= protect + 8:
            break
        kind = rng.random()
        pos = rng.randrange(protect, len(buf))
        if kind < 0.35:
            for _ in range(rng.randint(1, 8)):
                p = rng.randrange(protect, len(buf))
                buf[p] ^= 1 << rng.randrange(8)
        elif kind < 0.55:
            value = rng.choice(INTERESTING_INTS)
            width = rng.choice((4, 8))
            if pos + width <= len(buf):
                buf[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif kind < 0.7:
            del buf[pos:]                                   # truncated
        elif kind < 0.8:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif kind < 0.9:
            end = min(len(buf), pos + rng.randint(1, 512))
            buf[pos:end] = bytes(end - pos)                 # zeroed
        else:
            buf[pos:pos + 1] = bytes([rng.choice((0x00, 0x7F, 0x80, 0xFF))])
    return bytes(buf)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list) and len(value) < 64:
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def mutate_json(value, rng: random.Random):
    """A copy of ``value`` with one to three values replaced, removed or re-typed."""
    import copy

    value = copy.deepcopy(value)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(value) if p]
        if not paths:
            return rng.choice(INTERESTING_JSON)
        path = rng.choice(paths)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        kind = rng.random()
        if kind < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif kind < 0.25 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] * rng.choice((-1, 0, 2**20, 2**40))
        elif kind < 0.35 and isinstance(parent[key], str):
            parent[key] = parent[key][: rng.randint(0, len(parent[key]))] + rng.choice(["", "\u0000", "/../x", "Ω"])
        elif kind < 0.42 and isinstance(parent[key], list) and parent[key]:
            parent[key] = parent[key] * rng.choice((0, 2)) if rng.random() < 0.5 else parent[key][::-1]
        else:
            parent[key] = rng.choice(INTERESTING_JSON)
    return value


def dump_json(value, rng: random.Random) -> bytes:
    text = json.dumps(value, allow_nan=True)
    return text.encode() if rng.random() < 0.9 else mutate_bytes(text.encode(), rng)


# -- seed inputs ---------------------------------------------------------------------------------

def tiny_state(rng: np.random.Generator, vocab: int = 512, hidden: int = 64, layers: int = 2) -> dict:
    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "lm_head.weight": w(vocab, hidden),
               "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 2, hidden)),
                            ("self_attn.v_proj", (hidden // 2, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (128, hidden)), ("mlp.up_proj", (128, hidden)),
                            ("mlp.down_proj", (hidden, 128))):
            tensors[p + name + ".weight"] = w(*shape)
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, np.float16)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float16)
    return tensors


def tiny_config(vocab: int = 512, hidden: int = 64, layers: int = 2) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "rope_scaling": None, "torch_dtype": "float16"}


def write_checkpoint(folder: Path, layout: str, state: dict, config: dict, tokenizer: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(tokenizer, folder / "tokenizer.model")
    if layout == "single":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        weight_map = {}
        for shard, keys in halves.items():
            save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "bin":
        import torch

        torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, folder / "pytorch_model.bin")
    return folder


def make_bpe_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE ``tokenizer.json`` trained on the demo text (GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (REPO / "shortquant" / "evaluate" / "data" / "eval_text.txt").read_text(encoding="utf-8")[:20000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return folder


# -- targets -------------------------------------------------------------------------------------

class Targets:
    """Seeds built once; ``run(target, case_dir, rng)`` makes one mutated input and reads it."""

    def __init__(self, work: Path, seed: int):
        from shortquant.export import ExportOptions, export
        from shortquant.quant.imatrix import Imatrix, write_imatrix

        self.work = work
        rng = np.random.default_rng(seed)
        state = tiny_state(rng)
        config = tiny_config()
        tokenizer = DEMO_TOKENIZER
        self.seed_dirs = {layout: write_checkpoint(work / "seed" / layout, layout, state, config, tokenizer)
                          for layout in ("single", "sharded", "bin")}
        out = work / "seed" / "gguf"
        report = export(self.seed_dirs["single"], ExportOptions(quants=("q8_0", "q4_k_m"), out_dir=out, quiet=True))
        self.gguf_files = [f.path for f in report.files]
        sums = {name: np.abs(rng.standard_normal((1, 64), dtype=np.float32)) for name in
                ("blk.0.attn_q.weight", "blk.0.ffn_down.weight")}
        self.imatrix = work / "seed" / "imatrix.gguf"
        write_imatrix(self.imatrix, Imatrix(sums=sums, counts={k: np.ones(1, np.float32) for k in sums},
                                            datasets=["fuzz"], chunk_count=1, chunk_size=64))
        self.bpe_dir = make_bpe_tokenizer(work / "seed" / "bpe")
        self.bpe_pre = self._bpe_pre()
        self.export, self.ExportOptions = export, ExportOptions

    def _bpe_pre(self) -> str | None:
        """A pre-tokenizer name that lets the seed BPE tokenizer read, or None (no BPE reader yet)."""
        from shortquant.tokenizer import read_tokenizer
        from shortquant.errors import ShortquantError

        try:
            import inspect

            if "pre" not in inspect.signature(read_tokenizer).parameters:
                return None
            read_tokenizer(self.bpe_dir, pre="gpt-2")
            return "gpt-2"
        except ShortquantError:
            return None

    @property
    def names(self) -> list[str]:
        names = ["safetensors-header", "safetensors-data", "index-json", "bin-zip", "config-json",
                 "tokenizer-model", "gguf-verify", "gguf-imatrix", "gguf-split", "gguf-eval"]
        if self.bpe_pre is not None:
            names.insert(6, "tokenizer-json")
        return names

    def _copy_checkpoint(self, layout: str, case: Path) -> Path:
        folder = case / "ckpt"
        folder.mkdir(parents=True)
        for path in self.seed_dirs[layout].iterdir():
            shutil.copy(path, folder / path.name)
        return folder

    def _export(self, folder: Path, case: Path) -> None:
        self.export(folder, self.ExportOptions(quants=("q8_0",), out_dir=case / "out", quiet=True, threads=1))

    def run(self, target: str, case: Path, rng: random.Random) -> None:
        getattr(self, "t_" + target.replace("-", "_"))(case, rng)

    # checkpoints -------------------------------------------------------------------------------
    def t_safetensors_header(self, case, rng):
        folder = self._copy_checkpoint("single", case)
        path = folder / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header, body = json.loads(data[8:8 + n]), data[8 + n:]
        if rng.random() < 0.75:
            raw = dump_json(mutate_json(header, rng), rng)
            length = len(raw) if rng.random() < 0.85 else rng.choice(INTERESTING_INTS)
            path.write_bytes(struct.pack("<Q", length % 2**64) + raw + body)
        else:
            path.write_bytes(mutate_bytes(data[:8 + n], rng) + body)
        self._export(folder, case)

    def t_safetensors_data(self, case, rng):
        folder = self._copy_checkpoint("single", case)
        path = folder / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        path.write_bytes(mutate_bytes(data, rng, protect=8 + n))
        self._export(folder, case)

    def t_index_json(self, case, rng):
        folder = self._copy_checkpoint("sharded", case)
        index = folder / "model.safetensors.index.json"
        index.write_bytes(dump_json(mutate_json(json.loads(index.read_text()), rng), rng))
        self._export(folder, case)

    def t_bin_zip(self, case, rng):
        folder = self._copy_checkpoint("bin", case)
        path = folder / "pytorch_model.bin"
        data = path.read_bytes()
        if rng.random() < 0.5:   # the pickle and zip directory live at the ends; aim there too
            head = rng.choice((0, max(0, len(data) - 4096)))
            cut = data[head:head + 4096]
            data = data[:head] + mutate_bytes(cut, rng)[:len(cut)].ljust(len(cut), b"\0") + data[head + 4096:]
        else:
            data = mutate_bytes(data, rng)
        path.write_bytes(data)
        self._export(folder, case)

    def t_config_json(self, case, rng):
        folder = self._copy_checkpoint("single", case)
        config = folder / "config.json"
        config.write_bytes(dump_json(mutate_json(json.loads(config.read_text()), rng), rng))
        self._export(folder, case)

    # tokenizers --------------------------------------------------------------------------------
    def t_tokenizer_model(self, case, rng):
        from shortquant.tokenizer import read_tokenizer

        folder = case / "tok"
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(mutate_bytes(DEMO_TOKENIZER.read_bytes(), rng))
        read_tokenizer(folder, vocab_size=512)

    def t_tokenizer_json(self, case, rng):
        # Hook for BPE readers: only present when read_tokenizer reads tokenizer.json (see names).
        from shortquant.tokenizer import read_tokenizer

        folder = case / "tok"
        shutil.copytree(self.bpe_dir, folder)
        path = folder / ("tokenizer.json" if rng.random() < 0.85 else "tokenizer_config.json")
        path.write_bytes(dump_json(mutate_json(json.loads(path.read_text()), rng), rng))
        read_tokenizer(folder, pre=self.bpe_pre if rng.random() < 0.7 else None,
                       vocab_size=rng.choice((None, 400, 512)))

    # GGUF inputs -------------------------------------------------------------------------------
    def _mutated_gguf(self, case, rng, source: Path) -> Path:
        path = case / source.name
        data = source.read_bytes()
        # Most of a GGUF is tensor data; aim most changes at the header and tensor infos.
        head = min(len(data), 4096 if rng.random() < 0.7 else len(data))
        path.write_bytes(mutate_bytes(data[:head], rng, protect=4 if rng.random() < 0.8 else 0) + data[head:])
        return path

    def t_gguf_verify(self, case, rng):
        from shortquant.publish.verify import raise_if_failed, verify

        path = self._mutated_gguf(case, rng, rng.choice(self.gguf_files))
        raise_if_failed(verify(path), path)

    def t_gguf_imatrix(self, case, rng):
        from shortquant.quant.imatrix import read_imatrix

        read_imatrix(self._mutated_gguf(case, rng, self.imatrix))

    def t_gguf_split(self, case, rng):
        from shortquant.publish.split import split_gguf

        split_gguf(self._mutated_gguf(case, rng, rng.choice(self.gguf_files)), 200_000, outdir=case / "parts",
                   progress=False)

    def t_gguf_eval(self, case, rng):
        from shortquant.evaluate.llama_backend import LlamaModel

        path = self._mutated_gguf(case, rng, rng.choice(self.gguf_files))
        with LlamaModel(path, n_ctx=16, vocab_only=True) as model:
            model.tokenize("Once upon a time")


# -- the run -------------------------------------------------------------------------------------

def _on_alarm(signum, frame):
    raise FuzzTimeout()


def run_case(targets: Targets, target: str, seed: int, index: int, work: Path) -> tuple[str, dict | None]:
    """Run one case: ("ok" | "error", None) when it ended as it should, else ("defect", what)."""
    from shortquant.errors import ShortquantError

    rng = random.Random(f"{seed}:{target}:{index}")
    case = work / f"{target}-{index}"
    case.mkdir(parents=True)
    signal.alarm(CASE_SECONDS)
    try:
        targets.run(target, case, rng)
        return "ok", None
    except ShortquantError as exc:
        message = f"error: {exc}"
        if "\n" in message or exc.exit_code != 2:
            return "defect", {"target": target, "case": index, "kind": "bad error message",
                              "detail": f"exit code {exc.exit_code}: {message[:300]!r}"}
        return "error", None
    except FuzzTimeout:
        return "defect", {"target": target, "case": index, "kind": "hang", "detail": f"over {CASE_SECONDS} s"}
    except BaseException as exc:   # noqa: BLE001 - every escape is the defect we look for
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                      if "shortquant" in f.filename), frames[-1].filename if frames else "?")
        return "defect", {"target": target, "case": index, "kind": type(exc).__name__,
                          "detail": f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''} (at {where})"}
    finally:
        signal.alarm(0)
        shutil.rmtree(case, ignore_errors=True)


def _cap_memory() -> None:
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stop starting cases after this long")
    parser.add_argument("--max-cases", type=int, default=100000, help="at most this many cases per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", help="only these targets (comma-separated)")
    parser.add_argument("--exclude", default="", help="not these targets (comma-separated)")
    parser.add_argument("--case", type=int, help="only this case number (replay)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--progress", type=Path, help="file naming the case being run (for crashes)")
    args = parser.parse_args(argv)

    import logging

    logging.disable(logging.CRITICAL)   # readers log warnings about the inputs we break on purpose
    signal.signal(signal.SIGALRM, _on_alarm)
    with tempfile.TemporaryDirectory(prefix="shortquant-fuzz-") as tmp:
        work = Path(tmp)
        setup_start = time.monotonic()
        targets = Targets(work, args.seed)
        names = args.target.split(",") if args.target else targets.names
        names = [n for n in names if n in targets.names and n not in args.exclude.split(",")]
        # Warm up the lazily loaded libraries (ggml, llama.cpp) before capping memory.
        for name in names:
            run_case(targets, name, args.seed, -1, work / "warm")
        _cap_memory()
        setup_seconds = time.monotonic() - setup_start

        outcomes = {name: {"ok": 0, "error": 0, "defect": 0} for name in names}
        defects = []
        start = time.monotonic()
        index = 0
        while time.monotonic() - start < args.seconds and index < args.max_cases:
            for name in names:
                number = args.case if args.case is not None else index
                if args.progress:
                    args.progress.write_text(json.dumps({"target": name, "case": number, "seed": args.seed}))
                status, defect = run_case(targets, name, args.seed, number, work / "cases")
                outcomes[name][status] += 1
                if defect:
                    defects.append(defect)
            index += 1
            if args.case is not None:
                break
    report = {"seed": args.seed, "seconds": round(time.monotonic() - start, 1), "setup_seconds": round(setup_seconds, 1),
              "cases": outcomes, "total_cases": sum(sum(o.values()) for o in outcomes.values()), "defects": defects,
              "bpe_reader": targets.bpe_pre is not None}
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
