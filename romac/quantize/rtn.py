"""Round-to-nearest: AffineCodec's own quantizer, unchanged.

It is the baseline every other algorithm is measured against and the fallback they never do worse than
(per group, in the data-free optimisers). Delegating keeps its bytes identical to ``AffineCodec.quantize``:
a model compiled with ``rtn`` is the model romac compiled before this package existed.
"""

from __future__ import annotations

import numpy as np

from romac.codecs import AffineCodec, QuantTensor
from romac.quantize.grid import check_matrix, qmax_of


def quantize_rtn(w: np.ndarray, bits: int, group_size: int = 128) -> QuantTensor:
    """``AffineCodec(bits, group_size).quantize(w)``: lo = min(0, min g), hi = max(0, max g), nearest codes."""
    qmax_of(bits)
    return AffineCodec(bits, group_size).quantize(check_matrix(w, f"rtn int{bits}"))
