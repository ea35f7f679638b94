"""ROMA's affine unsigned k-bit format (``int8`` / ``int4`` / ``int2``): round-to-nearest with min/max ranges.

The format's facts (code bits, the FP16 scale and k-bit zero, the group size) are in :mod:`romac.spec.formats`;
other ways to choose codes on the same grid are the quantizers (:mod:`romac.quantize`).
"""

from __future__ import annotations

import numpy as np

from romac.codecs.base import CHUNK, Codec, QuantTensor
from romac.errors import RomacError
from romac.spec.formats import AffineFormat, affine_format

f32 = np.float32


class AffineCodec(Codec):
    """ROMA's affine unsigned k-bit format on a 2-D ``[rows, cols]`` matrix.

    Groups are ``group_size`` consecutive elements of a row (the last group of a row may be shorter).
    Per group, in float32: ``lo = min(0, min g)``, ``hi = max(0, max g)``, ``qmax = 2**k - 1``;
    ``s = float16((hi - lo) / qmax)`` (round to nearest even; 1.0 when hi == lo; the smallest float16
    subnormal if it rounds to 0; overflow is an error); ``z = clip(rint(-lo / s), 0, qmax)``;
    ``q = clip(rint(w / s) + z, 0, qmax)``.  Dequantization ``float32(s) * (q - z)`` is exact in float32.
    """

    def __init__(self, fmt: AffineFormat | int, group_size: int = 128) -> None:
        """``AffineCodec(fmt)``, or ``AffineCodec(bits, group_size)`` for the format of those bits."""
        if not isinstance(fmt, AffineFormat):
            fmt = affine_format(int(fmt), group_size)
        super().__init__(fmt)
        self.group = fmt.group_size
        self.qmax = f32(fmt.qmax)

    def _groups(self, a: np.ndarray):
        """(full groups [r, G, g], partial last group [r, 1, cols % g] or None)."""
        full = a.shape[1] // self.group * self.group
        part = a[:, full:, None].swapaxes(1, 2) if full < a.shape[1] else None
        return a[:, :full].reshape(a.shape[0], -1, self.group), part

    def quantize(self, w: np.ndarray) -> QuantTensor:
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{self.name} quantizes 2-D [rows, cols] matrices, got shape {w.shape}")
        (rows, cols), ng = w.shape, -(-w.shape[1] // self.group)
        scale, zero = np.empty((rows, ng), np.float16), np.empty((rows, ng), np.uint8)
        codes, per = np.empty((rows, cols), np.uint8), max(1, CHUNK // max(cols, 1))
        for r0 in range(0, rows, per):
            x = np.ascontiguousarray(w[r0:r0 + per], dtype=f32)
            qs = []
            for gi, g in zip((slice(0, cols // self.group), slice(cols // self.group, ng)), self._groups(x)):
                if g is None or g.shape[1] == 0:
                    continue
                lo, hi = np.minimum(g.min(2), f32(0)), np.maximum(g.max(2), f32(0))
                with np.errstate(over="ignore", invalid="ignore"):
                    s16 = ((hi - lo) / self.qmax).astype(np.float16)
                s16[hi == lo] = 1.0
                s16[(s16 == 0) & (hi > lo)] = np.float16(2.0 ** -24)
                if not np.isfinite(s16).all():
                    raise RomacError("weights exceed the FP16 scale range (or are not finite)",
                                     where=f"{self.name} group", hint="clip or rescale the matrix")
                s = s16.astype(f32)[..., None]
                z = np.clip(np.rint(-lo[..., None] / s), f32(0), self.qmax)
                t = np.rint(g / s)
                t += z
                qs.append(np.clip(t, f32(0), self.qmax, out=t).astype(np.uint8).reshape(len(x), -1))
                scale[r0:r0 + len(x), gi], zero[r0:r0 + len(x), gi] = s16, z[..., 0].astype(np.uint8)
            codes[r0:r0 + len(x)] = np.concatenate(qs, axis=1) if len(qs) > 1 else qs[0]
        return QuantTensor(self.name, (rows, cols), codes, {"scale": scale, "zero": zero})

    def dequantize(self, q: QuantTensor) -> np.ndarray:
        rows, cols = q.shape
        out, nfull, per = np.empty((rows, cols), f32), cols // self.group, max(1, CHUNK // max(cols, 1))
        s, z = q.params["scale"].astype(f32), q.params["zero"].astype(f32)
        for r0 in range(0, rows, per):
            r = slice(r0, r0 + per)
            full, part = self._groups(q.codes[r])
            o_full, o_part = self._groups(out[r])
            o_full[...] = s[r, :nfull, None] * (full.astype(f32) - z[r, :nfull, None])
            if part is not None:
                o_part[...] = s[r, nfull:, None] * (part.astype(f32) - z[r, nfull:, None])
        return out
