"""IEEE fp16 / fp32 stored as their bit patterns (uint16 / uint32); any shape."""

from __future__ import annotations

import numpy as np

from romac.codecs.base import Codec, QuantTensor
from romac.spec.formats import RawFormat


class RawCodec(Codec):
    """IEEE fp16 / fp32 stored as their bit patterns (uint16 / uint32); any shape."""

    def __init__(self, fmt: RawFormat) -> None:
        super().__init__(fmt)
        self._float, self._uint = fmt.float_dtype, fmt.uint_dtype

    def quantize(self, w: np.ndarray) -> QuantTensor:
        with np.errstate(over="ignore"):       # too large for fp16 -> inf, as IEEE says
            codes = np.asarray(w).astype(self._float).view(self._uint)
        return QuantTensor(self.name, tuple(codes.shape), codes, {})

    def dequantize(self, q: QuantTensor) -> np.ndarray:
        return np.asarray(q.codes, dtype=self._uint).view(self._float).astype(np.float32)
