"""Where things are: how a tensor is cut into tiles, how many bytes and words each tile takes, which bank and
offset each tile lives at, and how SRAM is laid out. docs/artifacts.md describes the same layout in prose.

A matrix [rows, cols] is cut into tiles of ``tile_rows × tile_cols`` (edge tiles are smaller). Tiles are
numbered *full tiles first*, row-major over the full-tile grid, then the edge tiles row-major; round-robin
bank assignment over that order gives every bank the same number of full tiles (± 1). A vector is one tile.

One tile's bytes, in order (each part's rows padded to whole bytes, the tile padded to whole ROM words):
  1. codes: tile rows × tile cols codes, row-major, sub-byte codes first element in the most significant bits,
     16/32-bit codes little-endian;
  2. for each parameter field of the format (:attr:`romac.spec.formats.WeightFormat.param_fields`): that
     parameter for the tile's rows × groups, row-major (floats little-endian, u8 bytes, u4/u2 packed).
Per-tensor constants (bitsandbytes' nested statistics) go in a separate ``<name>.qconst`` vector region (fp32:
the offset, then the nested absmax values).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from romac.spec.formats import WeightFormat, element_format

#: the companion vector region of a tensor's per-tensor constants
CONSTANTS_SUFFIX = ".qconst"


def row_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class TileGrid:
    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @classmethod
    def for_vector(cls, n: int) -> "TileGrid":
        return cls(1, n, 1, n)

    @property
    def full_rows(self) -> int:
        return self.rows // self.tile_rows

    @property
    def full_cols(self) -> int:
        return self.cols // self.tile_cols

    @property
    def n_full(self) -> int:
        return self.full_rows * self.full_cols

    def tiles(self) -> list[tuple[int, int, int, int]]:
        """(row0, col0, rows, cols) of every tile, in storage order (full tiles first)."""
        return self.full_tiles() + self.edge_tiles()

    def full_tiles(self) -> list[tuple[int, int, int, int]]:
        tr, tc = self.tile_rows, self.tile_cols
        return [(i * tr, j * tc, tr, tc) for i in range(self.full_rows) for j in range(self.full_cols)]

    def edge_tiles(self) -> list[tuple[int, int, int, int]]:
        """The smaller tiles on the right and bottom edges, row-major."""
        tr, tc = self.tile_rows, self.tile_cols
        nr, nc = math.ceil(self.rows / tr), math.ceil(self.cols / tc)
        out = []
        for i in range(nr):
            r = min(tr, self.rows - i * tr)
            for j in range(0 if r < tr else self.full_cols, nc):
                out.append((i * tr, j * tc, r, min(tc, self.cols - j * tc)))
        return out

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.rows / self.tile_rows) * math.ceil(self.cols / self.tile_cols)


def param_groups(fmt: WeightFormat, cols: int) -> int:
    """Parameter groups per row in a tile of ``cols`` columns (tiles start on group boundaries)."""
    return math.ceil(cols / fmt.group) if fmt.group else 0


def tile_bytes(fmt: WeightFormat, rows: int, cols: int, word_bytes: int) -> int:
    """Bytes one tile of rows × cols occupies in ROM, padded to whole words."""
    n = rows * row_bytes(cols, fmt.code_bits)
    ng = param_groups(fmt, cols)
    for p in fmt.param_fields:
        n += rows * row_bytes(ng, p.bits)
    return ceil_to(n, word_bytes)


def tile_bit_split(fmt: WeightFormat, rows: int, cols: int, word_bytes: int) -> tuple[int, int, int]:
    """(code bits, parameter bits, padding bits) of one tile as stored."""
    code = 8 * rows * row_bytes(cols, fmt.code_bits)
    param = 8 * sum(rows * row_bytes(param_groups(fmt, cols), p.bits) for p in fmt.param_fields)
    return code, param, 8 * tile_bytes(fmt, rows, cols, word_bytes) - code - param


def tile_sizes(fmt: WeightFormat, grid: TileGrid, word_bytes: int) -> np.ndarray:
    """Bytes of every tile of a grid, in storage order (full tiles share one size: computed once)."""
    edges = grid.edge_tiles()
    sizes = np.empty(grid.n_tiles, np.int64)
    if grid.n_full:
        sizes[: grid.n_full] = tile_bytes(fmt, grid.tile_rows, grid.tile_cols, word_bytes)
    for k, (_, _, r, c) in enumerate(edges):
        sizes[grid.n_full + k] = tile_bytes(fmt, r, c, word_bytes)
    return sizes


def tile_words(fmt: WeightFormat, grid: TileGrid, word_bytes: int) -> np.ndarray:
    """ROM words of every tile of a grid, in storage order."""
    return tile_sizes(fmt, grid, word_bytes) // word_bytes


def tile_index(grid: TileGrid, r0: int, c0: int) -> int:
    """Storage-order index of the tile whose top-left element is (r0, c0)."""
    i, j = r0 // grid.tile_rows, c0 // grid.tile_cols
    fr, fc = grid.full_rows, grid.full_cols
    if i < fr and j < fc:
        return i * fc + j
    n_right = fr if grid.cols % grid.tile_cols else 0
    if i < fr:
        return grid.n_full + i
    return grid.n_full + n_right + j


def tile_locations(words: np.ndarray, start_bank: int, extents, banks: int, word_bytes: int):
    """Bank and byte offset (within the bank image) of every tile of a region, in storage order.

    ``words`` are the tiles' sizes; tile t lives in bank ``(start_bank + t) % banks``, after the earlier tiles
    of the same region in that bank, from the region's extent in that bank (objects with ``bank`` and
    ``word_offset``: :class:`romac.spec.plan.Extent`).
    """
    n = words.size
    bank = (start_bank + np.arange(n)) % banks
    base = np.zeros(banks, np.int64)
    for e in extents:
        base[e.bank] = e.word_offset
    order = np.lexsort((np.arange(n), bank))
    sorted_words = words[order]
    sorted_bank = bank[order]
    csum = np.cumsum(sorted_words) - sorted_words
    first = np.searchsorted(sorted_bank, sorted_bank)  # first index of each bank's run
    within = csum - csum[first]
    offset = np.empty(n, np.int64)
    offset[order] = (base[sorted_bank] + within) * word_bytes
    return bank, offset


# ---- SRAM ------------------------------------------------------------------------------------------------
# One adapter's SRAM image: a slot table (one entry per projection of the model, in slot order), then the
# A [rank, in] and B [out, rank] matrices of every slot the adapter has, each block aligned to SRAM_ALIGN.
# The KV cache follows the adapter region, laid out [layer][K, V][position][kv_heads × head_dim].
SRAM_ALIGN = 64
SLOT_ENTRY_FORMAT = "<fffI"  # A's scale, B's scale, LoRA scaling (alpha/r), rank (0: slot unused)
SLOT_ENTRY_BYTES = struct.calcsize(SLOT_ENTRY_FORMAT)


def slot_table_bytes(n_slots: int) -> int:
    return ceil_to(n_slots * SLOT_ENTRY_BYTES, SRAM_ALIGN)


def lora_block_bytes(rows: int, cols: int, fmt: str) -> int:
    """Bytes of one LoRA matrix in SRAM, before alignment."""
    return rows * cols * element_format(fmt).bytes


def kv_bytes_per_token(num_layers: int, kv_dim: int, fmt: str) -> int:
    """SRAM bytes one more context position takes: K and V of every layer."""
    return num_layers * 2 * kv_dim * element_format(fmt).bytes
