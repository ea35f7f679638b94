"""Native kernel throughput per matrix shape: one position (decode) and a prefill block, 1 and 2 threads, the C
kernel beside numba.

    python benchmarks/bench_kernels.py ARTIFACT_DIR [--positions 1 --positions 32] [--repeat 7] [--busy 1]
                                       [--engine auto --engine numba]

For every distinct matrix shape and format of a compiled artifact directory, ``Rom.matmul`` (romac.emulator.kernels:
group-dequantize-and-accumulate from the packed bank bytes) is timed on random activations, median of --repeat
calls after one warm-up; the table gives ms per call and weights per second (Gw/s = rows x cols x positions / time
/ 1e9), and the last line what one decode step's products add up to (every matrix region once, 1 position).
``--busy N`` keeps N other processes spinning during the measurement (a shared machine: how threads that wait for
a core they lost behave). ``--engine`` (repeatable; default ``auto`` and ``numba``): who computes, as
``Rom.matmul(engine=...)`` — ``auto`` is the C kernel where it computes the format; the engines' calls alternate
within each measurement, so their ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections import Counter

import numba
import numpy as np

from romac.emulator import Machine


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts")
    ap.add_argument("--positions", type=int, action="append", default=None)
    ap.add_argument("--threads", type=int, action="append", default=None)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--busy", type=int, default=0, help="other processes spinning meanwhile")
    ap.add_argument("--engine", action="append", default=None, choices=["auto", "c", "numba"])
    args = ap.parse_args()
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    m = Machine(args.artifacts)
    regions = [(rid, r) for rid, r in enumerate(m.manifest.regions) if r.constants_of is None and len(r.shape) == 2]
    def kind(r) -> tuple:
        spec = r.format.spec()
        return tuple(r.shape), spec["format"] + (f" g{spec['group_size']}" if "group_size" in spec else "")

    count = Counter(kind(r) for _, r in regions)
    first = {}
    for rid, r in regions:
        first.setdefault(kind(r), rid)
    rng = np.random.default_rng(0)
    threads = args.threads or [1, 2]
    engines = args.engine or ["auto", "numba"]
    step = {(e, t): 0.0 for e in engines for t in threads}
    print("| shape [out, in] | format | regions | positions | threads | "
          + " | ".join(f"{e}: ms per call | {e}: Gw/s" for e in engines)
          + (f" | {engines[0]} / {engines[1]} |" if len(engines) > 1 else " |"))
    print("| --- | --- | ---: | ---: | ---: |" + " ---: | ---: |" * len(engines) + (" ---: |" if len(engines) > 1 else ""))
    for (shape, fmt), rid in first.items():
        for positions in args.positions or [1, 32]:
            x = rng.standard_normal((positions, shape[1])).astype(np.float32)
            for t in threads:
                numba.set_num_threads(t)
                times: dict[str, list[float]] = {e: [] for e in engines}
                for e in engines:
                    m.rom.matmul(rid, x, engine=e)
                for _ in range(args.repeat):
                    for e in engines:
                        t0 = time.perf_counter()
                        m.rom.matmul(rid, x, engine=e)
                        times[e].append(time.perf_counter() - t0)
                med = {e: statistics.median(v) for e, v in times.items()}
                if positions == 1:
                    for e in engines:
                        step[(e, t)] += med[e] * count[(shape, fmt)]
                cells = " | ".join(f"{1e3 * med[e]:.3f} | {shape[0] * shape[1] * positions / med[e] / 1e9:.2f}"
                                   for e in engines)
                ratio = f" {med[engines[1]] / med[engines[0]]:.2f}x |" if len(engines) > 1 else ""
                print(f"| {shape[0]} x {shape[1]} | {fmt} | {count[(shape, fmt)]} | {positions} | {t} | {cells} |"
                      f"{ratio}", flush=True)
    print()
    print(f"numba threading layer {numba.threading_layer()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}, "
          f"{args.busy} other process(es) spinning")
    for e in engines:
        for t in threads:
            print(f"one decode step's products, {e}, {t} thread(s): {1e3 * step[(e, t)]:.1f} ms "
                  f"({1 / step[(e, t)]:.1f} steps/s if nothing else ran)")


if __name__ == "__main__":
    main()
