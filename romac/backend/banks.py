"""The bank images as the emitter fills them: files written in place, gathered writes, and each image's sha256
computed while its bytes go out.

A job's tiles reach the writer as *runs*: one buffer holding the tiles in (bank, offset) order, and for each run of
tiles that follow each other in one bank, its place and its slice of the buffer. Round-robin placement gives every
bank a tile or two of each row chunk, so the writer sees about one run per bank per chunk, which a native loop
stages per bank: nothing loops over tiles, or runs, in Python (on the 8B the loop over tiles alone cost more CPU
than the quantizer).

The manifest needs the sha256 of every 10 MiB image. Each bank's bytes are written in increasing offsets (the plan
places a region's tiles in a bank one after another, and regions are emitted in order), so the digest is updated
as each gathered write goes out, with the zeros between writes and after the last one; the images are not read
back. A bank written out of order (no plan does this today) is simply hashed from its file afterwards.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from romac.spec.manifest import bank_file
from romac.targets import Target

_ZEROS = bytes(1 << 20)  # hashed for the unwritten (zero) stretches of an image
PAGE = 4096  # O_DIRECT writes whole, aligned pages (of the device's block size or less; a page is safe)
_ROW = 1 << 18  # a bank's staging row
_GAP = 1 << 15  # a gap up to this is staged as zeros; the row fits BUFFER + _GAP + _PIECE + a page
_PIECE = 1 << 16  # runs are staged in pieces of at most this


@dataclass(frozen=True)
class Runs:
    """Tiles in (bank, offset) order in ``data``; run k is ``data[start[k]:stop[k]]`` at ``offset[k]`` in ``bank[k]``."""

    data: np.ndarray
    bank: np.ndarray
    offset: np.ndarray
    start: np.ndarray
    stop: np.ndarray


def run_order(bank: np.ndarray, offset: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order of the tiles by bank and offset, byte position of every tile in a buffer laid out in that order)."""
    order = np.lexsort((offset, bank))
    at = np.empty(len(order), np.int64)
    s = sizes[order]
    at[order] = np.cumsum(s) - s
    return order, at


def make_runs(data: np.ndarray, bank: np.ndarray, offset: np.ndarray, sizes: np.ndarray, order: np.ndarray) -> Runs:
    """The runs of a buffer whose tiles (bank, offset, sizes per tile) lie back to back in ``order``."""
    b, o, s = bank[order], offset[order], sizes[order]
    pos = np.cumsum(s) - s
    new = np.ones(len(order), bool)
    new[1:] = (b[1:] != b[:-1]) | (o[1:] != o[:-1] + s[:-1])  # another bank, or a gap in the same bank
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(order)) - 1
    return Runs(data, b[first], o[first], pos[first], pos[last] + s[last])


def tile_runs(tiles: list[np.ndarray], bank: np.ndarray, offset: np.ndarray) -> Runs:
    """The runs of separately packed tiles (the numpy path: :func:`romac.codecs.tiles.pack_tiles`)."""
    sizes = np.array([t.size for t in tiles], np.int64)
    order = np.lexsort((offset, bank))
    data = np.concatenate([tiles[k] for k in order.tolist()]) if tiles else np.zeros(0, np.uint8)
    return make_runs(data, bank, offset, sizes, order)


@njit(cache=True, nogil=True)
def _stage(data: np.ndarray, bank: np.ndarray, offset: np.ndarray, start: np.ndarray, stop: np.ndarray,
           staging: np.ndarray, fill: np.ndarray, end: np.ndarray) -> int:
    """Append runs to their bank's staging row; returns the index of the first run it cannot take (the caller
    makes room, or writes it another way, and calls again), or the number of runs.

    A bank's row holds its bytes from the page-aligned offset ``end - fill`` to ``end``. A run that starts a little
    after ``end`` (a gap of under ``_GAP``, zeros in the image) is staged after that many zeros; the first run of a
    bank (``end`` = -1) after the zeros from the start of its page. Out of order (``end`` = -2 or an earlier
    offset), a big gap, or no room: the caller's.
    """
    for k in range(bank.size):
        b, n = bank[k], stop[k] - start[k]
        if end[b] == -1:
            end[b] = offset[k] - offset[k] % PAGE
        gap = offset[k] - end[b]
        if end[b] < 0 or gap < 0 or gap >= _GAP or fill[b] + gap + n > staging.shape[1]:
            return k
        staging[b, fill[b]:fill[b] + gap] = 0
        staging[b, fill[b] + gap:fill[b] + gap + n] = data[start[k]:stop[k]]
        fill[b] += gap + n
        end[b] += gap + n
    return bank.size


def _pieces(runs: Runs) -> Runs:
    """The same runs, each cut into pieces of at most ``_PIECE`` bytes."""
    counts = -(-(runs.stop - runs.start) // _PIECE)
    k = np.repeat(np.arange(len(counts)), counts)
    step = (np.arange(len(k)) - np.repeat(np.cumsum(counts) - counts, counts)) * _PIECE
    start = runs.start[k] + step
    return Runs(runs.data, runs.bank[k], runs.offset[k] + step, start, np.minimum(start + _PIECE, runs.stop[k]))


class BankWriter:
    """Open bank images, written in place (sparse until filled), each hashed as it is written.

    Writes are gathered per bank in a staging row (a native loop copies a job's runs there: a Python loop over the
    8B's 400,000 runs cost two CPU seconds) and go out as whole pages with ``O_DIRECT`` once ``BUFFER`` bytes are
    staged, the partial last page staying staged: buffered writes of 2 GiB of new pages cost 2-3 CPU seconds here
    (each page allocated, and first reclaimed from other processes' cache); direct ones a tenth of that. Where
    ``O_DIRECT`` is refused the same pages are written buffered. A bank's last partial page, and every write of a
    bank written out of order, go out buffered. Call :meth:`flush` before reading an image back.
    """

    BUFFER = 1 << 17

    def __init__(self, root: Path, target: Target) -> None:
        self.bank_bytes = target.bank_bytes
        self.names = [bank_file(b, target.banks) for b in range(target.banks)]
        rows = _ROW * target.banks
        self._mem = mmap.mmap(-1, max(rows, PAGE))  # page-aligned, as O_DIRECT wants the source buffer
        self.staging = np.frombuffer(self._mem, np.uint8, rows).reshape(target.banks, _ROW)
        self.fill = np.zeros(target.banks, np.int64)  # bytes staged per bank
        self.end = np.full(target.banks, -1, np.int64)  # the offset where a bank's staged bytes end (-1, -2: above)
        self.hashers: list = [hashlib.sha256() for _ in range(target.banks)]
        self.hashed = [0] * target.banks  # bytes of the image hashed so far; -1: written out of order
        self.fds, self.direct = [], [None] * target.banks  # buffered and (opened on first use) O_DIRECT descriptors
        self.paths = [root / name for name in self.names]
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            os.ftruncate(fd, target.bank_bytes)
            self.fds.append(fd)

    def write_runs(self, runs: Runs) -> None:
        big = runs.stop - runs.start > _PIECE
        if big.any():  # cut big runs into pieces that always fit a row once its whole pages are out
            runs = _pieces(runs)
        k, n = 0, len(runs.bank)
        while k < n:
            k += _stage(runs.data, runs.bank[k:], runs.offset[k:], runs.start[k:], runs.stop[k:], self.staging,
                        self.fill, self.end)
            if k == n:
                break
            b, o = int(runs.bank[k]), int(runs.offset[k])
            if self.end[b] == -2 or o < self.end[b]:  # out of order: this bank is written as it comes from now on
                self._flush(b, whole=True)
                self.end[b] = -2
                self._write(b, o, runs.data[runs.start[k]:runs.stop[k]])
                k += 1
            elif o - self.end[b] >= _GAP:  # a big gap: the bank starts afresh (its next page is untouched)
                self._flush(b, whole=True)
                self.end[b] = -1
            else:
                self._flush(b, whole=False)
        for b in np.flatnonzero(self.fill >= self.BUFFER).tolist():
            self._flush(b, whole=False)

    def _flush(self, bank: int, whole: bool) -> None:
        """Write the bank's staged whole pages (directly), and with ``whole`` its partial last page (buffered)."""
        n = int(self.fill[bank])
        start = int(self.end[bank]) - n
        pages = n - n % PAGE
        if pages:
            self._write(bank, start, self.staging[bank, :pages], direct=True)
        tail = n - pages
        if whole and tail:
            self._write(bank, start + pages, self.staging[bank, pages:n])
            tail = 0
        self.staging[bank, :tail] = self.staging[bank, pages:pages + tail]
        self.fill[bank] = tail

    def _write(self, bank: int, start: int, data: np.ndarray, direct: bool = False) -> None:
        fd = self._direct_fd(bank) if direct else self.fds[bank]
        done = 0
        try:
            while done < data.size:
                done += os.pwrite(fd, data[done:], start + done)
        except OSError:  # O_DIRECT refused (a block size above a page, a file system without it): buffered
            if fd == self.fds[bank]:
                raise
            self.direct[bank] = self.fds[bank]
            self._write(bank, start + done, data[done:])
        self._hash(bank, start, data)

    def _direct_fd(self, bank: int) -> int:
        if self.direct[bank] is None:
            try:
                self.direct[bank] = os.open(self.paths[bank], os.O_WRONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                self.direct[bank] = self.fds[bank]
        return self.direct[bank]

    def _hash(self, bank: int, start: int, data: np.ndarray) -> None:
        done = self.hashed[bank]
        if done < 0 or start < done:  # out of order: leave it to a read of the file
            self.hashed[bank] = -1
            return
        self._zeros(bank, start - done)
        self.hashers[bank].update(data)  # hashlib releases the GIL here: the workers keep quantizing
        self.hashed[bank] = start + data.size

    def _zeros(self, bank: int, n: int) -> None:
        for k in range(0, n, len(_ZEROS)):
            self.hashers[bank].update(memoryview(_ZEROS)[: min(len(_ZEROS), n - k)])

    def flush(self) -> None:
        for bank in np.flatnonzero(self.fill).tolist():
            self._flush(bank, whole=True)

    def digests(self) -> dict[str, str]:
        """sha256 of every image written in order, by file name (after :meth:`flush`; the zeros to the end added)."""
        out = {}
        for bank, name in enumerate(self.names):
            if self.hashed[bank] >= 0:
                self._zeros(bank, self.bank_bytes - self.hashed[bank])
                self.hashed[bank] = self.bank_bytes
                out[name] = self.hashers[bank].hexdigest()
        return out

    def close(self) -> None:
        for fd in {*self.fds, *(d for d in self.direct if d is not None)}:
            os.close(fd)
        self.staging = self._mem = None  # the mapping is unmapped with its last view
