"""How much faster could the emulator's INT4 decode product be in numba? A bound, not romac's kernel.

    python benchmarks/bench_kernel_headroom.py

Times the simplest INT4 g128 matrix-vector loop numba compiles well: codes as [rows, bytes] (high nibble = the
first half of each group's lanes), scales already float32, zeros float, the accumulation in 64 float32 lanes, no
tiles, banks or byte-level parameter decoding: what romac's kernel (romac.emulator.kernels) does per weight with
none of its bookkeeping. Beside it, the factorised form ``s·(Σ q·x) − s·z·Σx`` per group. Prints ms per call and
G weights/s for SmolLM2's 1536 x 576 projection and its 49,152 x 576 head (one position, one thread), median of 7;
compare with ``bench_kernels.py`` on the same machine in the same minutes.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from numba import njit

f32 = np.float32
LANES = 64  # one group of 128 INT4 codes is 64 bytes


@njit(nogil=True)
def direct(codes, scales, zeros, x_hi, x_lo, y):
    """y[o] = Σ_g Σ_k s(q - z)·x, each weight dequantized as the codec does."""
    rows, nbytes = codes.shape
    acc = np.zeros(LANES, f32)
    for o in range(rows):
        acc[:] = 0
        for g in range(nbytes // LANES):
            s, z, b0 = scales[o, g], zeros[o, g], g * LANES
            for k in range(LANES):
                c = np.int32(codes[o, b0 + k])
                acc[k] += (s * (f32(c >> 4) - z)) * x_hi[b0 + k] + (s * (f32(c & 15) - z)) * x_lo[b0 + k]
        t = f32(0)
        for k in range(LANES):
            t += acc[k]
        y[o] = t


@njit(nogil=True)
def factorised(codes, scales, zeros, x_hi, x_lo, x_sum, y):
    """y[o] = Σ_g s·(Σ_k q·x) − s·z·Σ_k x: no per-weight scale or zero."""
    rows, nbytes = codes.shape
    acc, grp = np.zeros(LANES, f32), np.zeros(LANES, f32)
    for o in range(rows):
        acc[:] = 0
        off = f32(0)
        for g in range(nbytes // LANES):
            s, z, b0 = scales[o, g], zeros[o, g], g * LANES
            for k in range(LANES):
                c = np.int32(codes[o, b0 + k])
                grp[k] = f32(c >> 4) * x_hi[b0 + k] + f32(c & 15) * x_lo[b0 + k]
            for k in range(LANES):
                acc[k] += s * grp[k]
            off += s * z * x_sum[g]
        t = f32(0)
        for k in range(LANES):
            t += acc[k]
        y[o] = t - off


def timed(f, *args) -> float:
    f(*args)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    print("| loop | shape | ms per call | G weights/s |")
    print("| --- | --- | ---: | ---: |")
    for rows, cols in ((1536, 576), (49152, 576)):
        rng = np.random.default_rng(0)
        padded = -(-cols // 128) * 128
        codes = rng.integers(0, 256, (rows, padded // 2), dtype=np.uint8)
        scales = rng.random((rows, padded // 128)).astype(f32)
        zeros = rng.integers(0, 16, (rows, padded // 128)).astype(f32)
        x_hi, x_lo = (rng.standard_normal(padded // 2).astype(f32) for _ in range(2))
        x_sum = (x_hi.reshape(-1, LANES).sum(1) + x_lo.reshape(-1, LANES).sum(1)).astype(f32)
        y = np.empty(rows, f32)
        for name, f, args in (("direct", direct, (codes, scales, zeros, x_hi, x_lo, y)),
                              ("factorised", factorised, (codes, scales, zeros, x_hi, x_lo, x_sum, y))):
            t = timed(f, *args)
            print(f"| {name} | {rows} x {cols} | {1e3 * t:.3f} | {rows * cols / t / 1e9:.2f} |")


if __name__ == "__main__":
    main()
