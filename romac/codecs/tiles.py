"""A quantized tensor to the ROM bytes of its tiles and back, vectorised over the full tiles (the layout is
:mod:`romac.spec.layout`'s; an independent slow decoder written from docs/artifacts.md is
:mod:`romac.emulator.trace`)."""

from __future__ import annotations

import numpy as np

from romac.codecs.base import QuantTensor
from romac.codecs.bits import pack_codes, unpack_codes
from romac.spec.formats import STORAGES, WeightFormat
from romac.spec.layout import TileGrid, param_groups, row_bytes, tile_bytes


def row_group_params(fmt: WeightFormat, q: QuantTensor) -> dict[str, np.ndarray]:
    """Each parameter as [rows, groups per row]; bitsandbytes' flat blocks are reshaped (rows must align)."""
    rows = q.shape[0] if len(q.shape) == 2 else 1
    out = {}
    for p in fmt.param_fields:
        v = q.params[p.key]
        out[p.key] = v.reshape(rows, -1) if v.ndim == 1 else v
    return out


def _pack_part(values: np.ndarray, storage: str) -> np.ndarray:
    """[..., n] parameter values -> [..., bytes] in ROM storage form."""
    s = STORAGES[storage]
    if s.little_endian:
        v = np.ascontiguousarray(values.astype(s.dtype).astype(s.little_endian))
        return v.view(np.uint8).reshape(*values.shape[:-1], -1)
    return pack_codes(values.astype(np.uint8), s.bits)


def pack_tiles(fmt: WeightFormat, q: QuantTensor, grid: TileGrid, word_bytes: int) -> list[np.ndarray]:
    """The ROM bytes of every tile of a quantized tensor, in storage order (each a uint8 array)."""
    codes = q.codes.reshape(grid.rows, grid.cols)
    params = row_group_params(fmt, q)
    tr, tc = grid.tile_rows, grid.tile_cols
    out: list[np.ndarray] = []
    # full tiles, vectorised: [full_rows, tr, full_cols, tc] -> per tile contiguous parts
    if grid.n_full:
        fr, fc = grid.full_rows, grid.full_cols
        c = codes[: fr * tr, : fc * tc].reshape(fr, tr, fc, tc).transpose(0, 2, 1, 3)
        parts = [pack_codes(c, fmt.code_bits).reshape(fr * fc, -1)]
        gpt = param_groups(fmt, tc)
        for p in fmt.param_fields:
            v = params[p.key][: fr * tr, : fc * gpt].reshape(fr, tr, fc, gpt).transpose(0, 2, 1, 3)
            parts.append(_pack_part(v, p.storage).reshape(fr * fc, -1))
        block = np.concatenate(parts, axis=1)
        size = tile_bytes(fmt, tr, tc, word_bytes)
        if block.shape[1] < size:
            block = np.pad(block, ((0, 0), (0, size - block.shape[1])))
        out.extend(block)
    for r0, c0, r, c in grid.edge_tiles():
        parts = [pack_codes(codes[r0 : r0 + r, c0 : c0 + c], fmt.code_bits).reshape(-1)]
        if fmt.group:
            g0, ng = c0 // fmt.group, param_groups(fmt, c)
            for p in fmt.param_fields:
                parts.append(_pack_part(params[p.key][r0 : r0 + r, g0 : g0 + ng], p.storage).reshape(-1))
        t = np.concatenate(parts)
        out.append(np.pad(t, (0, tile_bytes(fmt, r, c, word_bytes) - t.size)))
    return out


def _unpack_part(data: np.ndarray, storage: str, n: int) -> np.ndarray:
    """[..., bytes] -> [..., n] parameter values."""
    s = STORAGES[storage]
    if s.little_endian:
        return np.ascontiguousarray(data).view(s.little_endian).astype(s.dtype)
    return unpack_codes(data, s.bits, n)


def unpack_tiles(fmt: WeightFormat, tiles: list[np.ndarray], grid: TileGrid, shape: tuple[int, ...],
                 constants: dict) -> QuantTensor:
    """Inverse of :func:`pack_tiles`: rebuild the QuantTensor from the tiles' bytes (storage order)."""
    rows, cols, tr, tc = grid.rows, grid.cols, grid.tile_rows, grid.tile_cols
    codes = np.empty((rows, cols), dtype=np.uint8 if fmt.code_bits <= 8 else f"uint{fmt.code_bits}")
    ng_row = param_groups(fmt, cols)
    params = {p.key: np.empty((rows, ng_row), STORAGES[p.storage].dtype) for p in fmt.param_fields}
    if grid.n_full:
        fr, fc, gpt = grid.full_rows, grid.full_cols, param_groups(fmt, tc)
        block = np.stack(tiles[: grid.n_full])
        pos, cb = 0, tr * row_bytes(tc, fmt.code_bits)
        c = unpack_codes(block[:, pos : pos + cb].reshape(fr, fc, tr, -1), fmt.code_bits, tc)
        codes[: fr * tr, : fc * tc] = c.transpose(0, 2, 1, 3).reshape(fr * tr, fc * tc)
        pos += cb
        for p in fmt.param_fields:
            nb = tr * row_bytes(gpt, p.bits)
            v = _unpack_part(block[:, pos : pos + nb].reshape(fr, fc, tr, -1), p.storage, gpt)
            params[p.key][: fr * tr, : fc * gpt] = v.transpose(0, 2, 1, 3).reshape(fr * tr, fc * gpt)
            pos += nb
    for data, (r0, c0, r, c) in zip(tiles[grid.n_full :], grid.edge_tiles()):
        cb = r * row_bytes(c, fmt.code_bits)
        codes[r0 : r0 + r, c0 : c0 + c] = unpack_codes(data[:cb].reshape(r, -1), fmt.code_bits, c)
        pos = cb
        if fmt.group:
            g0, ng = c0 // fmt.group, param_groups(fmt, c)
            for p in fmt.param_fields:
                nb = r * row_bytes(ng, p.bits)
                params[p.key][r0 : r0 + r, g0 : g0 + ng] = _unpack_part(data[pos : pos + nb].reshape(r, -1), p.storage, ng)
                pos += nb
    flat_params = {k: (v.reshape(-1) if fmt.flat_blocks else v) for k, v in params.items()}
    return QuantTensor(fmt.name, tuple(shape), codes.reshape(shape), flat_params, dict(constants))


def pack_constants(q: QuantTensor) -> np.ndarray:
    """The constants vector: offset, then the nested absmax values (fp32)."""
    return np.concatenate([q.constants["offset"].reshape(1), q.constants["nested_absmax"]]).astype(np.float32)


def unpack_constants(values: np.ndarray) -> dict[str, np.ndarray]:
    return {"offset": values[:1].astype(np.float32), "nested_absmax": values[1:].astype(np.float32)}
