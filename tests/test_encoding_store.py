"""The optimizer's store of encoded tensors for the writer: an unlinked file in the output folder."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from shortquant.quant.encoding_store import EncodingStore


def test_rows_come_back_as_stored_in_any_range_and_nothing_is_named_in_the_folder(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (10, 144), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 34), dtype=np.uint8)
    store = EncodingStore(tmp_path, capacity=a.nbytes + b.nbytes)
    assert store.put("a", a) and store.put("b", b)
    assert os.listdir(tmp_path) == []   # the file has no name: nothing to leave behind
    rows = store.rows("a")
    assert len(rows) == 10 and rows.shape == (10, 144)
    assert np.array_equal(rows[:], a) and np.array_equal(rows[3:7], a[3:7]) and np.array_equal(rows[9:20], a[9:])
    assert rows[5:5].shape == (0, 144)
    assert np.array_equal(store.rows("b").read(), b)
    assert store.rows("c") is None
    store.close()
    assert store.rows("a") is None


def test_a_full_store_or_a_full_disk_keeps_what_it_has_and_takes_no_more(tmp_path, monkeypatch):
    a = np.arange(64, dtype=np.uint8).reshape(4, 16)
    small = EncodingStore(tmp_path, capacity=100)
    assert small.put("a", a) and not small.put("b", a)
    assert small.rows("b") is None and np.array_equal(small.rows("a")[:], a)

    store = EncodingStore(tmp_path, capacity=1 << 20)
    assert store.put("a", a)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    assert not store.put("b", a)
    monkeypatch.undo()
    assert not store.put("c", a)   # once the disk was full, nothing more is tried
    assert np.array_equal(store.rows("a")[1:3], a[1:3]) and store.rows("b") is None


def test_no_capacity_makes_no_file_and_strided_reads_are_refused(tmp_path):
    store = EncodingStore(tmp_path, capacity=0)
    assert store.file is None and not store.put("a", np.zeros((1, 4), dtype=np.uint8))
    store = EncodingStore(tmp_path, capacity=64)
    assert store.put("a", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(IndexError):
        store.rows("a")[::2]
