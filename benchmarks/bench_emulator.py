"""Emulator speed: load time, prefill and greedy decode tokens/s.

    python benchmarks/bench_emulator.py [--model builtin|smollm2-135m] [--tokens 64] [--work /tmp/romac-bench]

``builtin`` is the built-in default; ``smollm2-135m`` is a synthetic checkpoint with SmolLM2-135M's shapes
(30 layers, hidden 576, vocab 49,152), compiled at INT4 onto a target big enough for it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/romac-bench"))
    args = ap.parse_args()
    from romac.driver import compile_checkpoint
    from romac.emulator import Machine

    rows = []
    for name in args.model or ["builtin", "smollm2-135m"]:
        out = args.work / f"emu-{name}"
        shutil.rmtree(out, ignore_errors=True)
        if name == "builtin":
            compile_checkpoint(None, out)
        else:
            from synthetic import write_adapter, write_checkpoint

            src = args.work / name
            if not (src / "base" / "config.json").exists():
                write_checkpoint(name, src / "base")
                write_adapter(name, src / "adapter")
            compile_checkpoint(str(src / "base"), out, [f"chat={src / 'adapter'}"],
                               target=str(HERE / "targets" / "bench-1g.toml"))
        t0 = time.perf_counter()
        m = Machine(out, adapter="builtin" if name == "builtin" else "chat")
        m.step([1])  # decodes every region once
        load = time.perf_counter() - t0
        m.reset()
        prompt = list(range(1, 33))
        t0 = time.perf_counter()
        m.step(prompt)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        nxt = 1
        for _ in range(args.tokens):
            nxt = int(m.step([nxt])[-1].argmax())
        decode = time.perf_counter() - t0
        rows.append((name, load, len(prompt) / prefill, args.tokens / decode))
        shutil.rmtree(out, ignore_errors=True)
    print("| model | load + decode ROM s | prefill tok/s (32-token prompt) | decode tok/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, load, pf, dec in rows:
        print(f"| {name} | {load:.2f} | {pf:.0f} | {dec:.1f} |")


if __name__ == "__main__":
    main()
