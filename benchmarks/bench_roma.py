"""The ROMA reference workloads, compiled for real: Llama-3.2-3B shapes onto roma-3b-w4, Llama-3-8B onto roma-8b-w2.

    python benchmarks/bench_roma.py [--work /tmp/romac-bench] [--model llama-3.2-3b] [--model llama-3-8b] [--keep]

Writes each synthetic checkpoint once (sharded fp16 safetensors as transformers writes them, plus a rank-16
PEFT adapter on all seven projections; 6.4 GB and 16 GB) into --work and reuses it on later runs; then runs
``romac compile`` under ``/usr/bin/time -v`` and prints wall time, Mparam/s, peak RSS (the 8B must stay within
2 GiB), what the chip holds, and the performance model's prediction read back from the artifact directory.
The artifact directories are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import config_for, write_adapter, write_checkpoint  # noqa: E402

WORKLOADS = {"llama-3.2-3b": "roma-3b-w4", "llama-3-8b": "roma-8b-w2"}
RSS_LIMIT_GIB = 2.0


def ensure_checkpoint(model: str, work: Path) -> Path:
    src = work / model
    if not (src / "base" / "config.json").exists():  # config.json is written last: its presence means complete
        print(f"writing synthetic {model} into {src} ...", file=sys.stderr, flush=True)
        write_checkpoint(model, src / "base")
    if not (src / "adapter" / "adapter_config.json").exists():
        write_adapter(model, src / "adapter", rank=16)
    return src


def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS GiB, stdout) of a command run under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    return seconds, cpu, rss, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/romac-bench"))
    ap.add_argument("--model", action="append", choices=sorted(WORKLOADS), default=None)
    ap.add_argument("--keep", action="store_true", help="keep the artifact directories")
    args = ap.parse_args()
    rows = []
    for model in args.model or list(WORKLOADS):
        target = WORKLOADS[model]
        src = ensure_checkpoint(model, args.work)
        cfg = config_for(model)
        from romac.ir import expected_shape, tensor_names

        params = sum(math.prod(expected_shape(cfg, n)) for n in tensor_names(cfg))
        out = args.work / f"out-{model}-{target}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "romac.cli", "compile", str(src / "base"), "--adapter", f"chat={src / 'adapter'}",
               "--target", target, "--out", str(out), "-q"]
        print(f"compiling {model} onto {target} ...", file=sys.stderr, flush=True)
        seconds, cpu, rss, _ = timed(cmd)
        report = json.loads((out / "report.json").read_text())
        perf = report["performance"]
        d256 = next(d for d in perf["decode"] if d["context"] == 256)
        t256 = next(t for t in perf["ttft"] if t["prompt_tokens"] == 256)
        rows.append((model, target, params, seconds, cpu, rss, report, d256, t256))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print("| model (synthetic, real shapes) | target | parameters | wall s | Mparam/s | CPU s | peak RSS GiB "
          "| B-ROM used | bits/weight | longest context | decode tok/s @256 | TTFT @256 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, target, p, s, cpu, r, rep, d, t in rows:
        (fmt, e), = rep["weights"]["effective_bits_per_weight"].items()
        print(f"| {model} | {target} | {p / 1e9:.3f} B | {s:.1f} | {p / s / 1e6:.0f} | {cpu:.0f} | {r:.2f} | "
              f"{rep['rom']['used_bytes'] / 2**30:.3f} GiB ({100 * rep['rom']['utilisation']:.1f}%) | "
              f"{e['bits_per_weight']:.4f} {fmt} | {rep['sram']['longest_context']:,} | {d['tokens_per_s']:,.0f} | "
              f"{t['ms']:.2f} ms |")
    over = [m for m, _, _, _, _, r, *_ in rows if r > RSS_LIMIT_GIB]
    if over:
        sys.exit(f"peak RSS above {RSS_LIMIT_GIB} GiB: {', '.join(over)}")


if __name__ == "__main__":
    main()
