"""Throughput of romac's codecs on a 4096 x 4096 float32 matrix, in Mparam/s (best of 3).

Run: python benchmarks/bench_codecs.py
romac runs on one core (numpy); bitsandbytes' CPU quantize_4bit is shown alongside when importable,
with torch at one thread and at its default thread count.
"""

from __future__ import annotations

import time

import numpy as np

from romac.codecs import get_codec


def best_rate(fn, n: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e6


def main() -> None:
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    rows = []
    for label, kw in [("nf4", dict(format="nf4", double_quant=False)), ("nf4 + double quant", dict(format="nf4")),
                      ("int4 (group 128)", dict(format="int4")), ("int2 (group 128)", dict(format="int2"))]:
        codec = get_codec(**kw)
        q = codec.quantize(w)
        rows.append((f"romac {label}", best_rate(lambda: codec.quantize(w), w.size),
                     best_rate(lambda: codec.dequantize(q), w.size)))
    try:
        import torch
        import bitsandbytes.functional as F
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.from_numpy(w)
        default = torch.get_num_threads()
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            for dq in (False, True):
                packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=dq)
                rows.append((f"bitsandbytes nf4{' + double quant' if dq else ''} ({threads} thr)",
                             best_rate(lambda: F.quantize_4bit(t, blocksize=64, quant_type="nf4",
                                                               compress_statistics=dq), w.size),
                             best_rate(lambda: F.dequantize_4bit(packed, state), w.size)))
        torch.set_num_threads(default)
    print(f"{'codec (4096 x 4096 float32)':44s} {'quantize':>10s} {'dequantize':>11s}   Mparam/s")
    for name, qr, dr in rows:
        print(f"{name:44s} {qr:10.0f} {dr:11.0f}")


if __name__ == "__main__":
    main()
