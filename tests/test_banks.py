"""romac/backend/banks.py: runs staged per bank and written in place give exactly the images an in-memory model of
them holds, and the digests computed while writing are the files' sha256 (or absent for a bank written out of
order, which the emitter then hashes from its file)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from romac.backend.banks import BankWriter, make_runs, run_order, tile_runs

BANKS, BANK_BYTES = 5, 300_000


def _writer(tmp_path) -> BankWriter:
    return BankWriter(tmp_path, SimpleNamespace(banks=BANKS, bank_bytes=BANK_BYTES))


def _check(tmp_path, w: BankWriter, want: np.ndarray, out_of_order: set[int]) -> None:
    w.flush()
    digests = w.digests()
    w.close()
    for b, name in enumerate(w.names):
        data = (tmp_path / name).read_bytes()
        assert data == want[b].tobytes(), f"bank {b}"
        if b in out_of_order:
            assert name not in digests
        else:
            assert digests[name] == hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["disk", "no O_DIRECT", "tmpfs"])
def root(request, tmp_path, monkeypatch):
    """Where the images go: a file system with O_DIRECT, the same without it, tmpfs (which refuses it)."""
    if request.param == "no O_DIRECT":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    if request.param == "tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        d = Path(tempfile.mkdtemp(dir="/dev/shm"))
        yield d
        shutil.rmtree(d)
        return
    yield tmp_path


@pytest.mark.parametrize("seed", range(4))
def test_sequential_runs_with_gaps_and_big_ones(root, seed):
    tmp_path = root
    rng = np.random.default_rng(seed)
    w, want = _writer(tmp_path), np.zeros((BANKS, BANK_BYTES), np.uint8)
    pos = np.zeros(BANKS, np.int64)
    while True:  # jobs of runs: mostly continuing each bank, some gaps, some runs bigger than a staging row
        n = int(rng.integers(1, 12))
        bank = rng.integers(0, BANKS, n)
        sizes = rng.choice([8, 100, 3000, 70_000, 150_000], n, p=[0.3, 0.3, 0.3, 0.07, 0.03])
        gaps = np.where(rng.random(n) < 0.1, rng.choice([1, 4000, 40_000], n), 0)  # small, within a page, big
        offsets = np.empty(n, np.int64)
        for k in range(n):  # each bank's runs in order within the job, as the emitter's sort gives them
            offsets[k] = pos[bank[k]] + gaps[k]
            pos[bank[k]] = offsets[k] + sizes[k]
        if pos.max() > BANK_BYTES:
            break
        tiles = [rng.integers(0, 256, s, dtype=np.uint8) for s in sizes]
        for b, o, t in zip(bank, offsets, tiles):
            want[b, o:o + t.size] = t
        w.write_runs(tile_runs(tiles, bank, offsets))
    _check(tmp_path, w, want, set())


def test_a_bank_written_out_of_order_is_left_to_its_file(root):
    tmp_path = root
    w, want = _writer(tmp_path), np.zeros((BANKS, BANK_BYTES), np.uint8)
    for b, o, size in [(0, 1000, 500), (1, 0, 10), (0, 10, 100), (0, 2000, 70_000), (2, 5, 5)]:
        t = np.full(size, b + 7, np.uint8)
        want[b, o:o + size] = t
        w.write_runs(tile_runs([t], np.array([b]), np.array([o])))
        w.flush()  # the out-of-order write reaches the file after the first one
    _check(tmp_path, w, want, {0})


def test_runs_of_a_buffer_in_bank_order():
    bank, offset = np.array([1, 0, 1, 0, 1]), np.array([0, 0, 8, 8, 20])
    sizes = np.array([8, 8, 8, 4, 4])
    order, at = run_order(bank, offset, sizes)
    assert order.tolist() == [1, 3, 0, 2, 4] and at.tolist() == [12, 0, 20, 8, 28]
    runs = make_runs(np.arange(32, dtype=np.uint8), bank, offset, sizes, order)
    # bank 0: tiles at 0 and 8 join; bank 1: 0 and 8 join, 20 is after a gap
    assert runs.bank.tolist() == [0, 1, 1] and runs.offset.tolist() == [0, 0, 20]
    assert runs.start.tolist() == [0, 12, 28] and runs.stop.tolist() == [12, 28, 32]
