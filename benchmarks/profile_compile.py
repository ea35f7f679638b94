"""Where a compile's time goes, two ways (docs/performance.md, "Compile time at the chip's scale").

    py-spy record -r 40 --format raw -o prof.txt -- python -m romac.cli compile ...
    python benchmarks/profile_compile.py spy prof.txt          # share of py-spy samples per stage

    python benchmarks/profile_compile.py cpu compile BASE --adapter chat=AD --target roma-8b-w2 --out OUT -q
                                                               # thread CPU seconds per stage, in-process

``spy`` folds py-spy's collapsed stacks (all threads) into the stages below, the innermost matching frame
deciding; on a busy machine its samples count time a thread waited for a core, so its seconds are wall-ish.
``cpu`` runs ``romac`` in this process with the stages' functions wrapped to add up ``time.thread_time()``
(CPU actually used, per thread), beside the process's total. Stages a romac version lacks are skipped.
"""

from __future__ import annotations

import collections
import functools
import importlib
import re
import sys
import threading
import time

SPY_STAGES = [  # (stage, frame pattern)
    ("quantize: AffineCodec.quantize (numpy)", r"quantize \(romac/codecs/affine\.py"),
    ("quantize+pack: native kernel", r"quantize_pack_into|quantize_pack_tiles"),
    ("pack_tiles (numpy)", r"pack_tiles \(romac/codecs/tiles\.py"),
    ("check_finite", r"check_finite"),
    ("read rows (pread)", r"_read_rows"),
    ("fp16 -> float32 (astype in load)", r"load \(romac/frontend/safetensors_io\.py"),
    ("sha256 of the files", r"sha256_file"),
    ("bank writes (+ their sha256 since the native path)", r"_write_tiles|_BankWriter|BankWriter|write_runs"),
    ("tile placement", r"located|placed|tile_locations|tile_index|run_order|make_runs|tile_runs"),
    ("SRAM images", r"sram_image"),
    ("report, manifest", r"build_report|seal_manifest|_manifest"),
    ("passes", r"run_pipeline|romac/passes"),
    ("imports", r"_find_and_load"),
    ("waiting: idle worker threads", r"_worker \(concurrent/futures/thread\.py"),
    ("waiting: threads on a lock / the writer on a result", r"Condition\.|Future\.result"),
]

CPU_STAGES = [  # (module, attribute path, stage)
    ("romac.codecs.affine", "AffineCodec.quantize", "quantize (numpy)"),
    ("romac.backend.emit", "pack_tiles", "pack_tiles (numpy)"),
    ("romac.backend.emit", "check_finite", "check_finite"),
    ("romac.codecs.affine_tiles", "quantize_pack_into", "quantize+pack (native)"),
    ("romac.frontend.safetensors_io", "SafetensorsFile._read_rows", "read rows (pread)"),
    ("romac.frontend.safetensors_io", "SafetensorsFile.load", "read rows + widen to float32"),
    ("romac.backend.emit", "_write_tiles", "bank writes"),
    ("romac.backend.banks", "BankWriter.write_runs", "bank writes (incl. their sha256)"),
    ("romac.backend.banks", "BankWriter._hash", "  of which sha256 of the images"),
    ("romac.backend.emit", "sha256_file", "sha256 of the files"),
]


def spy(path: str, rate: float = 40.0) -> None:
    stages: collections.Counter = collections.Counter()
    total = 0
    for line in open(path, encoding="utf-8"):
        stack, _, count = line.rstrip().rpartition(" ")
        n, frames = int(count), stack.split(";")
        total += n
        stage = next((name for f in reversed(frames) for name, pat in SPY_STAGES if re.search(pat, f)), None)
        stages[stage or f"other: {frames[-1][:70]}"] += n
    for name, n in stages.most_common(16):
        print(f"{100 * n / total:5.1f}%  {n / rate:6.1f} s  {name}")
    print(f"{total} samples ({total / rate:.1f} s at {rate:g} Hz, all threads)")


def cpu(argv: list[str]) -> None:
    used: collections.Counter = collections.Counter()
    lock = threading.Lock()
    for module, attr, stage in CPU_STAGES:
        try:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            f = getattr(owner, name)
        except (ImportError, AttributeError):
            continue

        def timed(*a, _f=f, _stage=stage, **k):
            t0 = time.thread_time()
            try:
                return _f(*a, **k)
            finally:
                with lock:
                    used[_stage] += time.thread_time() - t0

        setattr(owner, name, functools.wraps(f)(timed))
    from romac.cli import main

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        main(argv)
    finally:
        print(f"wall {time.perf_counter() - t0:.1f} s, process CPU {time.process_time() - c0:.1f} s", file=sys.stderr)
        for stage, s in sorted(used.items(), key=lambda kv: -kv[1]):
            print(f"  {stage:36s} {s:6.1f} CPU s", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("spy", "cpu"):
        sys.exit(__doc__)
    if sys.argv[1] == "spy":
        spy(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 40.0)
    else:
        cpu(sys.argv[2:])
