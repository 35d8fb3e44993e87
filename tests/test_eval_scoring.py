"""Scoring rows in place (float32 exps, float64 sums, threads) against float64 references, and
the base log-prob cache streamed to and from disk."""

from __future__ import annotations

import numpy as np
import pytest

from shortquant.errors import EvalError
from shortquant.evaluate.kld import BaseStore, _StoreWriter, dequantize_logprobs, quantize_logprobs
from shortquant.evaluate.scoring import STEP, RowScorer

N_VOCAB = 3001  # odd, and more than one block of rows per thread below


def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((97, N_VOCAB)) * 4).astype(np.float32)
    logits[:, :5] += 12  # a few likely tokens, as a trained model has
    targets = rng.integers(0, N_VOCAB, len(logits))
    return logits, targets


@pytest.mark.parametrize("threads", [1, 3])
def test_nll_matches_float64(rows, threads):
    logits, targets = rows
    with RowScorer(threads) as scorer:
        nll = scorer.nll(logits, targets)
    ref = -log_softmax64(logits)[np.arange(len(targets)), targets]
    assert nll.dtype == np.float64 and nll.shape == (len(targets),)
    np.testing.assert_allclose(nll, ref, rtol=1e-6, atol=1e-6)


def test_base_logprobs_follow_the_grid(rows):
    logits, targets = rows
    with RowScorer(2) as scorer:
        q, top, nll, argmax = scorer.base_logprobs(logits, targets)
    lp = log_softmax64(logits)
    q_ref, top_ref = quantize_logprobs(lp)
    assert q.dtype == np.uint16 and q.shape == logits.shape
    # float32 arithmetic moves a value across a rounding boundary now and then: one level at most
    assert np.abs(q.astype(int) - q_ref.astype(int)).max() <= 1
    assert np.mean(q == q_ref) > 0.99
    assert np.array_equal(q == 0, q_ref == 0) or np.mean((q == 0) != (q_ref == 0)) < 1e-4
    np.testing.assert_allclose(top, top_ref, atol=1e-5)
    np.testing.assert_allclose(nll, -lp[np.arange(len(targets)), targets], rtol=1e-6, atol=1e-6)
    assert np.array_equal(argmax, logits.argmax(axis=1))


def test_kld_matches_float64(rows):
    logits, targets = rows
    rng = np.random.default_rng(1)
    other = logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.3
    with RowScorer(2) as scorer:
        q, top, nll_base, argmax_base = scorer.base_logprobs(logits, targets)
        kld, delta_p, same, nll = scorer.kld(other, targets, q, top, nll_base, argmax_base)
        self_kld = scorer.kld(logits, targets, q, top, nll_base, argmax_base)[0]
    lp_base, kept = dequantize_logprobs(q, top)
    lp = log_softmax64(other)
    ref = (np.where(kept, np.exp(lp_base), 0) * np.where(kept, lp_base - lp, 0)).sum(axis=1)
    np.testing.assert_allclose(kld, ref, rtol=1e-4, atol=2e-7)
    assert kld.mean() > 0.01
    assert np.abs(self_kld).max() < 1e-4  # only the grid's rounding
    np.testing.assert_allclose(nll, -lp[np.arange(len(targets)), targets], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(delta_p, np.exp(-nll) - np.exp(-nll_base), atol=1e-12)
    assert np.array_equal(same, other.argmax(1) == logits.argmax(1))


def test_rows_below_the_window_are_left_out():
    logits = np.zeros((2, 8), np.float32)
    logits[:, 0] = 40.0  # everything else is 40 nats down: below the 20-nat window
    q, top, _, _ = RowScorer(1).base_logprobs(logits, np.zeros(2, int))
    assert q[:, 0].tolist() == [65535, 65535] and (q[:, 1:] == 0).all()
    kld = RowScorer(1).kld(logits, np.zeros(2, int), q, top, np.zeros(2), np.zeros(2, int))[0]
    assert np.abs(kld).max() < STEP


def _write_store(folder, chunks, logits_per_chunk, n_vocab):
    writer = _StoreWriter(folder, chunks, n_vocab, {"base": "test", "kind": "gguf"})
    with RowScorer(2) as scorer:
        for index, (chunk, logits) in enumerate(zip(chunks, logits_per_chunk)):
            writer.put(index, logits, chunk[chunks.shape[1] // 2 + 1:], scorer)
    return writer.finish()


def test_cache_written_by_one_run_is_read_back_identically_by_the_next(tmp_path):
    ctx, n_vocab = 16, 700
    rows = ctx - ctx // 2 - 1
    rng = np.random.default_rng(2)
    chunks = rng.integers(0, n_vocab, (5, ctx)).astype(np.int32)
    logits = [(rng.standard_normal((rows, n_vocab)) * 5).astype(np.float32) for _ in chunks]
    folder = _write_store(tmp_path / "base", chunks, logits, n_vocab)
    expected = [RowScorer(1).base_logprobs(lg, c[ctx // 2 + 1:]) for lg, c in zip(logits, chunks)]
    for _run in range(2):  # two readers, as two eval runs open the same cache
        store = BaseStore(folder)
        store.check_compatible(chunks, n_vocab, "x.gguf")
        for index in (3, 0, 4, 1, 2):  # any order
            q, top, nll, argmax = store.chunk(index)
            assert np.array_equal(q, expected[index][0])
            assert np.array_equal(top, expected[index][1]) and np.array_equal(nll, expected[index][2])
            assert np.array_equal(argmax, expected[index][3])
        store.close()
    # plain .npy files: numpy reads the whole q.npy the same
    whole = np.load(folder / "q.npy")
    assert np.array_equal(whole, np.concatenate([e[0] for e in expected]))


def test_damaged_cache_is_one_line(tmp_path):
    ctx, n_vocab = 16, 50
    chunks = np.arange(2 * ctx, dtype=np.int32).reshape(2, ctx) % n_vocab
    logits = [np.zeros((ctx - ctx // 2 - 1, n_vocab), np.float32) for _ in chunks]
    folder = _write_store(tmp_path / "base", chunks, logits, n_vocab)
    data = (folder / "q.npy").read_bytes()
    (folder / "q.npy").write_bytes(data[:-100])
    with pytest.raises(EvalError, match="damaged base-logits cache") as info:
        BaseStore(folder)
    assert "\n" not in str(info.value)
    (folder / "top.npy").write_bytes(b"junk")
    with pytest.raises(EvalError, match="damaged base-logits cache"):
        BaseStore(folder)


def test_chunks_are_written_in_order(tmp_path):
    chunks = np.zeros((2, 16), np.int32)
    writer = _StoreWriter(tmp_path / "b", chunks, 20, {})
    with pytest.raises(ValueError, match="out of order"):
        writer.put(1, np.zeros((7, 20), np.float32), np.zeros(7, int))
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_unwritable_cache_folder_is_one_line(tmp_path):
    from shortquant.evaluate.kld import _write_store

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    chunks = np.zeros((2, 16), np.int32)
    with pytest.raises(EvalError, match="cannot write the base-logits cache") as info:
        _write_store(blocker / "cache" / "key", chunks, 20, {}, iter([]), None, "base.gguf", RowScorer(1))
    assert "\n" not in str(info.value)
