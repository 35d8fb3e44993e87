"""Nothing lost, nothing half-written: signals, stale partial files, concurrent exports, full disks,
files checked before they get their final name, `verify`."""

from __future__ import annotations

import resource
import signal
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from reliability_helpers import (CLI, env_without_debug, error_lines, leftovers, start_export, wait_for,
                                 write_llama_checkpoint)
from shortquant.cli import main
from shortquant.partfiles import PartLock


@pytest.fixture(scope="module")
def big_src(tmp_path_factory, small_tokenizer):
    """52 M parameters: an f32+f16+q8_0 ladder takes a few seconds, long enough to interrupt."""
    return write_llama_checkpoint(tmp_path_factory.mktemp("big") / "src", small_tokenizer[0],
                                  vocab=small_tokenizer[1])


@pytest.fixture(scope="module")
def small_src(tmp_path_factory, small_tokenizer):
    return write_llama_checkpoint(tmp_path_factory.mktemp("small") / "src", small_tokenizer[0], hidden=256,
                                  intermediate=512, layers=2, heads=4, vocab=small_tokenizer[1])


def export_cli(src, out, *args):
    return CliRunner().invoke(main, ["export", str(src), "--out", str(out), "--quiet", *args])


def one_error_line(result_or_stderr, code: int, *fragments) -> str:
    stderr = result_or_stderr if isinstance(result_or_stderr, str) else result_or_stderr.stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def any_part(out: Path) -> bool:
    return out.is_dir() and any(p.name.endswith(".gguf.part") for p in out.iterdir())


# -- signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_termination_signal_mid_ladder_leaves_nothing(tmp_path, big_src, signum, code):
    out = tmp_path / "out"
    proc = start_export(big_src, out, "f32", "f16", "q8_0", env=env_without_debug())
    wait_for(lambda: any_part(out) or proc.poll() is not None, what="the first .part file")
    assert proc.poll() is None, "export finished before it could be interrupted"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, stderr)
    one_error_line(stderr, code, f"interrupted ({signal.Signals(signum).name})", "no partial files")
    assert leftovers(out) == []


# -- stale .part files, locks, two exports at once --------------------------------------------------

def test_stale_part_of_a_killed_run_is_removed_by_the_next_run(tmp_path, big_src, small_src):
    out = tmp_path / "out"
    proc = start_export(big_src, out, "f32", "f16")
    wait_for(lambda: any_part(out) or proc.poll() is not None, what="the first .part file")
    proc.kill()            # SIGKILL: no clean-up can run
    proc.wait(timeout=60)
    stale = [p for p in out.iterdir() if p.name.endswith(".part")]
    assert stale, "SIGKILL should have left the partial files behind"

    result = export_cli(small_src, out, "-q", "q8_0")
    assert result.exit_code == 0, result.output
    for path in stale:
        assert not path.exists()
        assert f"note: removed {path}" in result.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_a_part_file_owned_by_a_running_export_is_left_alone(tmp_path, small_src):
    out = tmp_path / "out"
    out.mkdir()
    # This test process plays the export still writing Q8_0: it holds the lock on the .part.
    result = export_cli(small_src, out, "-q", "q4_0")
    q4 = next(out.glob("*-Q4_0.gguf"))
    owned = out / (q4.name.replace("Q4_0", "Q8_0") + ".part")
    lock = PartLock.acquire(owned)
    try:
        owned.write_bytes(b"being written")
        result = export_cli(small_src, out, "-q", "q4_0")
        assert result.exit_code == 0, result.output
        assert owned.read_bytes() == b"being written", "a live export's .part was touched"
        # A second export of the same file is refused in one line instead of writing into it.
        result = export_cli(small_src, out, "-q", "q8_0")
        assert result.exit_code == 2
        one_error_line(result, 2, str(owned), "another shortquant run is writing this file")
        assert owned.read_bytes() == b"being written"
    finally:
        lock.release()


def test_two_exports_into_one_folder_at_once(tmp_path, big_src):
    out = tmp_path / "out"
    out.mkdir()
    first = start_export(big_src, out, "q8_0", "f16")
    wait_for(lambda: any_part(out) or first.poll() is not None, what="the first export's .part")
    second = start_export(big_src, out, "q8_0", "q4_0")      # q8_0 collides, q4_0 does not
    third = start_export(big_src, out, "q4_1")               # nothing in common
    results = [(p.wait(timeout=300), *p.communicate()) for p in (first, second, third)]
    for code, _, stderr in results:
        # Either it succeeded, or it was refused in one line because the other run owns the file.
        assert code == 0 or (code == 2 and "another shortquant run is writing" in one_error_line(stderr, 2)), \
            (code, stderr)
    assert results[0][0] == 0 and results[2][0] == 0
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    verified = CliRunner().invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert len(list(out.glob("*.gguf"))) >= 3


# -- free space and full disks ----------------------------------------------------------------------

def test_refused_up_front_when_the_planned_files_do_not_fit(tmp_path, small_src, monkeypatch):
    import shortquant.space as space

    out = tmp_path / "out"
    asked = []

    def fake_free(folder):
        asked.append(Path(folder))
        return 1_000_000        # 1 MB: far too little for an f16 + q8_0 ladder

    monkeypatch.setattr(space, "free_bytes", fake_free)
    result = export_cli(small_src, out, "-q", "f16", "-q", "q8_0")
    assert result.exit_code == 2
    line = one_error_line(result, 2, str(out), "not enough free space", "1000000 bytes")
    needed = int(line.split("need ")[1].split(" bytes")[0])
    assert leftovers(out) == []

    # --force tries anyway; the planned size was exact: the files are exactly that big.
    result = export_cli(small_src, out, "-q", "f16", "-q", "q8_0", "--force")
    assert result.exit_code == 0, result.output
    assert sum(p.stat().st_size for p in out.glob("*.gguf")) == needed
    # Enough room: no refusal.
    monkeypatch.setattr(space, "free_bytes", lambda folder: needed)
    assert export_cli(small_src, out, "-q", "f16", "-q", "q8_0").exit_code == 0


@pytest.mark.parametrize("limit", [4096, 3_000_000])   # during the header, during the tensor data
def test_file_size_limit_mid_write_fails_cleanly(tmp_path, small_src, limit):
    out = tmp_path / "out"
    out.mkdir()

    def limit_file_size():    # RLIMIT_FSIZE: writing past it fails with EFBIG (SIGXFSZ is ignored by us)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([*CLI, "export", str(small_src), "--out", str(out), "--quiet", "-q", "f16", "-q", "q8_0",
                           "--force"], capture_output=True, text=True, preexec_fn=limit_file_size,
                          env=env_without_debug(), timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    one_error_line(proc.stderr, 2, "cannot write", "File too large")
    assert leftovers(out) == []


# -- checked before the rename ----------------------------------------------------------------------

def test_corrupted_block_is_caught_before_the_rename(tmp_path, small_src, monkeypatch):
    from shortquant.gguf_out import GGUFFileWriter

    original = GGUFFileWriter.write
    target = "blk.0.ffn_down.weight"

    def corrupting_write(self, name, data):
        if name == target and self.file_plan.tensor_types[name] == gguf.GGMLQuantizationType.Q4_0:
            data = np.array(data, copy=True)
            data.reshape(-1)[:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)   # block scale d = NaN
        return original(self, name, data)

    monkeypatch.setattr(GGUFFileWriter, "write", corrupting_write)
    out = tmp_path / "out"
    result = export_cli(small_src, out, "-q", "q8_0", "-q", "q4_0")
    assert result.exit_code == 2
    line = one_error_line(result, 2, "q4_0 failed", "failed its check", target, "invalid Q4_0 data")
    assert line.startswith("error: ")
    assert [p.name.rsplit("-", 1)[1] for p in out.glob("*.gguf")] == ["Q8_0.gguf"]
    assert leftovers(out) == [next(out.glob("*.gguf")).name]


# -- verify -----------------------------------------------------------------------------------------

def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte(tmp_path, small_src):
    out = tmp_path / "out"
    assert export_cli(small_src, out, "-q", "q8_0", "-q", "q4_0", "--card").exit_code == 0
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(out)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.count("(sha256, gguf)") == 2      # both files: card checksum and structure

    staged = tmp_path / "staged"
    assert runner.invoke(main, ["publish", str(out), "--repo", "me/m-GGUF", "--dry-run", "--staging-dir",
                                str(staged), "--quiet"]).exit_code == 0
    assert runner.invoke(main, ["verify", str(staged)]).exit_code == 0

    victim = next(out.glob("*-Q4_0.gguf"))
    flip_byte(victim, victim.stat().st_size - 1000)         # inside the last tensor's data
    bad = runner.invoke(main, ["verify", str(out)])
    assert bad.exit_code == 2
    one_error_line(bad, 2, "1 of 2 files failed verification", victim.name, "sha256 does not match")
    assert f"FAIL  {victim.name}" in bad.stdout

    # The staged copy is a hard link or a copy; either way its manifest catches a change.
    staged_file = staged / "upload" / victim.name
    if staged_file.read_bytes() != victim.read_bytes():
        flip_byte(staged_file, 100)
    bad = runner.invoke(main, ["verify", str(staged)])
    assert bad.exit_code == 2 and "sha256 does not match" in bad.stderr


def test_verify_checks_structure_and_data_without_checksums(tmp_path, small_src):
    out = tmp_path / "out"
    assert export_cli(small_src, out, "-q", "q8_0").exit_code == 0
    path = next(out.glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
    offset = int(tensor.data_offset)
    del reader
    data = bytearray(path.read_bytes())
    data[offset:offset + 2] = np.float16(np.inf).tobytes()      # the first block's scale
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 2
    one_error_line(result, 2, tensor.name, "invalid Q8_0 data")

    path.write_bytes(bytes(data[: offset + 10]))                 # truncated inside the tensor data
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 2
    one_error_line(result, 2, str(path))


# -- the moments between creating a file and owning it ---------------------------------------------

def _signal_self_after(monkeypatch, owner, attribute):
    """Make ``owner.attribute`` (a function) send SIGTERM to this process as soon as it returns:
    the signal then lands exactly between creating a file and the caller's recording it."""
    import os

    real = getattr(owner, attribute)

    def and_then_signal(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(owner, attribute, and_then_signal)


def test_signal_between_creating_and_owning_a_part_leaves_nothing(tmp_path, small_src, monkeypatch):
    """The race that once left a ``.part`` under load: the writer's PartLock.acquire had created the
    file when SIGTERM arrived, before the writer held the lock that tells it to remove the file."""
    from shortquant.export import ExportOptions, export
    from shortquant.signals import Terminated, handle_termination

    _signal_self_after(monkeypatch, PartLock, "acquire")
    out = tmp_path / "out"
    with pytest.raises(Terminated), handle_termination():
        export(small_src, ExportOptions(quants=("q8_0",), out_dir=out, quiet=True))
    assert leftovers(out) == []


def test_signal_between_creating_and_owning_split_parts_leaves_nothing(tmp_path, small_src, monkeypatch):
    from shortquant.publish.split import split_gguf
    from shortquant.signals import Terminated, handle_termination

    out = tmp_path / "out"
    assert export_cli(small_src, out, "-q", "f16").exit_code == 0
    (path,) = out.glob("*.gguf")
    _signal_self_after(monkeypatch, PartLock, "acquire")
    with pytest.raises(Terminated), handle_termination():
        split_gguf(path, 1_000_000, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [path.name]


def test_interrupted_card_leaves_no_part(tmp_path, small_src, monkeypatch):
    """A signal while README.md is being written: the old card stays whole, no README.md.part."""
    import shortquant.partfiles as partfiles

    out = tmp_path / "out"
    assert export_cli(small_src, out, "-q", "q8_0", "--card").exit_code == 0
    card = (out / "README.md").read_text()
    monkeypatch.setattr(partfiles, "open", open, raising=False)   # the builtin, seen as the module's own
    _signal_self_after(monkeypatch, partfiles, "open")   # the .part is created, not yet written
    result = CliRunner().invoke(main, ["card", str(out)])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("README")) == ["README.md"]
    assert (out / "README.md").read_text() == card


def test_free_space_check_counts_the_split_parts(tmp_path, small_src, monkeypatch):
    """``--split-max-size`` writes each large file's parts beside it before removing it: the check
    needs room for the largest such file twice, and refuses up front when that is missing."""
    import shortquant.space as space

    out = tmp_path / "out"
    assert export_cli(small_src, out / "measure", "-q", "f16", "-q", "q8_0").exit_code == 0
    sizes = sorted(p.stat().st_size for p in (out / "measure").glob("*.gguf"))
    files_only = sum(sizes)
    limit = sizes[0]                               # the q8_0 file fits: only the f16 file is split
    with_parts = files_only + space.split_reserve(sizes, limit)
    assert with_parts >= files_only + sizes[-1]

    # Room for the files alone is not enough once they are to be split.
    monkeypatch.setattr(space, "free_bytes", lambda folder: files_only)
    args = ["-q", "f16", "-q", "q8_0", "--split-max-size", str(limit)]
    result = export_cli(small_src, out / "split", *args)
    assert result.exit_code == 2
    one_error_line(result, 2, "not enough free space", f"need {with_parts} bytes")
    assert leftovers(out / "split") == []
    # With room for the parts too, it runs and splits.
    monkeypatch.setattr(space, "free_bytes", lambda folder: with_parts)
    result = export_cli(small_src, out / "split", *args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "split").iterdir())
    assert len(names) >= 3 and all("-of-0000" in n for n in names if "F16" in n), names
