"""Codes to bytes and back: sub-byte codes packed first-element-high (bitsandbytes' nibble order), 16/32-bit
codes little-endian (the order is a fact of the tile layout, docs/artifacts.md)."""

from __future__ import annotations

import numpy as np

_PACKABLE = (2, 4, 8, 16, 32)


def pack_codes(codes: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """Pack codes ``[..., n]`` along the last axis into uint8 ``[..., ceil(n*bits/8)]``.

    2/4 bits: the first element goes in the most significant bits; each row is padded to whole bytes with
    ``pad`` (bnb pads an odd 4-bit tensor with the code of 0.0). 8: as is. 16/32: little-endian bytes.
    """
    c = np.asarray(codes)
    if bits in (16, 32):
        le = c.astype("<u2" if bits == 16 else "<u4")
        return np.ascontiguousarray(le).view(np.uint8).reshape(*c.shape[:-1], c.shape[-1] * bits // 8)
    if bits not in _PACKABLE:
        raise ValueError(f"pack_codes: unsupported width {bits} bits ({', '.join(map(str, _PACKABLE))})")
    if c.size and int(c.max()) >> bits:
        raise ValueError(f"pack_codes: a code does not fit in {bits} bits")
    if bits == 8:
        return c.astype(np.uint8)
    per, n = 8 // bits, c.shape[-1]
    nbytes = -(-n // per)
    padded = np.full((*c.shape[:-1], nbytes * per), pad, np.uint8)
    padded[..., :n] = c
    g = padded.reshape(*c.shape[:-1], nbytes, per)
    out = g[..., 0] << (8 - bits)
    for k in range(1, per):
        out |= g[..., k] << (8 - bits * (k + 1))
    return out


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``[..., nbytes]`` -> ``[..., n]`` (uint8/uint16/uint32)."""
    p = np.asarray(packed, np.uint8)
    if bits not in _PACKABLE:
        raise ValueError(f"unpack_codes: unsupported width {bits} bits ({', '.join(map(str, _PACKABLE))})")
    need = -(-n * bits // 8)
    if p.shape[-1] < need:
        raise ValueError(f"unpack_codes: {p.shape[-1]} bytes cannot hold {n} codes of {bits} bits")
    if bits >= 8:
        raw = np.ascontiguousarray(p[..., :need])
        return raw if bits == 8 else raw.view(f"<u{bits // 8}").astype(f"u{bits // 8}")
    shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
    parts = (p[..., :need, None] >> shifts) & np.uint8((1 << bits) - 1)
    return parts.reshape(*p.shape[:-1], need * (8 // bits))[..., :n]
