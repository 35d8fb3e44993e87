#!/usr/bin/env python3
"""Benchmark ``shortquant export`` against llama.cpp's own convert + quantize pipeline.

Builds (once, cached in --out-dir) a checkpoint with LLaMA-7B shapes and --blocks blocks of
seeded random bf16 weights plus the real LLaMA tokenizer from the shared fixtures, then times,
side by side, each step as its own child process (wall time, CPU time, and peak RSS through
GNU time, or wait4 where it is missing):

  (a) shortquant export SRC --quant q4_k_m
  (b) convert_hf_to_gguf.py SRC --outtype f16, then llama-quantize F16 -> Q4_K_M
  (c) the floor: ggml's kernels alone (shortquant.ggml.quantize) over every tensor with
      the types q4_k_m picks, each tensor loaded into memory before its clock starts
  (d) a ladder q8_0 + q6_k + q4_k_m + q2_k in one export, against convert once + 4 quantizes

and prints the ratios issue 3 sets as targets, writes them to <out-dir>/bench_export.json, and
checks that (a) and (b) chose the same type for every tensor.

    python scripts/bench_export.py --out-dir /tmp/bench            # everything (~10 min, 2 cores)
    python scripts/bench_export.py --out-dir /tmp/bench --skip-llama-cpp --blocks 1   # ours only
    python scripts/bench_export.py --out-dir /tmp/bench --shape llama3-8b --skip-ladder  # BPE, 128k vocab
    python scripts/bench_export.py --out-dir /tmp/bench --shape qwen3-30b-a3b --skip-ladder --quantize-in-process

llama.cpp's tools are built the first time by scripts/llama_cpp_tools.py (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXTURES = Path(os.environ.get("SHORTQUANT_SHARED", REPO.parent / "shared")) / "fixtures"
TOKENIZER_FIXTURE = FIXTURES / "llama-tokenizer.model"
BPE_TOKENIZER_FIXTURE = FIXTURES / "tokenizers" / "llama-bpe"
QWEN2_TOKENIZER_FIXTURE = FIXTURES / "tokenizers" / "qwen2"
LADDER = ("q8_0", "q6_k", "q4_k_m", "q2_k")
LLAMA_QUANTIZE_NAMES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q4_k_m": "Q4_K_M", "q2_k": "Q2_K"}
TARGETS = {  # ratio name -> (numerator, denominator, at most)
    "(a)/(b) wall": ("a", "b", 0.85),
    "(a)/(c) wall": ("a", "c", 1.1),
    "(d) ours/pipeline wall": ("d_ours", "d_pipeline", 0.9),
    "(a)/(b) peak RSS": ("a", "b", 0.5),
}

# LLaMA-7B shapes (only the block count differs).
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048)
# Llama-3-8B shapes: a 128256-token vocabulary, so the embedding and output dominate at 2 blocks;
# GQA 32/8, llama3 rope scaling, the BPE tokenizer.json.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# SmolLM-135M shapes (scripts/bench_eval.py's model): a 49,152-token vocabulary, tied embeddings.
SMOL = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=True)
# Qwen3-30B-A3B shapes: 128 experts of width 768 per block (8 used), GQA 32/4 with head_dim 128,
# per-head Q/K norms, the Qwen2 BPE tokenizer (151,936 rows); experts one tensor each, as the hub holds them.
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
SHAPES = {"llama-7b": LLAMA_7B, "llama3-8b": LLAMA3_8B, "smol": SMOL, "qwen3-30b-a3b": QWEN3_30B_A3B}
# Issue 8's targets for the Llama-3 shape (q4_k_m against convert + llama-quantize); issue 21's
# for the Qwen3-MoE shape are the same.
LLAMA3_TARGETS = {"(a)/(b) wall": ("a", "b", 0.8), "(a)/(b) peak RSS": ("a", "b", 0.5)}


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------

def checkpoint_tensors(blocks: int, shape: dict = LLAMA_7B) -> list[tuple[str, tuple[int, ...]]]:
    """HF LLaMA tensor names and shapes, in the order transformers saves them (no ``lm_head``
    when the shape ties the embeddings)."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    if "num_experts" in shape:
        return out + moe_block_tensors(blocks, shape) + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    for i in range(blocks):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    return out if shape.get("tie_word_embeddings") else out + [("lm_head.weight", (v, h))]


def moe_block_tensors(blocks: int, shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3-MoE blocks as the hub stores them: attention with per-head norms, the router, and
    every expert's gate / up / down as its own tensor."""
    h, w, e, hd = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    out = []
    for i in range(blocks):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "mlp.gate.weight", (e, h))]
        for x in range(e):
            out += [(p + f"mlp.experts.{x}.gate_proj.weight", (w, h)), (p + f"mlp.experts.{x}.up_proj.weight", (w, h)),
                    (p + f"mlp.experts.{x}.down_proj.weight", (h, w))]
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors_bf16(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """Write random bf16 tensors straight into a safetensors file, one tensor in memory at a time.

    Matrices are N(0, 0.02) like a LLaMA init; norm weights are near 1.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            rows = shape[0] if len(shape) > 1 else 1
            step = max(1, (1 << 24) // int(np.prod(shape[1:], dtype=np.int64) or 1))
            for lo in range(0, rows, step):  # in slices: bounded memory for the 32000-row tables
                n = min(step, rows - lo) * (int(np.prod(shape[1:])) if len(shape) > 1 else shape[0])
                values = rng.standard_normal(n, dtype=np.float32)
                values = 1.0 + 0.1 * values if len(shape) == 1 else 0.02 * values
                fh.write(to_bf16_bits(values).tobytes())
    tmp.rename(path)


def build_checkpoint(folder: Path, blocks: int, seed: int = 0, shape_name: str = "llama-7b") -> Path | None:
    """The benchmark checkpoint in ``folder`` (reused when already complete); None without tokenizer."""
    shape = SHAPES[shape_name]
    moe = shape is QWEN3_30B_A3B
    bpe = shape is LLAMA3_8B or moe
    tokenizer = (QWEN2_TOKENIZER_FIXTURE if moe else BPE_TOKENIZER_FIXTURE) if bpe else TOKENIZER_FIXTURE
    if not tokenizer.exists():
        print(f"skipping: the tokenizer fixture {tokenizer} is absent (both pipelines need a vocabulary)")
        return None
    stamp = {"blocks": blocks, "seed": seed, **shape}
    if (folder / "bench_stamp.json").is_file() and json.loads((folder / "bench_stamp.json").read_text()) == stamp:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"writing a {blocks}-block {shape_name}-shaped bf16 checkpoint to {folder} ...", flush=True)
    write_safetensors_bf16(folder / "model.safetensors", checkpoint_tensors(blocks, shape), seed)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": blocks,
              "hidden_act": "silu", "initializer_range": 0.02, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
              "use_cache": True, **shape}
    if moe:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", bos_token_id=None,
                      eos_token_id=151645, pad_token_id=None)
    if bpe:
        if not moe:
            config.update(bos_token_id=128000, eos_token_id=128001, pad_token_id=None)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for f in tokenizer.iterdir():
            shutil.copyfile(f, folder / f.name)
        (folder / "bench_stamp.json").write_text(json.dumps(stamp))
        return folder
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}, indent=2))
    shutil.copyfile(TOKENIZER_FIXTURE, folder / "tokenizer.model")
    (folder / "bench_stamp.json").write_text(json.dumps(stamp))
    return folder


# ---------------------------------------------------------------------------------------------
# Measuring child processes
# ---------------------------------------------------------------------------------------------

# llama-quantize's job through llama-cpp-python (argv: F16 OUT TYPE THREADS), for --quantize-in-process
IN_PROCESS_QUANTIZE = """
import ctypes, sys, gguf, llama_cpp
L = llama_cpp.llama_cpp
params = L.llama_model_quantize_default_params()
params.ftype = int(getattr(gguf.LlamaFileType, "MOSTLY_" + sys.argv[3]))
params.nthread = int(sys.argv[4])
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""

@dataclass
class Step:
    name: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    parts: list[str] = field(default_factory=list)


GNU_TIME = Path("/usr/bin/time")


def measure(name: str, cmd: list[str], log: Path, env: dict | None = None) -> Step:
    """Run ``cmd`` and return its wall time, CPU time and peak RSS.

    Through GNU time when present: its tiny process forks the command, so the peak is the
    command's own. (``os.wait4`` on a child of *this* process is the fallback; it over-reports
    when this process has grown, since a vfork+exec child starts from the parent's high-water
    mark, and RUSAGE_CHILDREN would mix every step's peak.)
    """
    print(f"  {name}: {' '.join(map(str, cmd))}", flush=True)
    stats = log.parent / ".time.out"
    use_time = GNU_TIME.is_file()
    full = ([str(GNU_TIME), "-f", "%e %U %S %M", "-o", str(stats)] if use_time else []) + [str(c) for c in cmd]
    with open(log, "ab") as out:
        out.write(f"\n### {name}: {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with exit {proc.returncode}; see {log}")
    if use_time:
        _, user, system, max_kb = stats.read_text().split()[-4:]
        step = Step(name, wall, float(user) + float(system), int(max_kb) / 1024)
        stats.unlink()
    else:
        step = Step(name, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)
    print(f"    {step.wall_s:7.1f} s wall  {step.cpu_s:7.1f} s CPU  {step.peak_rss_mb:7.0f} MB peak RSS", flush=True)
    return step


def combine(name: str, steps: list[Step]) -> Step:
    """Steps run one after another: times add up, the peak is the largest."""
    return Step(name, sum(s.wall_s for s in steps), sum(s.cpu_s for s in steps),
                max(s.peak_rss_mb for s in steps), [s.name for s in steps])


def shortquant_export(name: str, src: Path, quants, out: Path, threads: int, log: Path, profile: Path | None = None):
    if out.exists():
        shutil.rmtree(out)
    # shortquant.cli has no __main__; call its click group the way the console script does.
    launcher = ["-c", "import sys; from shortquant.cli import main; sys.argv[0] = 'shortquant'; main()"]
    if profile:  # cProfile runs a script file, so write the same two lines into one
        script = out.parent / "_shortquant_main.py"
        script.write_text("from shortquant.cli import main\nmain()\n")
        launcher = ["-m", "cProfile", "-o", str(profile), str(script)]
    cmd = [sys.executable, *launcher, "export", str(src)]
    for q in quants:
        cmd += ["--quant", q]
    cmd += ["--out", str(out), "--quiet", "--threads", str(threads)]
    step = measure(name, cmd, log, env=dict(os.environ, PYTHONPATH=str(REPO)))
    files = {}
    for path in out.glob("*.gguf"):
        for q in quants:
            if path.name.upper().endswith(f"-{q.upper()}.GGUF"):
                files[q] = path
    return step, files


# ---------------------------------------------------------------------------------------------
# (c) the floor
# ---------------------------------------------------------------------------------------------

FLOOR_CODE = r"""
import json, sys, time
import numpy as np
from shortquant.export import make_model_plan, ExportOptions
from shortquant.stream import Piece, load_piece
from shortquant.source.checkpoint import open_checkpoint
from shortquant.ggml import quantize
from shortquant.quant.mixes import choose_types

src, quant, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
checkpoint = open_checkpoint(src)
plan = make_model_plan(checkpoint, ExportOptions(quants=(quant,), quiet=True))
hp = plan.hparams
types = choose_types([(t.name, t.shape) for t in plan.tensors], quant=quant, n_layer=hp["n_layer"],
                     n_head=hp["n_head"], n_head_kv=hp["n_head_kv"], n_expert=hp.get("n_expert", 0),
                     arch=plan.arch)
kernel, kernel_cpu, load = 0.0, 0.0, 0.0
for tensor in plan.tensors:
    rows = tensor.shape[0] if len(tensor.shape) > 1 else 1
    t0 = time.perf_counter()
    data = load_piece(checkpoint, Piece(tensor, 0, rows))     # whole tensor, f32, before the clock
    t1, c1 = time.perf_counter(), time.process_time()   # process_time: CPU of all threads
    quantize(data, types[tensor.name], None, threads)
    kernel += time.perf_counter() - t1
    kernel_cpu += time.process_time() - c1
    load += t1 - t0
    del data
open(sys.argv[4], "w").write(json.dumps({"kernel_s": kernel, "kernel_cpu_s": kernel_cpu, "load_s": load}))
"""


def kernel_floor(src: Path, quant: str, threads: int, log: Path) -> tuple[Step, dict]:
    """Time ggml's kernels alone over every tensor; returns the kernel-only time as wall."""
    result, script = log.parent / "floor.json", log.parent / "_floor.py"
    script.write_text(FLOOR_CODE)
    outer = measure("(c) ggml kernels only", [sys.executable, script, src, quant, threads, result], log,
                    env=dict(os.environ, PYTHONPATH=str(REPO)))
    numbers = json.loads(result.read_text())
    result.unlink()
    step = Step("(c) ggml kernels only", numbers["kernel_s"], numbers["kernel_cpu_s"], outer.peak_rss_mb)
    return step, {"process_wall_s": outer.wall_s, **numbers}


# ---------------------------------------------------------------------------------------------
# Type check
# ---------------------------------------------------------------------------------------------

def compare_files(ours: Path, theirs: Path) -> dict:
    """Tensor names and types of two GGUF files; bytes compared too (equal only where no f16 hop)."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    type_diff = [f"{n}: ours {a[n].tensor_type.name} llama.cpp {b[n].tensor_type.name}"
                 for n in a.keys() & b.keys() if a[n].tensor_type != b[n].tensor_type]
    same_bytes = sum(1 for n in a.keys() & b.keys() if np.array_equal(a[n].data, b[n].data))
    return {"tensors": len(a), "only_ours": sorted(a.keys() - b.keys()), "only_llama_cpp": sorted(b.keys() - a.keys()),
            "type_differences": sorted(type_diff), "byte_identical_tensors": same_bytes}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def table(steps: list[Step]) -> str:
    lines = [f"{'step':<46} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}"]
    for s in steps:
        lines.append(f"{s.name:<46} {s.wall_s:8.1f} {s.cpu_s:8.1f} {s.peak_rss_mb:12.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/shortquant-bench"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b",
                        help="llama-7b (sentencepiece, 32000 vocab), llama3-8b (BPE, 128256 vocab), smol, or "
                             "qwen3-30b-a3b (mixture of experts: 128 experts of width 768 per block)")
    parser.add_argument("--blocks", type=int, default=None, help="[default: 4 for llama-7b, 2 for llama3-8b]")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-llama-cpp", action="store_true", help="time only shortquant and the floor")
    parser.add_argument("--skip-ladder", action="store_true", help="leave out (d)")
    parser.add_argument("--quantize-in-process", action="store_true",
                        help="run llama.cpp's quantizer through llama-cpp-python's llama_model_quantize in a "
                             "child process instead of building the llama-quantize binary (the same code)")
    parser.add_argument("--profile", action="store_true", help="also run (a) under cProfile (extra run)")
    parser.add_argument("--keep-files", action="store_true",
                        help="keep the GGUF files (about 8 GB at 4 blocks); the checkpoint is always kept")
    args = parser.parse_args()

    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench_export.log"
    log.write_text("")
    args.blocks = args.blocks or (2 if args.shape in ("llama3-8b", "qwen3-30b-a3b") else 4)
    targets = LLAMA3_TARGETS if args.shape in ("llama3-8b", "qwen3-30b-a3b") else TARGETS
    src = build_checkpoint(out / f"{args.shape}-shapes-{args.blocks}blk", args.blocks, shape_name=args.shape)
    if src is None:
        return 0
    for f in src.iterdir():  # warm the page cache so no step pays the first read alone
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    print(f"checkpoint: {src}  threads: {args.threads}  load average: {os.getloadavg()[0]:.2f}", flush=True)

    steps: dict[str, Step] = {}
    extra: dict = {"load_average_start": os.getloadavg()}
    steps["a"], ours = shortquant_export("(a) shortquant export q4_k_m", src, ["q4_k_m"], out / "a", args.threads, log)

    if not args.skip_llama_cpp:
        from llama_cpp_tools import ensure_tools

        tools = ensure_tools(() if args.quantize_in_process else ("llama-quantize",))
        quantize_bin = [sys.executable, "-c", IN_PROCESS_QUANTIZE] if args.quantize_in_process \
            else [tools.binaries["llama-quantize"]]
        f16 = out / "b" / "model-f16.gguf"
        f16.parent.mkdir(exist_ok=True)
        convert = measure("(b1) convert_hf_to_gguf.py --outtype f16",
                          [sys.executable, tools.convert_script, src, "--outtype", "f16", "--outfile", f16], log,
                          env=tools.convert_env())
        quantized = {}
        pipeline_q = {}
        for q in (["q4_k_m"] + [q for q in LADDER if q != "q4_k_m"]) if not args.skip_ladder else ["q4_k_m"]:
            quantized[q] = out / "b" / f"model-{LLAMA_QUANTIZE_NAMES[q]}.gguf"
            pipeline_q[q] = measure(f"(b2) llama-quantize {LLAMA_QUANTIZE_NAMES[q]}",
                                    [*quantize_bin, f16, quantized[q], LLAMA_QUANTIZE_NAMES[q], args.threads], log)
        steps["b1"], steps["b2"] = convert, pipeline_q["q4_k_m"]
        steps["b"] = combine("(b) llama.cpp pipeline q4_k_m", [convert, pipeline_q["q4_k_m"]])

    steps["c"], extra["floor"] = kernel_floor(src, "q4_k_m", args.threads, log)

    if not args.skip_ladder:
        steps["d_ours"], _ = shortquant_export("(d) shortquant ladder " + "+".join(LADDER), src, LADDER,
                                               out / "d", args.threads, log)
        if not args.skip_llama_cpp:
            steps["d_pipeline"] = combine("(d) pipeline: convert + 4 x llama-quantize",
                                          [convert] + [pipeline_q[q] for q in LADDER])
            for q in LADDER:
                if q != "q4_k_m":
                    steps[f"b2_{q}"] = pipeline_q[q]

    if args.profile:
        prof = out / "export_q4_k_m.prof"
        shortquant_export("(a) under cProfile", src, ["q4_k_m"], out / "a_prof", args.threads, log, profile=prof)
        extra["profile"] = str(prof)

    if not args.skip_llama_cpp:  # last: reading both files grows this process, so after the timings
        extra["types_a_vs_b"] = compare_files(ours["q4_k_m"], quantized["q4_k_m"])

    if not args.keep_files:
        for folder in ("a", "a_prof", "b", "d"):
            shutil.rmtree(out / folder, ignore_errors=True)

    order = ["a", "b1", "b2", "b", "c", "d_ours"] + [f"b2_{q}" for q in LADDER if q != "q4_k_m"] + ["d_pipeline"]
    shown = [steps[k] for k in order if k in steps]
    ratios = {}
    for label, (num, den, target) in targets.items():
        if num in steps and den in steps:
            field_ = "peak_rss_mb" if "RSS" in label else "wall_s"
            value = getattr(steps[num], field_) / getattr(steps[den], field_)
            ratios[label] = {"value": round(value, 3), "target_at_most": target, "met": value <= target}
            if field_ == "wall_s":  # on a shared machine CPU seconds are the steadier comparison
                ratios[label]["cpu_value"] = round(steps[num].cpu_s / steps[den].cpu_s, 3)
    extra["load_average_end"] = os.getloadavg()

    print()
    print(table(shown))
    print()
    for label, r in ratios.items():
        cpu = f"   (CPU-time ratio {r['cpu_value']:.3f})" if "cpu_value" in r else ""
        print(f"{label:<26} {r['value']:6.3f}   target <= {r['target_at_most']}   "
              f"{'met' if r['met'] else 'MISSED'}{cpu}")
    if "types_a_vs_b" in extra:
        cmp_ = extra["types_a_vs_b"]
        diffs = cmp_["type_differences"] + [f"only ours: {n}" for n in cmp_["only_ours"]] + \
            [f"only llama.cpp: {n}" for n in cmp_["only_llama_cpp"]]
        print(f"tensor types (a) vs llama-quantize (b): {'identical' if not diffs else 'DIFFERENT'} over "
              f"{cmp_['tensors']} tensors; {cmp_['byte_identical_tensors']} byte-identical (the rest differ "
              f"where (b)'s f16 intermediate rounds tiny bf16 values into f16 subnormals)")
        for d in diffs:
            print(f"  {d}")
    floor = extra["floor"]
    print(f"floor detail: kernels {floor['kernel_s']:.1f} s wall / {floor['kernel_cpu_s']:.1f} s CPU, "
          f"loading (untimed) {floor['load_s']:.1f} s")
    result = {"checkpoint": str(src), "shape": args.shape, "blocks": args.blocks, "threads": args.threads,
              "steps": {k: asdict(v) for k, v in steps.items()}, "ratios": ratios, **extra}
    (out / "bench_export.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten: {out / 'bench_export.json'} (log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
