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
- a group's min and max are taken on order-preserving integer keys of the float bits: the same values, except
  that the sign of a zero may differ, which changes no code or scale.
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
_I = np.uint64  # an index numba knows to be non-negative


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
def widen(src: np.ndarray, j0: int, n: int, kind: int, dst: np.ndarray) -> bool:
    """Stored bits ``src[j0:j0+n]`` (``kind``) -> float32 ``dst[:n]``; False if any value is inf or nan."""
    bad = False
    if kind == KIND_F32:
        for k in range(n):
            u = _U(src[_I(j0 + k)])
            bad |= (u & _U(0x7F800000)) == _U(0x7F800000)
            dst[k] = np.uint32(u).view(np.float32)
    elif kind == KIND_BF16:
        for k in range(n):
            u = _U(src[_I(j0 + k)])
            bad |= (u & _U(0x7F80)) == _U(0x7F80)
            dst[k] = np.uint32(u << _U(16)).view(np.float32)
    else:
        for k in range(n):
            h = src[_I(j0 + k)]
            bad |= (_U(h) & _U(0x7C00)) == _U(0x7C00)
            dst[k] = f16_bits_to_f32(h)
    return not bad


@njit(**_JIT)
def widen_row(src: np.ndarray, kind: int, dst: np.ndarray) -> bool:
    """A whole row's stored bits -> float32 ``dst``; False if any value is inf or nan."""
    return widen(src, 0, src.size, kind, dst)


@njit(**_JIT)
def quantize_row(src: np.ndarray, kind: int, group: int, qmax: np.float32, q: np.ndarray, scale_bits: np.ndarray,
                 zeros: np.ndarray, g: np.ndarray) -> int:
    """One row (stored bits of ``kind``) as AffineCodec quantizes it: codes into ``q``, each group's scale bits and
    zero; returns a status. ``g`` (float32, a group long) holds the group being quantized, which stays in L1.

    Indices are unsigned (``_I``) so that numba adds no negative-index wraparound, which would stop the loops
    from vectorising. A group's min and max are taken on the float bits as integers, ``s ^ ((s >> 31) &
    0x7fffffff)`` ordering them as the floats are ordered (finite values; -0 just below +0), as integer min/max
    vectorise and float compares do not.
    """
    keys = g.view(np.int32)
    cols = src.size
    for gi in range((cols + group - 1) // group):
        j0 = gi * group
        n = min(group, cols - j0)
        if not widen(src, j0, n, kind, g):
            return NOT_FINITE
        lo = np.int32(0)  # lo = min(0, min g), hi = max(0, max g)
        hi = np.int32(0)
        for k in range(n):
            b = keys[k]
            key = b ^ ((b >> 31) & np.int32(0x7FFFFFFF))
            lo = key if key < lo else lo
            hi = key if key > hi else hi
        lof = np.int32(lo ^ ((lo >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)
        hif = np.int32(hi ^ ((hi >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)
        if hif == lof:
            h = _F16_ONE
        else:
            h = f32_to_f16_bits((hif - lof) / qmax)
            if (h & 0x7FFF) == 0:
                h = _F16_TINY
            elif (h & 0x7C00) == 0x7C00:
                return SCALE_RANGE
        s = f16_bits_to_f32(h)
        z = min(max(np.rint(-lof / s), np.float32(0.0)), qmax)
        for k in range(n):  # selects and an int32 step, which vectorise (min/max and float -> uint8 do not)
            t = np.rint(g[k] / s) + z
            t = t if t > np.float32(0.0) else np.float32(0.0)
            t = t if t < qmax else qmax
            q[_I(j0 + k)] = np.uint8(np.int32(t))
        scale_bits[gi] = h
        zeros[gi] = np.uint8(np.int32(z))
    return OK


@njit(**_JIT)
def quantize_rows(x: np.ndarray, kind: int, group: int, qmax: np.float32, codes: np.ndarray,
                  scale_bits: np.ndarray, zeros: np.ndarray) -> int:
    """AffineCodec.quantize of ``x`` (bits of ``kind``) into codes [rows, cols], scale bits and zeros [rows, groups]."""
    g = np.empty(group, np.float32)
    for r in range(x.shape[0]):
        status = quantize_row(x[r], kind, group, qmax, codes[r], scale_bits[r], zeros[r], g)
        if status != OK:
            return status
    return OK


@njit(**_JIT)
def put_bits(q: np.ndarray, c0: int, n: int, bits: int, out: np.ndarray, base: int) -> None:
    """Pack ``q[c0:c0+n]`` into the row at ``out[base:]``, first element in the high bits (as
    :func:`romac.codecs.bits.pack_codes`); ``out`` starts zeroed, so a last partial byte is or-ed in."""
    if bits == 8:
        for k in range(n):
            out[_I(base + k)] = q[_I(c0 + k)]
        return
    per = 8 // bits
    whole = n // per
    if bits == 2:
        for m in range(whole):
            e = _I(c0 + 4 * m)
            out[_I(base + m)] = (q[e] << 6) | (q[e + _I(1)] << 4) | (q[e + _I(2)] << 2) | q[e + _I(3)]
    else:
        for m in range(whole):
            e = _I(c0 + 2 * m)
            out[_I(base + m)] = (q[e] << 4) | q[e + _I(1)]
    for k in range(whole * per, n):
        out[_I(base + ((k * bits) >> 3))] |= q[_I(c0 + k)] << (8 - bits - ((k * bits) & 7))


@njit(**_JIT)
def quantize_pack(x: np.ndarray, kind: int, group: int, qmax: np.float32, code_bits: int, zero_bits: int,
                  tile_rows: int, tile_cols: int, places: np.ndarray, out: np.ndarray) -> int:
    """Quantize rows ``x`` and write every code, scale and zero straight into its tile's bytes in ``out`` (zeroed).

    ``places[i, j]`` describes the tile in tile-row i, tile-column j: (code offset, code row stride, scale offset,
    scale row stride, zero offset, zero row stride), in bytes of ``out`` (:mod:`romac.codecs.affine_tiles`
    computes them from the layout); a tile starts on a group boundary; scales are two little-endian bytes.
    """
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    g, q = np.empty(group, np.float32), np.empty(cols, np.uint8)
    scale_bits, zeros = np.empty(ng, np.int64), np.empty(ng, np.uint8)
    gpt = tile_cols // group
    for r in range(rows):
        status = quantize_row(x[r], kind, group, qmax, q, scale_bits, zeros, g)
        if status != OK:
            return status
        i, rr = r // tile_rows, r % tile_rows
        for j in range((cols + tile_cols - 1) // tile_cols):  # the row's stretch of each tile
            n = min(tile_cols, cols - j * tile_cols)
            ngt = (n + group - 1) // group
            put_bits(q, j * tile_cols, n, code_bits, out, places[i, j, 0] + rr * places[i, j, 1])
            base = places[i, j, 2] + rr * places[i, j, 3]
            for m in range(ngt):
                h = scale_bits[_I(j * gpt + m)]
                out[_I(base + 2 * m)] = h & 0xFF
                out[_I(base + 2 * m + 1)] = h >> 8
            put_bits(zeros, j * gpt, ngt, zero_bits, out, places[i, j, 4] + rr * places[i, j, 5])
    return OK
