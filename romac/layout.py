"""How a quantized tensor is cut into tiles and how one tile is laid out in ROM bytes.

This is the single definition shared by the tile and partition passes (sizes), the emitter (packing) and the
emulator (unpacking), so the three can never disagree.

A matrix [rows, cols] is cut into tiles of ``tile_rows × tile_cols`` (edge tiles are smaller). Tiles are
numbered *full tiles first*, row-major over the full-tile grid, then the edge tiles row-major; round-robin
bank assignment over that order gives every bank the same number of full tiles (± 1). A vector is one tile.

One tile's bytes, in order (each part's rows padded to whole bytes, the tile padded to whole ROM words):
  1. codes: tile rows × tile cols codes, row-major, packed with :func:`romac.codecs.pack_codes`
     (first element in the most significant bits; 16/32-bit codes little-endian);
  2. for each ``(key, storage)`` of the codec's ``param_fields``: that parameter for the tile's
     rows × groups, row-major (``f32``/``f16`` little-endian, ``u8`` bytes, ``u4``/``u2`` packed).
Per-tensor constants (bitsandbytes' nested statistics) go in a separate vector region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from romac.codecs import Codec, QuantTensor, pack_codes, unpack_codes

_STORAGE_BITS = {"f32": 32, "f16": 16, "u8": 8, "u4": 4, "u2": 2}
_STORAGE_DTYPE = {"f32": np.float32, "f16": np.float16, "u8": np.uint8, "u4": np.uint8, "u2": np.uint8}
_LITTLE_ENDIAN = {"f32": "<f4", "f16": "<f2"}


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


def param_groups(codec: Codec, cols: int) -> int:
    """Parameter groups per row in a tile of ``cols`` columns (tiles start on group boundaries)."""
    return math.ceil(cols / codec.group) if codec.group else 0


def tile_bytes(codec: Codec, rows: int, cols: int, word_bytes: int) -> int:
    """Bytes one tile of rows × cols occupies in ROM, padded to whole words."""
    n = rows * row_bytes(cols, codec.bits)
    ng = param_groups(codec, cols)
    for _, storage in codec.param_fields:
        n += rows * row_bytes(ng, _STORAGE_BITS[storage])
    return ceil_to(n, word_bytes)


def tile_sizes(codec: Codec, grid: TileGrid, word_bytes: int) -> np.ndarray:
    """Bytes of every tile of a grid, in storage order (full tiles share one size: computed once)."""
    edges = grid.edge_tiles()
    sizes = np.empty(grid.n_tiles, np.int64)
    if grid.n_full:
        sizes[: grid.n_full] = tile_bytes(codec, grid.tile_rows, grid.tile_cols, word_bytes)
    for k, (_, _, r, c) in enumerate(edges):
        sizes[grid.n_full + k] = tile_bytes(codec, r, c, word_bytes)
    return sizes


def row_group_params(codec: Codec, q: QuantTensor) -> dict[str, np.ndarray]:
    """Each parameter as [rows, groups per row]; bitsandbytes' flat blocks are reshaped (rows must align)."""
    rows = q.shape[0] if len(q.shape) == 2 else 1
    out = {}
    for key, _ in codec.param_fields:
        p = q.params[key]
        out[key] = p.reshape(rows, -1) if p.ndim == 1 else p
    return out


def _pack_part(values: np.ndarray, storage: str) -> np.ndarray:
    """[..., n] parameter values -> [..., bytes] in ROM storage form."""
    if storage in ("f32", "f16"):
        v = np.ascontiguousarray(values.astype(_STORAGE_DTYPE[storage]).astype(_LITTLE_ENDIAN[storage]))
        return v.view(np.uint8).reshape(*values.shape[:-1], -1)
    return pack_codes(values.astype(np.uint8), _STORAGE_BITS[storage])


def pack_tiles(codec: Codec, q: QuantTensor, grid: TileGrid, word_bytes: int) -> list[np.ndarray]:
    """The ROM bytes of every tile of a quantized tensor, in storage order (each a uint8 array)."""
    codes = q.codes.reshape(grid.rows, grid.cols)
    params = row_group_params(codec, q)
    tr, tc = grid.tile_rows, grid.tile_cols
    out: list[np.ndarray] = []
    # full tiles, vectorised: [full_rows, tr, full_cols, tc] -> per tile contiguous parts
    if grid.n_full:
        fr, fc = grid.full_rows, grid.full_cols
        c = codes[: fr * tr, : fc * tc].reshape(fr, tr, fc, tc).transpose(0, 2, 1, 3)
        parts = [pack_codes(c, codec.bits).reshape(fr * fc, -1)]
        gpt = param_groups(codec, tc)
        for key, storage in codec.param_fields:
            p = params[key][: fr * tr, : fc * gpt].reshape(fr, tr, fc, gpt).transpose(0, 2, 1, 3)
            parts.append(_pack_part(p, storage).reshape(fr * fc, -1))
        block = np.concatenate(parts, axis=1)
        size = tile_bytes(codec, tr, tc, word_bytes)
        if block.shape[1] < size:
            block = np.pad(block, ((0, 0), (0, size - block.shape[1])))
        out.extend(block)
    for r0, c0, r, c in grid.edge_tiles():
        parts = [pack_codes(codes[r0 : r0 + r, c0 : c0 + c], codec.bits).reshape(-1)]
        if codec.group:
            g0, ng = c0 // codec.group, param_groups(codec, c)
            for key, storage in codec.param_fields:
                parts.append(_pack_part(params[key][r0 : r0 + r, g0 : g0 + ng], storage).reshape(-1))
        t = np.concatenate(parts)
        out.append(np.pad(t, (0, tile_bytes(codec, r, c, word_bytes) - t.size)))
    return out


def _unpack_part(data: np.ndarray, storage: str, n: int) -> np.ndarray:
    """[..., bytes] -> [..., n] parameter values."""
    if storage in ("f32", "f16"):
        return np.ascontiguousarray(data).view(_LITTLE_ENDIAN[storage]).astype(_STORAGE_DTYPE[storage])
    return unpack_codes(data, _STORAGE_BITS[storage], n)


def unpack_tiles(
    codec: Codec, tiles: list[np.ndarray], grid: TileGrid, shape: tuple[int, ...], constants: dict
) -> QuantTensor:
    """Inverse of :func:`pack_tiles`: rebuild the QuantTensor from the tiles' bytes (storage order)."""
    rows, cols, tr, tc = grid.rows, grid.cols, grid.tile_rows, grid.tile_cols
    codes = np.empty((rows, cols), dtype=np.uint8 if codec.bits <= 8 else f"uint{codec.bits}")
    ng_row = param_groups(codec, cols)
    params = {k: np.empty((rows, ng_row), _STORAGE_DTYPE[s]) for k, s in codec.param_fields}
    if grid.n_full:
        fr, fc, gpt = grid.full_rows, grid.full_cols, param_groups(codec, tc)
        block = np.stack(tiles[: grid.n_full])
        pos, cb = 0, tr * row_bytes(tc, codec.bits)
        c = unpack_codes(block[:, pos : pos + cb].reshape(fr, fc, tr, -1), codec.bits, tc)
        codes[: fr * tr, : fc * tc] = c.transpose(0, 2, 1, 3).reshape(fr * tr, fc * tc)
        pos += cb
        for key, storage in codec.param_fields:
            nb = tr * row_bytes(gpt, _STORAGE_BITS[storage])
            p = _unpack_part(block[:, pos : pos + nb].reshape(fr, fc, tr, -1), storage, gpt)
            params[key][: fr * tr, : fc * gpt] = p.transpose(0, 2, 1, 3).reshape(fr * tr, fc * gpt)
            pos += nb
    for data, (r0, c0, r, c) in zip(tiles[grid.n_full :], grid.edge_tiles()):
        cb = r * row_bytes(c, codec.bits)
        codes[r0 : r0 + r, c0 : c0 + c] = unpack_codes(data[:cb].reshape(r, -1), codec.bits, c)
        pos = cb
        if codec.group:
            g0, ng = c0 // codec.group, param_groups(codec, c)
            for key, storage in codec.param_fields:
                nb = r * row_bytes(ng, _STORAGE_BITS[storage])
                params[key][r0 : r0 + r, g0 : g0 + ng] = _unpack_part(data[pos : pos + nb].reshape(r, -1), storage, ng)
                pos += nb
    flat_params = {k: (v.reshape(-1) if codec.name in ("nf4", "fp4") else v) for k, v in params.items()}
    return QuantTensor(codec.name, tuple(shape), codes.reshape(shape), flat_params, dict(constants))


def constants_length(codec: Codec, shape: tuple[int, ...]) -> int:
    """How many fp32 values a tensor's per-tensor constants take (0 for formats without any)."""
    if not getattr(codec, "double_quant", False):
        return 0
    n_blocks = math.ceil(math.prod(shape) / codec.group)
    return 1 + math.ceil(n_blocks / codec.nested_blocksize)


def pack_constants(q: QuantTensor) -> np.ndarray:
    """The constants vector: offset, then the nested absmax values (fp32)."""
    return np.concatenate([q.constants["offset"].reshape(1), q.constants["nested_absmax"]]).astype(np.float32)


def unpack_constants(values: np.ndarray) -> dict[str, np.ndarray]:
    return {"offset": values[:1].astype(np.float32), "nested_absmax": values[1:].astype(np.float32)}


# ---- SRAM images -----------------------------------------------------------------------------------------
# One adapter's SRAM image: a slot table (one entry per projection of the model, in slot order), then the
# A [rank, in] and B [out, rank] matrices of every slot the adapter has, each block aligned to SRAM_ALIGN.
SRAM_ALIGN = 64
SLOT_ENTRY_FORMAT = "<fffI"  # A's fp8 scale, B's fp8 scale, LoRA scaling (alpha/r), rank (0: slot unused)
LORA_BYTES = {"fp8_e4m3": 1, "fp16": 2}
KV_BYTES = {"fp32": 4, "fp16": 2, "fp8_e4m3": 1}


def slot_table_bytes(n_slots: int) -> int:
    import struct

    return ceil_to(n_slots * struct.calcsize(SLOT_ENTRY_FORMAT), SRAM_ALIGN)


# ---- Placement of tiles in banks -------------------------------------------------------------------------


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


def tile_locations(words: np.ndarray, start_bank: int, extents: list, banks: int, word_bytes: int):
    """Bank and byte offset (within the bank image) of every tile of a region, in storage order.

    ``words`` are the tiles' sizes; tile t lives in bank ``(start_bank + t) % banks``, after the earlier tiles
    of the same region in that bank, from the region's extent in that bank.
    """
    n = words.size
    bank = (start_bank + np.arange(n)) % banks
    base = np.zeros(banks, np.int64)
    for b, offset, _ in extents:
        base[b] = offset
    order = np.lexsort((np.arange(n), bank))
    sorted_words = words[order]
    sorted_bank = bank[order]
    csum = np.cumsum(sorted_words) - sorted_words
    first = np.searchsorted(sorted_bank, sorted_bank)  # first index of each bank's run
    within = csum - csum[first]
    offset = np.empty(n, np.int64)
    offset[order] = (base[sorted_bank] + within) * word_bytes
    return bank, offset
