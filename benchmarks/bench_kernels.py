"""Native kernel throughput per matrix shape: one position (decode) and a prefill block, 1 and 2 threads.

    python benchmarks/bench_kernels.py ARTIFACT_DIR [--positions 1 --positions 32] [--repeat 7] [--busy 1]

For every distinct matrix shape and format of a compiled artifact directory, ``Rom.matmul`` (romac.emulator.kernels:
group-dequantize-and-accumulate from the packed bank bytes) is timed on random activations, median of --repeat
calls after one warm-up; the table gives ms per call and weights per second (Gw/s = rows x cols x positions / time
/ 1e9), and the last line what one decode step's products add up to (every matrix region once, 1 position).
``--busy N`` keeps N other processes spinning during the measurement (a shared machine: how threads that wait for
a core they lost behave).
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
    step = {t: 0.0 for t in threads}
    print("| shape [out, in] | format | regions | positions | threads | ms per call | Gw/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (shape, fmt), rid in first.items():
        for positions in args.positions or [1, 32]:
            x = rng.standard_normal((positions, shape[1])).astype(np.float32)
            for t in threads:
                numba.set_num_threads(t)
                m.rom.matmul(rid, x)
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    m.rom.matmul(rid, x)
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                if positions == 1:
                    step[t] += med * count[(shape, fmt)]
                print(f"| {shape[0]} x {shape[1]} | {fmt} | {count[(shape, fmt)]} | {positions} | {t} | "
                      f"{1e3 * med:.3f} | {shape[0] * shape[1] * positions / med / 1e9:.2f} |", flush=True)
    print()
    print(f"numba threading layer {numba.threading_layer()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}, "
          f"{args.busy} other process(es) spinning")
    for t in threads:
        print(f"one decode step's products, {t} thread(s): {1e3 * step[t]:.1f} ms "
              f"({1 / step[t]:.1f} steps/s if nothing else ran)")


if __name__ == "__main__":
    main()
