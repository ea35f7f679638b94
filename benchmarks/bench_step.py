"""Where the emulator's time goes, instruction by instruction: a prefill and greedy decode steps on compiled
artifacts, each handler timed.

    python benchmarks/bench_step.py ARTIFACTS [--adapter chat] [--threads 2] [--kernel native] [--prompt-tokens 32]
                                              [--steps 48] [--prefills 5]

For a prefill (the token ids 1..N, ``--prefills`` times) and for ``--steps`` decode steps after it, the table gives
each opcode's time a step (ms, the median step's wall time first), its handlers a step, and its time a handler.
A MATVEC that the native kernel computes together with the LORA after it (romac.emulator.vector_unit) is one
handler, counted as MATVEC. The timing adds two clock reads a handler (well under a microsecond); the figures are
only as quiet as the machine is (``docs/performance.md`` says how to read them).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from romac.emulator import Machine  # noqa: E402
from romac.spec import isa  # noqa: E402


def timed_step(m: Machine, tokens: list[int], per_op: collections.Counter, calls: collections.Counter) -> float:
    """One Machine.step with each handler timed into per_op / calls; returns the step's wall time."""
    m.buf = {isa.Buf.TOK: np.asarray(tokens, np.int64)}
    t0 = time.perf_counter()
    with m._blas.limit(limits=1, user_api="blas"):
        for handler, instr in m._handlers:
            a = time.perf_counter()
            handler(m, instr)
            per_op[instr.op.name] += time.perf_counter() - a
            calls[instr.op.name] += 1
    m.pos0 += len(tokens)
    return time.perf_counter() - t0


def table(title: str, walls: list[float], per_op: collections.Counter, calls: collections.Counter, n: int) -> None:
    print(f"\n{title}: median {statistics.median(walls) * 1e3:.2f} ms a step [{min(walls) * 1e3:.2f}-"
          f"{max(walls) * 1e3:.2f}]\n")
    print("| instruction | ms a step | handlers a step | µs a handler |")
    print("| --- | ---: | ---: | ---: |")
    for op, seconds in per_op.most_common():
        print(f"| {op} | {seconds / n * 1e3:.3f} | {calls[op] // n} | {seconds / calls[op] * 1e6:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--adapter", default="chat", help="the resident adapter ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernel", default="native", choices=("native", "numba", "numpy"))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prefills", type=int, default=5)
    args = ap.parse_args()
    m = Machine(args.artifacts, adapter=args.adapter or None, threads=args.threads, kernel=args.kernel)
    prompt = list(range(1, args.prompt_tokens + 1))
    m.step(prompt[:1])  # every region's kernel planned once
    per_op, calls, walls = collections.Counter(), collections.Counter(), []
    for _ in range(args.prefills):
        m.reset()
        walls.append(timed_step(m, prompt, per_op, calls))
    table(f"prefill of {len(prompt)} tokens, {args.threads} thread(s), {args.kernel}", walls, per_op, calls,
          args.prefills)
    per_op, calls, walls = collections.Counter(), collections.Counter(), []
    token = int(m.buf[isa.Buf.LOGITS][-1].argmax())
    for _ in range(args.steps):
        walls.append(timed_step(m, [token], per_op, calls))
        token = int(m.buf[isa.Buf.LOGITS][-1].argmax())
    table(f"decode, {args.steps} steps after it", walls, per_op, calls, args.steps)


if __name__ == "__main__":
    main()
