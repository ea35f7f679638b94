"""The ROMA reference workloads, compiled for real: Llama-3.2-3B shapes onto roma-3b-w4, Llama-3-8B onto roma-8b-w2.

    python benchmarks/bench_roma.py [--work /tmp/romac-bench] [--model llama-3.2-3b] [--model llama-3-8b] [--keep]
    python benchmarks/bench_roma.py --work /work/bench --model llama-3-8b --repeat 3 \
        --python before=/tmp/venv-before/bin/python --python after=python

Writes each synthetic checkpoint once (sharded fp16 safetensors as transformers writes them, plus a rank-16
PEFT adapter on all seven projections; 6.4 GB and 16 GB) into --work and reuses it on later runs; then runs
``romac compile`` under ``/usr/bin/time -v`` and prints wall time, Mparam/s, CPU seconds (user + sys), peak RSS
(the 8B must stay under 1 GiB), what the chip holds, and the performance model's prediction read back from the
artifact directory. The artifact directories are deleted afterwards unless --keep.

``--verify`` then checks what each compile holds, as a user would, each under ``/usr/bin/time -v``: ``romac run``
(an 8-token prompt, ``--new-tokens`` greedy tokens, the adapter resident) and ``romac verify --model --adapter``
(emulator against the streaming float64 golden model and the FP32 reference, ``--verify-steps`` greedy steps, the
base and the adapter), then the emulator's greedy decode rate (``--decode-tokens`` steps after the prompt, one and
two threads); it prints wall time, peak RSS, the relative logit error, whether the greedy tokens agree and the
decode rate, and fails if a verify fails or passes the issue's limits (20 minutes, 6 GiB). ``--decode`` measures
only the decode rate, with the C kernel (``Machine(kernel="native")``) and numba alone (``--kernel`` picks), one and two threads.

A/B: each ``--python LABEL=COMMAND`` is an interpreter with its own romac installed (e.g. a venv of an older
commit), or a command that ends in one (``"numpy=env ROMAC_NATIVE=0 python"``); with ``--repeat N`` the labels
take turns N times (so that the machine's load hits them alike), every row is printed, then the median per
label, and the sha256 of every file of every run's artifact directory is compared: the benchmark fails if two
runs of a workload wrote different bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import config_for, write_adapter, write_checkpoint  # noqa: E402

WORKLOADS = {"llama-3.2-3b": "roma-3b-w4", "llama-3-8b": "roma-8b-w2"}
RSS_LIMIT_GIB = 1.0
#: what `romac verify` of each ROMA workload must stay within on this machine (issue 12)
VERIFY_LIMIT_S, VERIFY_RSS_LIMIT_GIB = 20 * 60, 6.0
PROMPT_IDS = "1,15,263,1024,4096,77,9000,31"


def ensure_checkpoint(model: str, work: Path) -> Path:
    src = work / model
    if not (src / "base" / "config.json").exists():  # config.json is written last: its presence means complete
        print(f"writing synthetic {model} into {src} ...", file=sys.stderr, flush=True)
        write_checkpoint(model, src / "base")
    if not (src / "adapter" / "adapter_config.json").exists():
        write_adapter(model, src / "adapter", rank=16)
    return src


def timed(cmd: list[str], check: bool = True) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS GiB, stdout) of a command run under /usr/bin/time -v."""
    # run from / : ``python -m`` puts the working directory first on sys.path, and a source tree there would
    # shadow the interpreter's own romac
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd="/")
    if proc.returncode and check:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    return seconds, cpu, rss, proc.stdout


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file of an artifact directory, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out


DECODE_SNIPPET = """
import sys, time
from romac.emulator import Machine
m = Machine(sys.argv[1], adapter="chat", threads=int(sys.argv[3]), kernel=sys.argv[5])
logits = m.step([int(t) for t in sys.argv[4].split(",")])
t0, n = time.perf_counter(), int(sys.argv[2])
for _ in range(n):
    logits = m.step([int(logits[-1].argmax())])
print(n / (time.perf_counter() - t0))
"""


def decode_rate(exe: str, out: Path, tokens: int, threads: int, kernel: str = "native") -> float:
    """Greedy decode tokens/s of a compiled workload on the emulator (after an 8-token prefill, adapter resident)."""
    proc = subprocess.run([*shlex.split(exe), "-c", DECODE_SNIPPET, str(out), str(tokens), str(threads), PROMPT_IDS,
                           kernel],
                          capture_output=True, text=True, cwd="/")
    if proc.returncode:
        sys.exit(f"decode of {out} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def run_and_verify(model: str, target: str, exe: str, src: Path, out: Path, args) -> dict:
    """`romac run` and `romac verify` of one compile, timed; what verify found, from its JSON."""
    romac = [*shlex.split(exe), "-m", "romac.cli"]
    print(f"romac run {model} ({args.new_tokens} new tokens) ...", file=sys.stderr, flush=True)
    run_s, run_cpu, run_rss, run_out = timed([*romac, "run", str(out), "--adapter", "chat", "--prompt-ids", PROMPT_IDS,
                                              "--max-new-tokens", str(args.new_tokens)])
    print(f"romac verify {model} ({args.verify_steps} steps, base and adapter) ...", file=sys.stderr, flush=True)
    ver_s, ver_cpu, ver_rss, ver_out = timed([*romac, "verify", str(out), "--model", str(src / "base"), "--adapter",
                                              f"chat={src / 'adapter'}", "--steps", str(args.verify_steps), "--json"],
                                             check=False)
    try:
        found = json.loads(ver_out)
    except json.JSONDecodeError:
        sys.exit(f"romac verify {model} printed no result:\n{ver_out[-2000:]}")
    rates = {t: decode_rate(exe, out, args.decode_tokens, t) for t in (1, 2)}
    return dict(model=model, target=target, run=(run_s, run_cpu, run_rss, run_out.strip()),
                verify=(ver_s, ver_cpu, ver_rss), checks=found, decode=rates)


def decode_rates(model: str, exe: str, out: Path, args) -> None:
    """The emulator's decode rate on one compile: each (kernel, threads) in turn, --repeat rounds; the median."""
    configs = [(k, t) for k in args.kernel or ("native", "numba") for t in (1, 2)]
    rates: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for rnd in range(args.repeat):
        for kernel, threads in configs:
            print(f"decode {model}: kernel={kernel}, threads={threads} (round {rnd + 1}) ...", file=sys.stderr, flush=True)
            rates[(kernel, threads)].append(decode_rate(exe, out, args.decode_tokens, threads, kernel))
    print(f"\n{model}: emulator greedy decode, {args.decode_tokens} steps after an 8-token prompt, adapter resident, "
          f"median of {args.repeat} [min-max]")
    print("| kernel | threads | decode tok/s |")
    print("| --- | ---: | ---: |")
    for (kernel, threads), r in rates.items():
        print(f"| {kernel} | {threads} | {statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}] |")


def print_checks(checks: list[dict]) -> None:
    print(f"\n| model | target | `romac run` wall s | run peak RSS GiB | `romac verify` wall s | verify CPU s "
          f"| verify peak RSS GiB | adapter | rel. logit error | greedy tokens | K/V rounding ties | top-1 vs FP32 "
          f"| FP32 reference | result |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |")
    failed = []
    for c in checks:
        (rs, _, rr, _), (vs, vc, vr) = c["run"], c["verify"]
        within = vs <= VERIFY_LIMIT_S and vr <= VERIFY_RSS_LIMIT_GIB
        for k in c["checks"]:
            same = sum(a == b for a, b in zip(k["tokens"], k["golden_tokens"]))
            onnx = k.get("onnx") or {}
            ok = k["passed"] and within
            failed += [] if ok else [c["model"]]
            print(f"| {c['model']} | {c['target']} | {rs:.0f} | {rr:.2f} | {vs:.0f} | {vc:.0f} | {vr:.2f} | "
                  f"{k['adapter'] or '(none)'} | {k['relative_error']:.2e} | {same}/{len(k['golden_tokens'])} | "
                  f"{k.get('kv_ties', 0)} of {k.get('kv_elements', 0):,} | "
                  f"{100 * onnx.get('top1_agreement', float('nan')):.1f}% | {onnx.get('reference', '-')} | "
                  f"{'ok' if ok else 'FAIL'} |")
    for c in checks:
        rates = ", ".join(f"{r:.2f} tok/s with threads={t}" for t, r in c["decode"].items())
        print(f"{c['model']}: romac run generated {c['run'][3]}; emulator decode {rates}")
    if failed:
        sys.exit(f"verify failed or exceeded {VERIFY_LIMIT_S // 60} min / {VERIFY_RSS_LIMIT_GIB} GiB: "
                 f"{', '.join(sorted(set(failed)))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/romac-bench"))
    ap.add_argument("--model", action="append", choices=sorted(WORKLOADS), default=None)
    ap.add_argument("--keep", action="store_true", help="keep the (last) artifact directories")
    ap.add_argument("--python", action="append", default=None, metavar="LABEL=COMMAND",
                    help="compile with this interpreter (repeatable: an A/B comparison); default: this one")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (the interpreters take turns in each)")
    ap.add_argument("--verify", action="store_true", help="also `romac run` and `romac verify` each compile")
    ap.add_argument("--new-tokens", type=int, default=4, help="greedy tokens of the `romac run` step")
    ap.add_argument("--decode-tokens", type=int, default=16, help="greedy steps of the decode-rate measurement")
    ap.add_argument("--verify-steps", type=int, default=16, help="greedy steps `romac verify` compares")
    ap.add_argument("--decode", action="store_true",
                    help="also the emulator's greedy decode rate of each compile, with Machine(kernel=native) (the C "
                         "kernel) and kernel=numba, one and two threads, taking turns --repeat times")
    ap.add_argument("--kernel", action="append", choices=["native", "numba"], default=None,
                    help="with --decode: the Machine kernels to measure (repeatable; default both)")
    args = ap.parse_args()
    pythons = [tuple(p.split("=", 1)) for p in args.python] if args.python else [("romac", sys.executable)]
    rows, sums, checks = [], {}, []
    for model in args.model or list(WORKLOADS):
        target = WORKLOADS[model]
        src = ensure_checkpoint(model, args.work)
        cfg = config_for(model)
        from romac.ir import expected_shape, tensor_names

        params = sum(math.prod(expected_shape(cfg, n)) for n in tensor_names(cfg))
        out = args.work / f"out-{model}-{target}"
        for rnd in range(args.repeat):
            for label, exe in pythons:
                shutil.rmtree(out, ignore_errors=True)
                cmd = [*shlex.split(exe), "-m", "romac.cli", "compile", str(src / "base"), "--adapter", f"chat={src / 'adapter'}",
                       "--target", target, "--out", str(out), "-q"]
                print(f"compiling {model} onto {target} with {label} (round {rnd + 1}) ...", file=sys.stderr, flush=True)
                seconds, cpu, rss, _ = timed(cmd)
                report = json.loads((out / "report.json").read_text())
                sums.setdefault(model, {})[f"{label} #{rnd + 1}"] = digests(out)
                rows.append((model, target, label, params, seconds, cpu, rss, report))
        if args.verify:
            checks.append(run_and_verify(model, target, pythons[-1][1], src, out, args))
        if args.decode:
            decode_rates(model, pythons[-1][1], out, args)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print("| model (synthetic, real shapes) | target | romac | parameters | wall s | Mparam/s | CPU s | peak RSS GiB "
          "| B-ROM used | bits/weight | longest context | decode tok/s @256 | TTFT @256 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model, target, label, p, s, cpu, r, rep in rows:
        (fmt, e), = rep["weights"]["effective_bits_per_weight"].items()
        perf = rep["performance"]
        d = next(d for d in perf["decode"] if d["context"] == 256)
        t = next(t for t in perf["ttft"] if t["prompt_tokens"] == 256)
        print(f"| {model} | {target} | {label} | {p / 1e9:.3f} B | {s:.1f} | {p / s / 1e6:.0f} | {cpu:.0f} | {r:.2f} | "
              f"{rep['rom']['used_bytes'] / 2**30:.3f} GiB ({100 * rep['rom']['utilisation']:.1f}%) | "
              f"{e['bits_per_weight']:.4f} {fmt} | {rep['sram']['longest_context']:,} | {d['tokens_per_s']:,.0f} | "
              f"{t['ms']:.2f} ms |")
    if args.repeat > 1 or len(pythons) > 1:
        print("\n| model | romac | runs | wall s: median [min-max] | CPU s: median [min-max] | peak RSS GiB: max |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for model in dict.fromkeys(r[0] for r in rows):
            for label, _ in pythons:
                mine = [r for r in rows if r[0] == model and r[2] == label]
                w, c = [r[4] for r in mine], [r[5] for r in mine]
                print(f"| {model} | {label} | {len(mine)} | {statistics.median(w):.1f} [{min(w):.1f}-{max(w):.1f}] | "
                      f"{statistics.median(c):.1f} [{min(c):.1f}-{max(c):.1f}] | {max(r[6] for r in mine):.2f} |")
    for model, runs in sums.items():
        first, *others = runs.items()
        differ = [name for name, d in others if d != first[1]]
        print(f"{model}: {len(runs)} artifact directories, {len(first[1])} files each: "
              + (f"DIFFERENT BYTES in {', '.join(differ)} (vs {first[0]})" if differ else "every file byte-identical"))
        if differ:
            sys.exit(1)
    if checks:
        print_checks(checks)
    over = sorted({r[0] for r in rows if r[6] > RSS_LIMIT_GIB})
    if over:
        sys.exit(f"peak RSS above {RSS_LIMIT_GIB} GiB: {', '.join(over)}")


if __name__ == "__main__":
    main()
