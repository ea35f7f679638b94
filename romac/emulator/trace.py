"""An independent reading of the B-ROM: a slow, obvious decoder written from docs/artifacts.md alone.

It shares no code with the packer and the fast decoder (``romac.spec.layout``, ``romac.codecs.tiles``,
``romac.codecs``): it walks the tiles of a region in storage order itself, finds each tile's bank and word offset
itself, reads the tile word by word from the bank image (a word is the little-endian integer of its bytes), takes
the codes and parameters out of the word stream bit by bit, and dequantizes with the formulas of the document. Only
the vocabulary is shared: each format's code width and parameter storage, and bitsandbytes' tables
(``romac.spec.formats``). A bug symmetric in packing and fast unpacking (a nibble order, a word order) therefore
shows up here as a difference.

``romac run --trace`` uses it: for each instruction of a step it lists which banks and words it reads, and it checks
every region it reads against the emulator's own values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from romac.spec.formats import BNB_DYNAMIC_SIGNED, BNB_NESTED_BLOCKSIZE, STORAGES, AffineFormat, RawFormat
from romac.spec.isa import Instr, spec
from romac.spec.layout import CONSTANTS_SUFFIX
from romac.spec.manifest import Manifest
from romac.spec.plan import MATRIX, Region

f32 = np.float32


@dataclass(frozen=True)
class TileRead:
    """One tile as it lies in B-ROM: its place in the matrix and the words that hold it."""

    row0: int
    col0: int
    rows: int
    cols: int
    bank: int
    word: int  # first word in the bank
    words: int


def _tiles_in_storage_order(rows: int, cols: int, tr: int, tc: int) -> list[tuple[int, int, int, int]]:
    """docs/artifacts.md, "Storage order": full tiles row-major, then the right edge of each full row of tiles,
    then the bottom row, each (row0, col0, rows, cols)."""
    full_r, full_c = rows // tr, cols // tc
    out = [(i * tr, j * tc, tr, tc) for i in range(full_r) for j in range(full_c)]
    if cols % tc:
        out += [(i * tr, full_c * tc, tr, cols - full_c * tc) for i in range(full_r)]
    if rows % tr:
        for j in range(-(-cols // tc)):
            out.append((full_r * tr, j * tc, rows - full_r * tr, min(tc, cols - j * tc)))
    return out


def _tile_bits(region: Region, rows: int, cols: int) -> list[tuple[str, int, int]]:
    """The parts of one tile in order: (name, values per row, bits per value); each part's rows pad to bytes."""
    fmt = region.format
    parts = [("codes", cols, fmt.code_bits)]
    if fmt.group:
        groups = -(-cols // fmt.group)
        parts += [(p.key, groups, STORAGES[p.storage].bits) for p in fmt.param_fields]
    return parts


def tile_reads(region: Region, banks: int, word_bits: int) -> list[TileRead]:
    """Every tile of a region with its bank and words, from the region's placement in the manifest."""
    rows, cols = (region.shape if region.kind == MATRIX else (1, region.shape[0]))
    tr, tc = (region.tile if region.kind == MATRIX else (1, cols))
    start = {e.bank: e.word_offset for e in region.extents}
    next_word = dict(start)
    out = []
    for t, (r0, c0, r, c) in enumerate(_tiles_in_storage_order(rows, cols, tr, tc)):
        nbytes = sum(r * math.ceil(n * bits / 8) for _, n, bits in _tile_bits(region, r, c))
        words = math.ceil(nbytes * 8 / word_bits)
        bank = (region.start_bank + t) % banks
        out.append(TileRead(r0, c0, r, c, bank, next_word[bank], words))
        next_word[bank] += words
    return out


def _tile_bytes(bank_image: np.ndarray, first_word: int, words: int, word_bits: int) -> bytes:
    """The tile's bytes, word by word: each word an integer from its little-endian bytes, written back the same way."""
    wb = word_bits // 8
    out = bytearray()
    for w in range(first_word, first_word + words):
        value = int.from_bytes(bytes(bank_image[w * wb:(w + 1) * wb]), "little")
        out += value.to_bytes(wb, "little")
    return bytes(out)


def _values(data: bytes, pos: int, n: int, bits: int) -> tuple[list[int], int]:
    """``n`` unsigned values of ``bits`` each from byte ``pos``: sub-byte values first-element-high within a
    byte, wider ones little-endian. Returns them and the byte after the (byte-padded) run."""
    if bits >= 8:
        nb = bits // 8
        return [int.from_bytes(data[pos + i * nb: pos + (i + 1) * nb], "little") for i in range(n)], pos + n * nb
    per = 8 // bits
    vals = []
    for i in range(n):
        byte = data[pos + i // per]
        shift = 8 - bits * (i % per + 1)
        vals.append((byte >> shift) & ((1 << bits) - 1))
    return vals, pos + math.ceil(n * bits / 8)


def _as_float(bits_value: int, storage_bits: int) -> float:
    dtype = {16: np.float16, 32: np.float32}[storage_bits]
    return float(np.array(bits_value, dtype=np.uint16 if storage_bits == 16 else np.uint32).view(dtype))


def read_region(banks: Sequence[np.ndarray], region: Region, word_bits: int, constants: np.ndarray | None = None,
                tiles: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The float32 values a region holds (matrices [out, in], vectors [n]) decoded the slow way, and the mask of
    the elements decoded (all of them, or those of the tiles ``tiles``, storage-order indices).

    ``constants``: the values of the region's ``.qconst`` vector (bitsandbytes double quantization).
    """
    fmt = region.format
    rows, cols = (region.shape if region.kind == MATRIX else (1, region.shape[0]))
    codes = np.zeros((rows, cols), np.int64)
    params = {p.key: np.zeros((rows, -(-cols // fmt.group) if fmt.group else 0), np.float64) for p in fmt.param_fields}
    out = np.zeros((rows, cols), f32)
    done = np.zeros((rows, cols), bool)
    reads = tile_reads(region, len(banks), word_bits)
    for t in (reads if tiles is None else [reads[i] for i in tiles]):
        data = _tile_bytes(banks[t.bank], t.word, t.words, word_bits)
        pos = 0
        for name, n, bits in _tile_bits(region, t.rows, t.cols):
            for r in range(t.rows):
                vals, pos = _values(data, pos, n, bits)
                if name == "codes":
                    codes[t.row0 + r, t.col0:t.col0 + n] = vals
                else:
                    storage = next(p.storage for p in fmt.param_fields if p.key == name)
                    if STORAGES[storage].little_endian:  # floats: their bits
                        vals = [_as_float(v, bits) for v in vals]
                    g0 = t.col0 // fmt.group
                    params[name][t.row0 + r, g0:g0 + n] = vals
        for r in range(t.row0, t.row0 + t.rows):
            for c in range(t.col0, t.col0 + t.cols):
                out[r, c] = _value(fmt, r, c, cols, codes, params, constants)
        done[t.row0:t.row0 + t.rows, t.col0:t.col0 + t.cols] = True
    return out.reshape(region.shape), done.reshape(region.shape)


def _value(fmt, r: int, c: int, cols: int, codes: np.ndarray, params: dict, constants: np.ndarray | None) -> f32:
    """One element by the formulas of docs/artifacts.md and the format table, in float32."""
    q = int(codes[r, c])
    if isinstance(fmt, RawFormat):
        return f32(_as_float(q, fmt.code_bits))
    if isinstance(fmt, AffineFormat):  # w = float32(s) * (q - z)
        g = c // fmt.group
        return f32(params["scale"][r, g]) * f32(q - params["zero"][r, g])
    # bitsandbytes: blocks over the flattened matrix; absmax float32, or code[c] * nested[block // 256] + offset
    block = (r * cols + c) // fmt.group
    a = params["absmax"].reshape(-1)[block]
    if constants is not None:
        a = f32(BNB_DYNAMIC_SIGNED[int(a)] * f32(constants[1 + block // BNB_NESTED_BLOCKSIZE])) + f32(constants[0])
    return f32(fmt.values[q]) * f32(a)


def instruction_reads(ins: Instr, manifest: Manifest) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """What one instruction reads of B-ROM: for each region operand, its name and (bank, first word, words)."""
    s = spec(ins.op)
    out = []
    for name in ("a", "b"):
        operand = getattr(s, name)
        if operand is not None and operand.kind == "region":
            r = manifest.regions[getattr(ins, name)]
            out.append((r.name, [(e.bank, e.word_offset, e.words) for e in r.extents]))
    return out


def format_reads(reads: list[tuple[str, list[tuple[int, int, int]]]]) -> str:
    parts = []
    for name, extents in reads:
        words = sum(w for _, _, w in extents)
        banks = sorted(b for b, _, _ in extents)
        where = f"bank {banks[0]} words {extents[0][1]}..{extents[0][1] + extents[0][2] - 1}" if len(banks) == 1 else \
            f"banks {banks[0]}..{banks[-1]} ({len(banks)}), {words:,} words"
        parts.append(f"{name}: {where}")
    return "; ".join(parts)


def cross_check(rom_banks: Sequence[np.ndarray], manifest: Manifest, values, region_ids: Sequence[int],
                tiles_per_region: int | None = None, seed: int = 0) -> tuple[int, list[str]]:
    """Decode regions the slow way and compare them with the emulator's ``values(rid)`` bit for bit.

    ``tiles_per_region``: check that many tiles of each region (the first, the last, and random ones between;
    None: all). Returns the number of tiles read and a line per difference found.
    """
    index = manifest.region_ids()
    word_bits = manifest.banks.word_bits
    rng = np.random.default_rng(seed)
    read, problems = 0, []
    for rid in region_ids:
        region = manifest.regions[rid]
        n = region.n_tiles
        pick = None
        if tiles_per_region is not None and n > tiles_per_region:
            middle = rng.choice(np.arange(1, n - 1), size=max(0, tiles_per_region - 2), replace=False)
            pick = sorted({0, n - 1, *map(int, middle)})
        constants = None
        cname = region.name + CONSTANTS_SUFFIX
        if cname in index:
            constants = read_region(rom_banks, manifest.regions[index[cname]], word_bits)[0]
        slow, mask = read_region(rom_banks, region, word_bits, constants, pick)
        fast = np.asarray(values(rid), f32).reshape(region.shape)
        read += n if pick is None else len(pick)
        differ = mask & (fast.view(np.uint32) != slow.view(np.uint32))
        if differ.any():
            at = tuple(int(i) for i in np.argwhere(differ)[0])
            problems.append(f"region {region.name!r} element {at}: emulator {fast[at]!r}, independent decoder "
                            f"{slow[at]!r} ({int(differ.sum())} elements differ)")
    return read, problems
