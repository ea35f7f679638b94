"""Stored rows to tile bytes in one native pass, for ROMA's affine formats: what the emitter spends its CPU on.

``AffineCodec.quantize`` then :func:`romac.codecs.tiles.pack_tiles` is the definition: it widens the rows to
float32, makes a dozen temporaries per group and then reshuffles codes and parameters into tiles.
:func:`quantize_pack_tiles` gives the same bytes (``tests/test_affine_native.py``) from the rows as the checkpoint
stores them (fp16 / bf16 / fp32) with :func:`romac.codecs.affine_native.quantize_pack`, which writes each code,
scale and zero at its place in its tile. Where the tile's parts lie comes from :mod:`romac.spec.layout` and the
format's parameter fields, here; the kernel only follows the offsets. It releases the GIL, so the emitter's worker
threads quantize on both cores at once.

``ROMAC_NATIVE=0`` in the environment turns the native path off (everything then runs the numpy definition).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from romac.codecs import affine_native as kernel
from romac.codecs.base import QuantTensor
from romac.spec.formats import STORAGES, AffineFormat, WeightFormat
from romac.spec.layout import TileGrid, param_groups, row_bytes, tile_sizes

#: set to "0" to compute every affine tensor with the numpy definition
NATIVE_ENV = "ROMAC_NATIVE"
_SCALE, _ZERO = "scale", "zero"  # AffineCodec's parameter keys; the kernel stores them at the offsets given


def native_enabled() -> bool:
    """Whether the native path is on (read at every call, so that a test or a user can switch it)."""
    return os.environ.get(NATIVE_ENV, "1").strip() != "0"


def applies(fmt: WeightFormat, grid: TileGrid | None = None) -> bool:
    """Whether :func:`quantize_pack_tiles` computes this format (on this grid); otherwise use the definition."""
    if not (native_enabled() and isinstance(fmt, AffineFormat)):
        return False
    fields = {p.key: STORAGES[p.storage] for p in fmt.param_fields}
    if set(fields) != {_SCALE, _ZERO} or len(fmt.param_fields) != 2:
        return False
    scale, zero = fields[_SCALE], fields[_ZERO]
    if scale.dtype != np.float16 or not scale.little_endian or np.dtype(scale.little_endian) != np.dtype("<f2"):
        return False
    if zero.little_endian or 8 % zero.bits or 8 % fmt.code_bits or fmt.qmax > 255:
        return False
    # a group never straddles two tiles (the layout's groups start at tile boundaries)
    return grid is None or grid.tile_cols % fmt.group_size == 0


def _bits(stored: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The rows as the kernel reads them: (C-contiguous bit patterns [rows, cols], their kind)."""
    a = np.asarray(stored)
    if a.dtype == np.float16:
        return np.ascontiguousarray(a).view(np.uint16).reshape(shape), kernel.KIND_F16
    if a.dtype == ml_dtypes.bfloat16:
        return np.ascontiguousarray(a).view(np.uint16).reshape(shape), kernel.KIND_BF16
    # float32 as is; anything else (float64) widened or narrowed to float32 as the float loaders do
    return np.ascontiguousarray(a, np.float32).view(np.uint32).reshape(shape), kernel.KIND_F32


def tile_places(fmt: AffineFormat, grid: TileGrid, offsets: np.ndarray) -> np.ndarray:
    """Where each tile's parts go: [tile rows, tile cols, 6] of (code offset, code row stride, scale offset, its
    stride, zero offset, its stride) in bytes, for tiles starting at ``offsets`` (one per tile, storage order)."""
    nti, ntj = -(-grid.rows // grid.tile_rows), -(-grid.cols // grid.tile_cols)
    places = np.zeros((nti, ntj, 6), np.int64)

    def inner(rows: int, cols: int) -> np.ndarray:
        """One tile's part offsets and strides, relative to its start: codes, then the fields in their order."""
        place, pos = np.zeros(6, np.int64), rows * row_bytes(cols, fmt.code_bits)
        place[1] = row_bytes(cols, fmt.code_bits)
        for p in fmt.param_fields:
            stride = row_bytes(param_groups(fmt, cols), p.bits)
            col = 2 if p.key == _SCALE else 4
            place[col], place[col + 1] = pos, stride
            pos += rows * stride
        return place

    if grid.n_full:  # full tiles: one shape, so one set of offsets moved by each tile's start
        fr, fc = grid.full_rows, grid.full_cols
        start = offsets[: grid.n_full].reshape(fr, fc, 1)
        places[:fr, :fc] = inner(grid.tile_rows, grid.tile_cols) + start * np.array([1, 0, 1, 0, 1, 0])
    for k, (r0, c0, r, c) in enumerate(grid.edge_tiles(), start=grid.n_full):
        places[r0 // grid.tile_rows, c0 // grid.tile_cols] = inner(r, c) + offsets[k] * np.array([1, 0, 1, 0, 1, 0])
    return places


def quantize_pack_into(fmt: AffineFormat, stored: np.ndarray, grid: TileGrid, word_bytes: int,
                       at: np.ndarray | None = None) -> np.ndarray | None:
    """The tiles of rows ``stored`` in one buffer, tile k at byte ``at[k]`` (default: back to back in storage order;
    the emitter orders them by bank). None when a row is not finite or a scale leaves FP16: the caller then runs
    the definition, which says which and where."""
    x, kind = _bits(stored, (grid.rows, grid.cols))
    sizes = tile_sizes(fmt, grid, word_bytes)
    if at is None:
        at = np.cumsum(sizes) - sizes
    out = np.zeros(int(sizes.sum()), np.uint8)
    zero_bits = STORAGES[next(p.storage for p in fmt.param_fields if p.key == _ZERO)].bits
    status = kernel.quantize_pack(x, kind, fmt.group_size, np.float32(fmt.qmax), fmt.code_bits, zero_bits,
                                  grid.tile_rows, grid.tile_cols, tile_places(fmt, grid, at), out)
    return out if status == kernel.OK else None


def quantize_pack_tiles(fmt: AffineFormat, stored: np.ndarray, grid: TileGrid,
                        word_bytes: int) -> list[np.ndarray] | None:
    """``pack_tiles(fmt, AffineCodec(fmt).quantize(w), grid, word_bytes)`` for rows ``stored`` (``w`` as float32),
    or None where the definition must raise."""
    out = quantize_pack_into(fmt, stored, grid, word_bytes)
    if out is None:
        return None
    sizes = tile_sizes(fmt, grid, word_bytes)
    return np.split(out, np.cumsum(sizes)[:-1])


def quantize(fmt: AffineFormat, stored: np.ndarray) -> QuantTensor | None:
    """``AffineCodec(fmt).quantize`` of a 2-D matrix, natively (None where the definition must raise)."""
    rows, cols = np.shape(stored)
    x, kind = _bits(stored, (rows, cols))
    ng = -(-cols // fmt.group_size)
    codes, scale, zero = np.empty((rows, cols), np.uint8), np.empty((rows, ng), np.uint16), np.empty((rows, ng), np.uint8)
    if kernel.quantize_rows(x, kind, fmt.group_size, np.float32(fmt.qmax), codes, scale, zero) != kernel.OK:
        return None
    return QuantTensor(fmt.name, (rows, cols), codes, {_SCALE: scale.view(np.float16), _ZERO: zero})
