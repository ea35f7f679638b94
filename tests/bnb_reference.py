"""bitsandbytes' 4-bit dequantization as the tests compare against it, on any CPU.

bitsandbytes 0.50 has three CPU dequantization kernels, picked by the machine: scalar/AVX2 and NEON index the
absmax by flat blocks (as its quantizer, CUDA kernel and pure-torch reference do), while the AVX-512 kernel
indexes it per row, which is wrong when a row is not a whole number of blocks (rows shorter than a block get
another block's scale, or zeros). Its FP4 code 8 is +0.0 in the AVX-512 kernel, the table and the torch
reference, -0.0 in the scalar kernel. So the tests compare romac with:

* :func:`reference_dequantize`: bitsandbytes' pure-torch definition (``backends/default``), the same on every
  machine, for every shape;
* the native ``dequantize_4bit`` where every kernel computes the definition (:func:`native_is_defined`).

Both with :func:`same_values`: bit for bit, except that +0.0 equals -0.0.
"""

from __future__ import annotations

import numpy as np


def same_values(a, b) -> bool:
    """Same shape and the same float values: identical bits everywhere but in the sign of a zero (no NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype or np.isnan(a).any() or np.isnan(b).any():
        return False
    nonzero = a != 0
    return bool(np.array_equal(a, b) and np.array_equal(a[nonzero].view(np.uint32), b[nonzero].view(np.uint32)))


def native_is_defined(shape, blocksize: int) -> bool:
    """Whether bitsandbytes' native CPU dequantization gives the flat-block result on every machine."""
    return len(shape) >= 1 and shape[-1] % blocksize == 0


def reference_dequantize(packed, state) -> np.ndarray:
    """bitsandbytes' machine-independent 4-bit dequantization of (packed codes, QuantState), as float32."""
    import torch
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    out = _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax.float(), code, state.blocksize,
                                   tuple(state.shape), torch.float32)
    return out.reshape(tuple(state.shape)).numpy()
