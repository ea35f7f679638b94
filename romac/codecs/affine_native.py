"""AffineCodec's quantizer as a native kernel (numba): the same float32 operations, in the same order, per element.

:meth:`romac.codecs.affine.AffineCodec.quantize` is the definition; these kernels compute exactly its codes, FP16
scales and zero points (``tests/test_affine_native.py`` checks it bit for bit), without numpy's temporaries: the
compile of an 8B model spent most of its CPU in that function and in widening fp16 rows to float32 for it.
Why the results are identical:
- every arithmetic step is a float32 operation numpy also does: ``(hi - lo) / qmax``, ``-lo / s``, ``w / s``,
  ``rint(..) + z``, clipping (no fast-math: no reciprocal, no fused multiply-add, no reassociation);
- ``np.rint`` rounds half to even, as numpy's does;
- float32 -> float16 is numpy's own bit-level algorithm (``npy_floatbits_to_halfbits``, round to nearest even);
  float16 -> float32 is exact; both work on bit patterns and never compute with a subnormal, so an FTZ/DAZ mode
  cannot change them;
- a group's min and max are taken on order-preserving integer keys of the float bits (which vectorise, unlike
  float compares): the same values, except that the sign of a zero may differ, which changes no code or scale.
Kernels release the GIL (``nogil``): the emitter runs them on row chunks in threads, one per core. They report a
problem (a non-finite weight, a scale beyond FP16) by a status and leave the message to the numpy path, which the
caller re-runs: error texts have one definition too.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"cache": True, "nogil": True}

#: what a kernel returns
OK, NOT_FINITE, SCALE_RANGE = 0, 1, 2
#: how the input's bits are read: fp16 and bf16 arrive as uint16 bit patterns, fp32 as uint32
KIND_F16, KIND_BF16, KIND_F32 = 0, 1, 2

_F16_ONE = 0x3C00  # 1.0: the scale of a group whose range is empty (hi == lo)
_F16_TINY = 0x0001  # 2**-24, the smallest subnormal: the scale of a nonzero range that rounds to 0
_MAGIC = np.uint32(113 << 23).view(np.float32)  # 2**-14: subtracting it turns a biased fp16 subnormal into its value
_U = np.uint32


@njit(**_JIT)
def f32_to_f16_bits(x: np.float32) -> int:
    """numpy's float32 -> float16 (round to nearest even, overflow to inf), on the bit patterns."""
    f = np.int64(np.float32(x).view(np.uint32))
    sgn = (f & 0x80000000) >> 16
    f_exp = f & 0x7F800000
    if f_exp >= 0x47800000:  # overflow, inf or nan
        f_sig = f & 0x007FFFFF
        if f_exp == 0x7F800000 and f_sig != 0:
            ret = 0x7C00 + (f_sig >> 13)
            return sgn + (ret + 1 if ret == 0x7C00 else ret)  # a nan stays a nan
        return sgn + 0x7C00
    if f_exp <= 0x38000000:  # a float16 subnormal or signed zero
        if f_exp < 0x33000000:
            return sgn
        e = f_exp >> 23
        f_sig = (0x00800000 + (f & 0x007FFFFF)) >> (113 - e)
        if (f_sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:
            f_sig += 0x1000
        return sgn + (f_sig >> 13)
    h_exp = (f_exp - 0x38000000) >> 13
    f_sig = f & 0x007FFFFF
    if (f_sig & 0x3FFF) != 0x1000:
        f_sig += 0x1000
    return sgn + h_exp + (f_sig >> 13)  # a carry out of the significand bumps the exponent (up to inf): correct


@njit(**_JIT)
def f16_bits_to_f32(h) -> np.float32:
    """A finite float16 bit pattern as float32, exactly (branch-free, so that a loop of it vectorises)."""
    em = _U(h) & _U(0x7FFF)
    u = (em << _U(13)) + _U(0x38000000)  # rebias the exponent: right for normals
    normal = np.uint32(u).view(np.float32)
    sub = np.uint32(u + _U(0x00800000)).view(np.float32) - _MAGIC  # exact: both operands are normal floats
    v = normal if em >= _U(0x0400) else sub
    return np.uint32(np.float32(v).view(np.uint32) | ((_U(h) & _U(0x8000)) << _U(16))).view(np.float32)


@njit(**_JIT)
def widen_row(src: np.ndarray, kind: int, dst: np.ndarray) -> bool:
    """One row's stored bits (``kind``) -> float32 ``dst``; False if any value is inf or nan."""
    bad = False
    if kind == KIND_F32:
        for c in range(src.size):
            u = _U(src[c])
            bad |= (u & _U(0x7F800000)) == _U(0x7F800000)
            dst[c] = np.uint32(u).view(np.float32)
    elif kind == KIND_BF16:
        for c in range(src.size):
            u = _U(src[c])
            bad |= (u & _U(0x7F80)) == _U(0x7F80)
            dst[c] = np.uint32(u << _U(16)).view(np.float32)
    else:
        for c in range(src.size):
            bad |= (_U(src[c]) & _U(0x7C00)) == _U(0x7C00)
            dst[c] = f16_bits_to_f32(src[c])
    return not bad


@njit(**_JIT)
def group_range(keys: np.ndarray, j0: int, n: int) -> tuple:
    """(min(0, min g), max(0, max g)) of the floats whose int32 bits are ``keys[j0:j0+n]``.

    ``s ^ ((s >> 31) & 0x7fffffff)`` orders float bit patterns as integers (finite values; -0 just below +0).
    """
    g = keys[j0:j0 + n]  # indexed by a range: no negative-index check, so the loop vectorises
    lo = np.int32(0)
    hi = np.int32(0)
    for k in range(n):
        s = g[k]
        key = s ^ ((s >> 31) & np.int32(0x7FFFFFFF))
        lo = key if key < lo else lo
        hi = key if key > hi else hi
    lo = np.int32(lo ^ ((lo >> 31) & np.int32(0x7FFFFFFF)))
    hi = np.int32(hi ^ ((hi >> 31) & np.int32(0x7FFFFFFF)))
    return np.int32(lo).view(np.float32), np.int32(hi).view(np.float32)


@njit(**_JIT)
def quantize_group(row: np.ndarray, keys: np.ndarray, j0: int, n: int, qmax: np.float32, q: np.ndarray) -> tuple:
    """Codes of ``row[j0:j0+n]`` into ``q[:n]``; returns (scale bits, zero, status) as AffineCodec computes them."""
    lo, hi = group_range(keys, j0, n)
    if hi == lo:
        h = _F16_ONE
    else:
        h = f32_to_f16_bits((hi - lo) / qmax)
        if (h & 0x7FFF) == 0:
            h = _F16_TINY
        elif (h & 0x7C00) == 0x7C00:
            return h, 0, SCALE_RANGE
    s = f16_bits_to_f32(h)
    z = min(max(np.rint(-lo / s), np.float32(0.0)), qmax)
    g = row[j0:j0 + n]
    for k in range(n):  # selects and an int32 step: these vectorise (min/max and float -> uint8 do not)
        t = np.rint(g[k] / s) + z
        t = t if t > np.float32(0.0) else np.float32(0.0)
        t = t if t < qmax else qmax
        q[k] = np.uint8(np.int32(t))
    return h, np.int64(z), OK


@njit(**_JIT)
def quantize_rows(x: np.ndarray, kind: int, group: int, qmax: np.float32, codes: np.ndarray,
                  scale_bits: np.ndarray, zeros: np.ndarray) -> int:
    """AffineCodec.quantize of ``x`` (bits of ``kind``) into codes [rows, cols], scale bits and zeros [rows, groups]."""
    rows, cols = x.shape
    row = np.empty(cols, np.float32)
    keys = row.view(np.int32)
    q = np.empty(group, np.uint8)
    for r in range(rows):
        if not widen_row(x[r], kind, row):
            return NOT_FINITE
        for gi in range((cols + group - 1) // group):
            j0 = gi * group
            n = min(group, cols - j0)
            h, z, status = quantize_group(row, keys, j0, n, qmax, q)
            if status != OK:
                return status
            codes[r, j0:j0 + n] = q[:n]
            scale_bits[r, gi] = h
            zeros[r, gi] = z
    return OK


@njit(**_JIT)
def put_bits(out: np.ndarray, base: int, p: int, q: np.ndarray, n: int, bits: int) -> None:
    """Pack ``q[:n]`` as elements ``p ..`` of the row at ``out[base:]`` (first element in the high bits, as
    :func:`romac.codecs.bits.pack_codes`); ``out`` starts zeroed, so the bits of shared bytes are or-ed in."""
    if bits == 8:
        out[base + p:base + p + n] = q[:n]
        return
    per = 8 // bits
    k = 0
    while k < n and ((p + k) * bits) & 7:  # up to the next whole byte
        out[base + (((p + k) * bits) >> 3)] |= q[k] << (8 - bits - (((p + k) * bits) & 7))
        k += 1
    b0 = base + (((p + k) * bits) >> 3)
    whole = (n - k) // per
    o, c = out[b0:b0 + whole], q[k:k + whole * per]  # range-indexed views (see group_range)
    if bits == 2:
        for m in range(whole):
            o[m] = (c[4 * m] << 6) | (c[4 * m + 1] << 4) | (c[4 * m + 2] << 2) | c[4 * m + 3]
    else:
        for m in range(whole):
            o[m] = (c[2 * m] << 4) | c[2 * m + 1]
    for k in range(k + whole * per, n):
        out[base + (((p + k) * bits) >> 3)] |= q[k] << (8 - bits - (((p + k) * bits) & 7))


@njit(**_JIT)
def quantize_pack(x: np.ndarray, kind: int, group: int, qmax: np.float32, code_bits: int, zero_bits: int,
                  tile_rows: int, tile_cols: int, places: np.ndarray, out: np.ndarray) -> int:
    """Quantize rows ``x`` and write every code, scale and zero straight into its tile's bytes in ``out`` (zeroed).

    ``places[i, j]`` describes the tile in tile-row i, tile-column j: (code offset, code row stride, scale offset,
    scale row stride, zero offset, zero row stride), in bytes of ``out`` (:mod:`romac.codecs.affine_tiles`
    computes them from the layout); scales are stored as two little-endian bytes.
    """
    rows, cols = x.shape
    row = np.empty(cols, np.float32)
    keys = row.view(np.int32)
    q = np.empty(group, np.uint8)
    z1 = np.empty(1, np.uint8)
    for r in range(rows):
        if not widen_row(x[r], kind, row):
            return NOT_FINITE
        i, rr = r // tile_rows, r % tile_rows
        for gi in range((cols + group - 1) // group):
            j0 = gi * group
            n = min(group, cols - j0)
            h, z, status = quantize_group(row, keys, j0, n, qmax, q)
            if status != OK:
                return status
            j = j0 // tile_cols
            p = j0 - j * tile_cols  # the group's first column within its tile
            t = places[i, j]
            put_bits(out, t[0] + rr * t[1], p, q, n, code_bits)
            s = t[2] + rr * t[3] + 2 * (p // group)
            out[s] = h & 0xFF
            out[s + 1] = h >> 8
            z1[0] = z
            put_bits(out, t[4] + rr * t[5], p // group, z1, 1, zero_bits)
    return OK
