"""Compile throughput and peak memory on a synthetic checkpoint with real LLaMA shapes.

    python benchmarks/bench_compile.py [--model llama-3.2-1b] [--target benchmarks/targets/bench-1g.toml]
           [--quant int4] [--work /tmp/romac-bench]

Writes the synthetic checkpoint (sharded fp16 safetensors + a rank-16 PEFT adapter) once into --work, then runs
``romac compile`` under ``/usr/bin/time -v`` and prints a table: parameters, wall time, Mparam/s, peak RSS.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import config_for, write_adapter, write_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--target", default=str(HERE / "targets" / "bench-1g.toml"))
    ap.add_argument("--quant", action="append", default=None, help="formats to measure (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/romac-bench"))
    args = ap.parse_args()
    src = args.work / args.model
    if not (src / "base" / "config.json").exists():
        print(f"writing synthetic {args.model} into {src} ...", file=sys.stderr)
        write_checkpoint(args.model, src / "base")
        write_adapter(args.model, src / "adapter")
    cfg = config_for(args.model)
    from romac.frontend.hf import load_hf_checkpoint

    params = sum(int(__import__("math").prod(h.shape)) for n, h in load_hf_checkpoint(src / "base").weights.items())
    rows = []
    for quant in args.quant or ["int4"]:
        out = args.work / f"out-{args.model}-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = ["/usr/bin/time", "-v", "romac", "compile", str(src / "base"), "--adapter", f"chat={src / 'adapter'}",
               "--target", args.target, "--quant", quant, "--out", str(out), "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
        seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20
        rows.append((args.model, quant, params, seconds, params / seconds / 1e6, rss))
        shutil.rmtree(out, ignore_errors=True)
    print(f"| model | format | parameters | wall s | Mparam/s | peak RSS GiB |")
    print(f"| --- | --- | ---: | ---: | ---: | ---: |")
    for m, q, p, s, t, r in rows:
        print(f"| {m} ({cfg.num_layers} layers, hidden {cfg.hidden_size}) | {q} | {p / 1e9:.3f} B | {s:.1f} | {t:.0f} | {r:.2f} |")


if __name__ == "__main__":
    main()
