"""ROMA's affine grid as the quantizers see it: groups, codes for a given (scale, zero), errors, QuantTensor.

The grid is :class:`romac.codecs.AffineCodec`'s, and only that: per group of ``g`` consecutive elements of a row
(the last group of a row may be shorter) one float16 scale ``s`` > 0 and one integer zero ``z`` in
``[0, 2**k - 1]``; codes ``q`` in the same range; value ``float32(s) * (q - z)``, exact in float32.
Every quantizer in this package chooses (s, z, q) and returns them through :func:`to_quant_tensor`, so whatever
an algorithm optimises, what it hands on is a tensor the chip's L-Units decode bit for bit.

Groups are handled as a padded ``[rows, G, g]`` view plus a validity mask: a partial last group (SmolLM2's
576 = 4.5 x 128) is padded with zeros that carry zero weight in every error sum, so one vectorised code path
serves full and partial groups alike.
"""

from __future__ import annotations

import numpy as np

from romac.codecs import AffineCodec, QuantTensor
from romac.errors import RomacError

f32 = np.float32
FP16_TINY = np.float16(2.0 ** -24)     # the smallest positive float16 (a subnormal): AffineCodec's floor too
FP16_MAX = np.float16(65504.0)


def qmax_of(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise RomacError(f"the affine grid has 2, 4 or 8 bits, not {bits}", where="quantize",
                         hint="choose int2, int4 or int8")
    return (1 << bits) - 1


def num_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def grouped(a: np.ndarray, group_size: int, fill: float = 0.0) -> np.ndarray:
    """``[rows, cols]`` -> ``[rows, G, g]`` float32, the partial last group padded with ``fill``."""
    rows, cols = a.shape
    ng = num_groups(cols, group_size)
    if ng * group_size == cols:
        return np.ascontiguousarray(a, f32).reshape(rows, ng, group_size)
    out = np.full((rows, ng * group_size), fill, f32)
    out[:, :cols] = a
    return out.reshape(rows, ng, group_size)


def group_mask(cols: int, group_size: int) -> np.ndarray:
    """``[G, g]`` float32: 1 where a padded group slot holds a real column."""
    ng = num_groups(cols, group_size)
    return (np.arange(ng * group_size) < cols).astype(f32).reshape(ng, group_size)


def ungrouped(a: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`grouped`: ``[rows, G, g]`` -> ``[rows, cols]``."""
    return a.reshape(a.shape[0], -1)[:, :cols]


def as_fp16_scale(s: np.ndarray) -> np.ndarray:
    """A candidate scale rounded onto what the ROM stores: a finite float16 > 0 (tiny values floor at 2^-24)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s16 = np.asarray(s, f32).astype(np.float16)
    s16 = np.where(np.isfinite(s16) & (s16 > 0), s16, np.where(np.asarray(s) > 0, FP16_MAX, FP16_TINY))
    return np.maximum(s16, FP16_TINY).astype(np.float16)


def codes_for(wg: np.ndarray, s16: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    """Nearest codes on the grid (s, z), computed exactly as AffineCodec does: ``clip(rint(w / s) + z)``.

    ``wg`` is ``[..., g]``; ``s16`` / ``z`` broadcast with ``wg[..., 0]``. For a fixed (s, z) the nearest level
    is the L2-optimal code, so every data-free search below only has to choose (s, z).
    """
    s = np.asarray(s16, np.float16).astype(f32)[..., None]
    t = np.rint(wg / s)
    t += np.asarray(z, f32)[..., None]
    return np.clip(t, 0, qmax_of(bits), out=t)


def dequant_grouped(q: np.ndarray, s16: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``float32(s) * (q - z)`` on grouped arrays (exact in float32, as the codec)."""
    return np.asarray(s16, np.float16).astype(f32)[..., None] * (q - np.asarray(z, f32)[..., None])


def group_sq_error(wg: np.ndarray, s16: np.ndarray, z: np.ndarray, bits: int,
                   weight: np.ndarray | None = None) -> np.ndarray:
    """Per-group (optionally column-weighted) squared error of the nearest codes on (s, z): ``[..., ]``.

    ``weight`` broadcasts with ``wg`` (a ``[G, g]`` mask, or mask x diag(H) for activation-aware fits).
    """
    e = wg - dequant_grouped(codes_for(wg, s16, z, bits), s16, z)
    e *= e
    if weight is not None:
        e *= weight
    return e.sum(-1)


def rtn_params(wg: np.ndarray, mask: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """AffineCodec's own (s, z) per group (lo = min(0, min g), hi = max(0, max g)), on grouped arrays.

    Padding slots are excluded by the mask (a zero pad never changes min(0, .)/max(0, .) anyway).
    """
    qmax = f32(qmax_of(bits))
    big = np.where(mask > 0, 0, np.inf).astype(f32)
    lo = np.minimum((wg + big).min(-1), 0)
    hi = np.maximum((wg - big).max(-1), 0)
    with np.errstate(over="ignore", invalid="ignore"):
        s16 = ((hi - lo) / qmax).astype(np.float16)
    s16[hi == lo] = 1.0
    s16[(s16 == 0) & (hi > lo)] = FP16_TINY
    if not np.isfinite(s16).all():
        raise RomacError("weights exceed the FP16 scale range (or are not finite)", where="quantize",
                         hint="clip or rescale the matrix")
    z = np.clip(np.rint(-lo / s16.astype(f32)), 0, qmax)
    return s16, z.astype(f32)


def best_zero(wg: np.ndarray, s16: np.ndarray, bits: int, weight: np.ndarray | None,
              z_hint: np.ndarray, spread: int) -> tuple[np.ndarray, np.ndarray]:
    """For fixed scales, the best integer zero among ``z_hint + [-spread, spread]`` (clipped): (z, error)."""
    qmax = qmax_of(bits)
    best_z, best_e = None, None
    if 2 * spread >= qmax:   # the window covers the whole range: try each zero once
        cands = [np.full_like(np.asarray(z_hint, f32), v) for v in range(qmax + 1)]
    else:
        cands = [np.clip(z_hint + dz, 0, qmax) for dz in range(-spread, spread + 1)]
    sc = np.asarray(s16, np.float16).astype(f32)[..., None]
    r = np.rint(wg / sc)                 # the unclipped code offsets; z only decides what gets clipped
    for z in cands:
        zz = np.asarray(z, f32)[..., None]
        t = np.maximum(r, -zz)          # == clip(rint(w/s) + z, 0, qmax) - z, exactly (small integers)
        np.minimum(t, qmax - zz, out=t)
        t *= sc
        np.subtract(wg, t, out=t)
        t *= t
        if weight is not None:
            t *= weight
        e = t.sum(-1)
        if best_e is None:
            best_z, best_e = z, e
        else:
            better = e < best_e
            best_z, best_e = np.where(better, z, best_z), np.where(better, e, best_e)
    return best_z, best_e


def refit_scale(wg: np.ndarray, q: np.ndarray, z: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """Least-squares scale for fixed codes and zero: ``s = Σ w·(q−z)·c / Σ (q−z)²·c`` (float32, not rounded)."""
    d = q - np.asarray(z, f32)[..., None]
    c = d if weight is None else d * weight
    num, den = (wg * c).sum(-1), (d * c).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, 0).astype(f32)


def to_quant_tensor(q_grouped: np.ndarray, s16: np.ndarray, z: np.ndarray, bits: int, cols: int) -> QuantTensor:
    """Pack grouped codes and per-group (s, z) into the QuantTensor AffineCodec(bits, g).dequantize reads."""
    qmax = qmax_of(bits)
    s16 = np.asarray(s16, np.float16)
    if not (np.isfinite(s16).all() and (s16 > 0).all()):
        raise AssertionError("a quantizer produced a non-finite or non-positive scale")   # a bug, not user input
    z = np.asarray(z)
    if z.min(initial=0) < 0 or z.max(initial=0) > qmax or not np.array_equal(z, np.rint(z)):
        raise AssertionError("a quantizer produced a zero point off the integer grid")
    codes = ungrouped(np.asarray(q_grouped), cols)
    rows = codes.shape[0]
    return QuantTensor(f"int{bits}", (rows, cols), np.ascontiguousarray(codes, np.uint8),
                       {"scale": np.ascontiguousarray(s16), "zero": np.ascontiguousarray(z.astype(np.uint8))})


def dequantize(qt: QuantTensor, group_size: int) -> np.ndarray:
    """The float32 matrix the ROM holds: AffineCodec's own decoder (the definition, not a re-implementation)."""
    return AffineCodec(int(qt.format[3:]), group_size).dequantize(qt)


def check_matrix(w: np.ndarray, where: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise RomacError(f"expected a non-empty 2-D [out, in] matrix, got shape {w.shape}", where=where)
    w = np.ascontiguousarray(w, f32)
    if not np.isfinite(w).all():
        raise RomacError("matrix holds inf or NaN", where=where, hint="quantize finite weights")
    return w
