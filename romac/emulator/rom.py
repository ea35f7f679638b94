"""B-ROM: the bank images, memory-mapped, and what is computed from them.

Two ways to read a placed region, one the definition of the other:

* ``value(rid)`` decodes the region into float32 (``[out, in]`` for a matrix): the tiles are read from the banks
  where the manifest's extents and :mod:`romac.spec.layout` put them, and the codec dequantizes them. It is the
  readable definition, and what the emulator keeps of *vector* regions (norm gains, RoPE tables: a few KB).
* ``matmul(rid, x)`` and ``rows(rid, ids)`` compute with a matrix straight from its packed codes in the mapped
  banks (:mod:`romac.emulator.kernels`), as an L-Unit does; no float copy of a matrix is ever made. What they
  keep per region (:class:`MatrixKernel`) is where its tiles lie (16 bytes a tile) and the format's small tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numba
import numpy as np

from romac.codecs import QuantTensor, codec_for
from romac.codecs.tiles import unpack_constants, unpack_tiles
import romac.emulator.kernels as K
from romac.spec.formats import BNB_NESTED_BLOCKSIZE, STORAGES, WeightFormat
from romac.spec.layout import CONSTANTS_SUFFIX, TileGrid, tile_index, tile_locations, tile_sizes
from romac.spec.manifest import Manifest, bank_file
from romac.spec.plan import MATRIX, VECTOR, Region

f32 = np.float32
_FAMILY = {"affine": K.AFFINE, "bnb4": K.BNB, "raw": K.RAW}


@dataclass(frozen=True)
class MatrixKernel:
    """What the kernels need of one matrix region, computed once: places and small tables, no weights."""

    tile_bank: np.ndarray  # int64 [row tiles, column tiles]: the bank of each tile
    tile_offset: np.ndarray  # int64 [row tiles, column tiles]: its byte offset in that bank
    geo: np.ndarray  # int64 [K.GEO_SIZE]: shape, tiles, code and parameter widths (K.G_* positions)
    lane_cols: np.ndarray  # int64 [groups a row · G]: the column of each lane (-1: past the row's end)
    values: np.ndarray  # float32: the code values (bitsandbytes; else unused)
    nested: np.ndarray  # float32: the nested absmax (double quantization; else unused)
    offset: float  # the double quantization's offset (0.0 without)
    # the C kernel's leading arguments, each tile's address in the maps among them (K.c_plan; None: numba computes it)
    c_args: tuple | None = None


def prepare(fmt: WeightFormat, grid: TileGrid, start_bank: int, extents, n_banks: int, word_bytes: int,
            constants: np.ndarray | None = None) -> MatrixKernel:
    """The kernel plan of a placed matrix, from the layout (spec.layout) and its format's facts (spec.formats).
    ``constants``: the fp32 values of its ``.qconst`` region (bitsandbytes double quantization), if any."""
    sizes = tile_sizes(fmt, grid, word_bytes)
    bank, offset = tile_locations(sizes // word_bytes, start_bank, extents, n_banks, word_bytes)
    n_rt, n_ct = -(-grid.rows // grid.tile_rows), -(-grid.cols // grid.tile_cols)
    order = np.array([[tile_index(grid, i * grid.tile_rows, j * grid.tile_cols) for j in range(n_ct)]
                      for i in range(n_rt)], np.int64).reshape(n_rt, n_ct)
    bits, lanes = fmt.code_bits, fmt.group or grid.tile_cols
    per = 8 // bits if bits < 8 and lanes % (8 // bits) == 0 else 1
    n_groups = -(-grid.cols // lanes)
    e = np.arange(lanes)
    lane_elem = np.empty(lanes, np.int64)  # the column (within the group) of each lane: the kernels' order
    lane_elem[(e % per) * (lanes // per) + e // per] = e
    cols = (np.arange(n_groups)[:, None] * lanes + lane_elem[None, :]).reshape(-1)
    cols[cols >= grid.cols] = -1
    fields = [STORAGES[p.storage] for p in fmt.param_fields]
    family = _FAMILY[fmt.family]
    if len(fields) != {K.AFFINE: 2, K.BNB: 1, K.RAW: 0}[family]:
        raise ValueError(f"{fmt.name}: {len(fields)} parameter fields; the {fmt.family} kernels read "
                         "scale and zero (affine), absmax (bitsandbytes) or none (raw)")
    geo = np.zeros(K.GEO_SIZE, np.int64)
    geo[[K.G_ROWS, K.G_COLS, K.G_TR, K.G_TC, K.G_BITS, K.G_PER, K.G_LANES, K.G_FAM, K.G_NGROUPS]] = (
        grid.rows, grid.cols, grid.tile_rows, grid.tile_cols, bits, per, lanes, family, n_groups)
    if fields:
        geo[K.G_F0BITS], geo[K.G_F0FLOAT] = fields[0].bits, fields[0].little_endian is not None
    if len(fields) > 1:
        geo[K.G_F1BITS] = fields[1].bits
    values, nested, off = np.zeros(1, f32), np.ones(1, f32), 0.0
    if family == K.BNB:
        values = np.ascontiguousarray(fmt.values, f32)
        if not geo[K.G_F0FLOAT]:  # absmax stored as 8-bit codes: de-nested with the per-tensor constants
            c = unpack_constants(np.asarray(constants, f32).reshape(-1))
            nested, off = np.ascontiguousarray(c["nested_absmax"]), float(c["offset"][0])
    geo[K.G_NESTED] = BNB_NESTED_BLOCKSIZE  # only read when absmax is nested
    return MatrixKernel(np.ascontiguousarray(bank[order]), np.ascontiguousarray(offset[order]), geo, cols,
                        values, nested, off)


def bank_list(banks: list[np.ndarray]) -> numba.typed.List:
    """The bank images as a numba list of read-only uint8 arrays (views of the maps: nothing is copied)."""
    out = numba.typed.List()
    for b in banks:
        v = np.asarray(b).view(np.ndarray)
        v.flags.writeable = False  # one compiled signature whatever the arrays (the maps are read-only)
        out.append(v)
    return out


class Rom:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        banks = manifest.banks
        self.word_bytes = banks.word_bytes
        self.n_banks = banks.count
        self.banks = [
            np.memmap(root / bank_file(b, self.n_banks), dtype=np.uint8, mode="r") for b in range(self.n_banks)
        ]
        self.bank_list = bank_list(self.banks)
        self._bank_address = np.array([b.ctypes.data for b in self.banks], np.int64)
        self.regions = manifest.regions
        self.index = manifest.region_ids()
        self._cache: dict[int, np.ndarray] = {}
        self._kernels: dict[int, MatrixKernel] = {}

    def tile_places(self, region: Region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bank, byte offset and byte size of every tile of a region, in storage order."""
        sizes = tile_sizes(region.format, region.grid, self.word_bytes)
        bank, offset = tile_locations(sizes // self.word_bytes, region.start_bank, region.extents, self.n_banks,
                                      self.word_bytes)
        return bank, offset, sizes

    def tiles(self, region: Region) -> list[np.ndarray]:
        """The bytes of every tile of a region, in storage order, read from the bank images."""
        bank, offset, sizes = self.tile_places(region)
        return [self.banks[b][o : o + s] for b, o, s in zip(bank.tolist(), offset.tolist(), sizes.tolist())]

    def constants(self, rid: int) -> np.ndarray | None:
        """The fp32 per-tensor constants of a region (its ``.qconst`` companion), or None."""
        cname = self.regions[rid].name + CONSTANTS_SUFFIX
        return self.value(self.index[cname]).reshape(-1) if cname in self.index else None

    def quantized(self, rid: int) -> QuantTensor:
        """The region's codes and parameters as stored."""
        region = self.regions[rid]
        consts = self.constants(rid)
        shape = tuple(region.shape)
        return unpack_tiles(region.format, self.tiles(region), region.grid,
                            shape if region.kind == MATRIX else (1, shape[0]),
                            {} if consts is None else unpack_constants(consts))

    def value(self, rid: int, cache: bool = True) -> np.ndarray:
        """The region's values as float32 (matrices [out, in], vectors [n]), decoded once and cached.

        ``cache=False`` decodes without keeping the result (what the emulator's numpy path and the golden model
        use for matrices); a region that is already cached is returned from the cache either way.
        """
        w = self._cache.get(rid)
        if w is None:
            w = codec_for(self.regions[rid].format).dequantize(self.quantized(rid)).astype(np.float32, copy=False)
            if self.regions[rid].kind == VECTOR:
                w = w.reshape(-1)
            w = np.ascontiguousarray(w)
            if cache:
                self._cache[rid] = w
        return w

    def kernel(self, rid: int) -> MatrixKernel:
        """The kernel plan of a matrix region, made once."""
        k = self._kernels.get(rid)
        if k is None:
            r = self.regions[rid]
            k = prepare(r.format, r.grid, r.start_bank, r.extents, self.n_banks, self.word_bytes,
                        self.constants(rid))
            if K.c_computes(k.geo):  # where each tile lies in this process' maps (they live as long as the Rom)
                address = self._bank_address[k.tile_bank] + k.tile_offset
                k = dataclasses.replace(k, c_args=K.c_plan(k.geo, address, k.tile_bank.shape[1], k.lane_cols))
            self._kernels[rid] = k
        return k

    def matmul(self, rid: int, x: np.ndarray, engine: str = "auto", width: int = 0,
               threads: int | None = None) -> np.ndarray:
        """``x @ W^T`` (float32 [T, out]) for matrix region rid, from its packed codes, on ``threads`` threads
        (None: numba's thread count, numba.set_num_threads); the result depends neither on how many nor on the
        engine (K.ENGINES), bit for bit."""
        k = self.kernel(rid)
        x = np.ascontiguousarray(x, f32).reshape(-1, int(k.geo[K.G_COLS]))
        return K.matmul(self.bank_list, k.tile_bank, k.tile_offset, k.geo, k.lane_cols, k.values, k.nested,
                        k.offset, x, k.c_args, engine, width, threads)

    def product(self, rid: int) -> Callable[[np.ndarray, int], np.ndarray] | None:
        """``x @ W^T`` for matrix region rid as ``f(x, threads)`` (x float32 [T, in], C-contiguous) when the C
        kernel computes it (its arguments bound once: K.c_product), else None. The same bits as ``matmul``."""
        c_args = self.kernel(rid).c_args
        return None if c_args is None else K.c_product(c_args)

    def product_with_lora(self, rid: int) -> Callable[[np.ndarray, int, tuple], tuple] | None:
        """``product`` with a LORA computed beside it (K.c_product_with_lora), or None where the C kernel does not
        compute the region."""
        c_args = self.kernel(rid).c_args
        return None if c_args is None else K.c_product_with_lora(c_args)

    def rows(self, rid: int, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of matrix region rid (float32 [n, in]), equal to ``value(rid)[ids]`` bit for bit."""
        k = self.kernel(rid)
        ids = np.ascontiguousarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= k.geo[K.G_ROWS]):
            raise IndexError(f"row ids outside [0, {int(k.geo[K.G_ROWS])})")
        return K.rows(self.bank_list, k.tile_bank, k.tile_offset, k.geo, k.lane_cols, k.values, k.nested,
                      k.offset, ids)
