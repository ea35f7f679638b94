"""Every float32 bit pattern through romac's float32 -> float16 rounding (the native affine kernel's,
``romac.codecs.affine_native.f32_to_f16_bits``) and numpy's ``astype(np.float16)``: the count of differences.

    python benchmarks/exhaustive_f16.py        # 2**32 patterns, about 8 minutes on one core

Too slow for the test suite (tests/test_affine_native.py checks every exponent and the rounding ties); run it after
touching the conversion. Result on the project's machine: 0 differences, NaN payloads included.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from romac.codecs.affine_native import f32_to_f16_bits

STEP = 1 << 24


@njit(nogil=True)
def _convert(f: np.ndarray, out: np.ndarray) -> None:
    for i in range(f.size):
        out[i] = f32_to_f16_bits(f[i])


def main() -> None:
    bad = nan_bad = 0
    t0 = time.time()
    out = np.empty(STEP, np.uint16)
    for k in range((1 << 32) // STEP):
        f = np.arange(k * STEP, (k + 1) * STEP, dtype=np.uint64).astype(np.uint32).view(np.float32)
        _convert(f, out)
        with np.errstate(over="ignore"):
            diff = out != f.astype(np.float16).view(np.uint16)
        nan = np.isnan(f)
        bad += int((diff & ~nan).sum())
        nan_bad += int((diff & nan).sum())
    print(f"all 2^32 float32 patterns: {bad} differences on non-NaN values, {nan_bad} on NaN payloads "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
