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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from romac.spec.manifest import bank_file
from romac.targets import Target

_ZEROS = bytes(1 << 20)  # hashed for the unwritten (zero) stretches of an image


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
    """Append runs to their bank's staging row while each continues the bytes staged there and fits; returns the
    index of the first run that does not (the caller flushes that bank and calls again), or the number of runs."""
    for k in range(bank.size):
        b, n = bank[k], stop[k] - start[k]
        if fill[b] and (offset[k] != end[b] or fill[b] + n > staging.shape[1]):
            return k
        if n > staging.shape[1]:
            return k
        if not fill[b]:
            end[b] = offset[k]
        staging[b, fill[b]:fill[b] + n] = data[start[k]:stop[k]]
        fill[b] += n
        end[b] += n
    return bank.size


class BankWriter:
    """Open bank images, written in place with pwrite (sparse until filled), each hashed as it is written.

    Writes that continue where the bank's previous one ended are gathered in the bank's staging row (a native
    loop copies a job's runs there: a Python loop over 400,000 runs cost two CPU seconds on the 8B) and go out
    in one pwrite once ``BUFFER`` bytes are staged. Call :meth:`flush` before reading an image back.
    """

    BUFFER = 1 << 16

    def __init__(self, root: Path, target: Target) -> None:
        self.bank_bytes = target.bank_bytes
        self.names = [bank_file(b, target.banks) for b in range(target.banks)]
        self.staging = np.zeros((target.banks, 2 * self.BUFFER), np.uint8)  # 2x: a run that arrives at BUFFER-1 fits
        self.fill = np.zeros(target.banks, np.int64)  # bytes staged per bank
        self.end = np.zeros(target.banks, np.int64)  # the bank offset where its staged bytes end
        self.hashers: list = [hashlib.sha256() for _ in range(target.banks)]
        self.hashed = [0] * target.banks  # bytes of the image hashed so far; -1: written out of order
        self.fds = []
        for name in self.names:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            os.ftruncate(fd, target.bank_bytes)
            self.fds.append(fd)

    def write_runs(self, runs: Runs) -> None:
        k, n = 0, len(runs.bank)
        while k < n:
            k += _stage(runs.data, runs.bank[k:], runs.offset[k:], runs.start[k:], runs.stop[k:], self.staging,
                        self.fill, self.end)
            if k < n:  # bank b must flush first; a run bigger than a staging row goes out on its own
                b = int(runs.bank[k])
                self._flush(b)
                if runs.stop[k] - runs.start[k] > self.staging.shape[1]:
                    self._write(b, int(runs.offset[k]), runs.data[runs.start[k]:runs.stop[k]])
                    k += 1
        for b in np.flatnonzero(self.fill >= self.BUFFER).tolist():
            self._flush(b)

    def _flush(self, bank: int) -> None:
        n = int(self.fill[bank])
        if n:
            self._write(bank, int(self.end[bank]) - n, self.staging[bank, :n])
            self.fill[bank] = 0

    def _write(self, bank: int, start: int, data: np.ndarray) -> None:
        os.pwrite(self.fds[bank], data, start)
        self._hash(bank, start, data)

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
            self._flush(bank)

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
        for fd in self.fds:
            os.close(fd)
