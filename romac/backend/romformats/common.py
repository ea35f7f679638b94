"""What the writers and readers of bank images share: the word container, one bank's geometry, hex digit tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from romac.spec.manifest import bank_stem

CHUNK_BYTES = 1 << 20  # raw bytes turned into text per step

Words = Union[np.ndarray, list]  # uint64 array (word_bits <= 64) or Python ints

# hex digits, lower and upper case: per nibble [16], and per byte [256] as uint16s whose two bytes in memory are the
# byte's two ASCII digits (one gather turns bytes into text)
_NIBBLE = {upper: np.frombuffer(d, np.uint8) for upper, d in ((False, b"0123456789abcdef"), (True, b"0123456789ABCDEF"))}
_BYTE = {upper: np.stack([np.repeat(t, 16), np.tile(t, 16)], axis=1).copy().view(np.uint16).reshape(256)
         for upper, t in _NIBBLE.items()}


@dataclass(frozen=True)
class BankGeometry:
    """One bank as the writers see it: which bank of how many, and its shape (from the target)."""

    bank: int
    banks: int
    word_bits: int
    bank_words: int

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    @property
    def digits(self) -> int:
        """Hex digits of one word."""
        return self.word_bits // 4

    @property
    def addr_bits(self) -> int:
        """Width of the address port: the fewest bits that address every word (at least 1)."""
        return max(1, (self.bank_words - 1).bit_length())

    @property
    def addr_digits(self) -> int:
        return -(-self.addr_bits // 4)

    @property
    def name(self) -> str:
        """``bank_NNN``, as the raw image is named."""
        return Path(bank_stem(self.bank, self.banks)).name

    @property
    def module(self) -> str:
        return f"romac_{self.name}"

    def describe(self) -> str:
        return f"romac bank {self.bank} of {self.banks}: {self.bank_words} words x {self.word_bits} bits"
