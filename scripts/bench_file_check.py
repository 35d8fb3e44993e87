"""What the check before the rename costs: `check_gguf` on finished files, structure only and with
every tensor's data through ggml_validate_row_data (what the writer runs on each .part).

    python3 scripts/bench_file_check.py gguf/*.gguf [--repeat 3]

Prints per file: bytes, seconds for the structure check, seconds with the data check, and GB/s.
The files are read through the page cache (a file just written is usually still in it, as a
.part being checked is).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shortquant.gguf_check import check_gguf


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    total_bytes = total_seconds = 0.0
    print(f"{'file':<48} {'bytes':>13} {'structure s':>12} {'+data s':>9} {'GB/s':>6}")
    for path in args.files:
        size = path.stat().st_size
        structure = best_of(args.repeat, lambda: check_gguf(path, validate_data=False))
        full = best_of(args.repeat, lambda: check_gguf(path))
        total_bytes += size
        total_seconds += full
        print(f"{path.name[:48]:<48} {size:>13,} {structure:>12.3f} {full:>9.3f} {size / full / 1e9:>6.2f}")
    print(f"{'total':<48} {int(total_bytes):>13,} {'':>12} {total_seconds:>9.3f} {total_bytes / total_seconds / 1e9:>6.2f}")


if __name__ == "__main__":
    main()
