"""SmolLM2-135M greedy decode, side by side: the romac emulator on compiled artifacts, and onnxruntime on the
FP32 ONNX export with KV cache (torch.onnx.export, dynamo), in the same run.

    python benchmarks/bench_smollm2.py [--quant int4 --quant nf4] [--tokens 64] [--prompt-tokens 32] [--repeat 3]

The real model and adapter come from the test fixtures (tests/fixtures/smollm2.py, cached in
``$ROMAC_TEST_CACHE`` or ``~/.cache/romac-tests``; the first run builds them, the ONNX export takes minutes).
For each ``--quant`` the FP32 checkpoint plus its LoRA adapter (r=8, all seven projections) is compiled onto
``benchmarks/targets/bench-1g.toml`` and run by the emulator with the adapter resident, with
``Machine(threads=1)`` (the default) and ``threads=2`` (large products split over two threads; bit-identical), and
with ``kernel="native"`` (the C kernel for the affine formats) and ``kernel="numba"`` (numba alone; same bits).
onnxruntime runs the FP32 base model (the adapter makes no difference to its speed; ``--onnx-adapter`` uses the
export with the adapter merged), once with its default intra-op threads and once with one.

Each measurement: prefill the prompt (the first ``--prompt-tokens`` tokens of real English text), then
``--tokens`` greedy decode steps at batch 1, each step feeding the previous step's token; tokens/s is the
number of decode steps over their wall time. The engines are measured in turn, ``--repeat`` rounds, and the
table shows the median round with the range in brackets, and each engine's speed over onnxruntime's (default
threads) of the same round, median and range over the rounds. The machine's load average is printed: the figures
are only as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def emulator_run(art: Path, threads: int, kernel: str, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode tokens/s, generated ids) on a freshly loaded Machine (ROM decoded before timing)."""
    from romac.emulator import Machine

    m = Machine(art, adapter="chat", threads=threads, kernel=kernel)
    m.step([prompt[0]])  # decodes every ROM region once
    m.reset()
    t0 = time.perf_counter()
    logits = m.step(prompt)
    prefill = time.perf_counter() - t0
    new = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = int(logits[-1].argmax())
        new.append(nxt)
        logits = m.step([nxt])
    return prefill, tokens / (time.perf_counter() - t0), new


def ort_run(sess, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    from tests.fixtures.onnx_exports import _run, ort_generate

    t0 = time.perf_counter()
    _run(sess, prompt, None)
    prefill = time.perf_counter() - t0
    new, spt = ort_generate(sess, prompt, tokens)
    return prefill, 1.0 / spt, new


def fmt(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", action="append", default=None, help="romac --quant for the emulator (repeatable)")
    ap.add_argument("--threads", type=int, action="append", default=None,
                    help="Machine(threads=...) for the emulator (repeatable; default 1 and 2)")
    ap.add_argument("--kernel", action="append", default=None,
                    help="Machine(kernel=...): native (the C kernel where it computes, numba elsewhere) and/or numba "
                         "(repeatable; default both)")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the table shows the median")
    ap.add_argument("--onnx-adapter", action="store_true", help="onnxruntime on the export with the adapter merged")
    ap.add_argument("--no-onnx", action="store_true", help="only the emulator")
    ap.add_argument("--work", type=Path, default=Path("/tmp/romac-bench"))
    args = ap.parse_args()
    quants = args.quant or ["int4", "nf4"]
    threads = args.threads or [1, 2]
    kernels = args.kernel or ["native", "numba"]

    from romac.driver import compile_checkpoint
    from romac.passes import CompileOptions
    from tests.fixtures import smollm2

    hf, adapter = smollm2.hf_fp32(), smollm2.adapter()
    prompt = smollm2.english_token_ids(args.prompt_tokens)
    arts = {}
    for q in quants:
        out = args.work / f"smollm2-{q}"
        t0 = time.perf_counter()
        compile_checkpoint(str(hf), out, [f"chat={adapter}"], target=str(HERE / "targets" / "bench-1g.toml"),
                           options=CompileOptions(quant=q), force=True)
        print(f"compiled {q} in {time.perf_counter() - t0:.1f} s -> {out}", flush=True)
        arts[q] = out

    engines: list[tuple[str, object]] = [
        (f"romac emulator ({k}), {q} + LoRA r8, threads={t}", ("emu", (arts[q], t, k)))
        for q in quants for k in kernels for t in threads]
    if not args.no_onnx:
        from tests.fixtures.onnx_exports import export_info, onnx_export, ort_session

        path = onnx_export("dynamo", kv_cache=True, adapter=args.onnx_adapter)
        info = export_info(path)
        print(f"onnx export {path} (torch {info['versions']['torch']}, onnxruntime {info['versions']['onnxruntime']})")
        label = "FP32" + (" + LoRA merged" if args.onnx_adapter else "")
        engines.append((f"onnxruntime {label}, KV cache, default threads", ("ort", ort_session(path))))
        engines.append((f"onnxruntime {label}, KV cache, intra_op_num_threads=1",
                        ("ort", ort_session(path, threads=1))))

    results: dict[str, dict[str, list]] = {name: {"prefill": [], "tps": [], "ids": None} for name, _ in engines}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeat):
        for name, (kind, obj) in engines:
            if kind == "emu":
                pf, tps, ids = emulator_run(*obj, prompt, args.tokens)
            else:
                pf, tps, ids = ort_run(obj, prompt, args.tokens)
            results[name]["prefill"].append(len(prompt) / pf)
            results[name]["tps"].append(tps)
            results[name]["ids"] = ids
            print(f"round {r + 1}: {name}: {tps:.1f} tok/s", flush=True)
        loads.append(os.getloadavg()[0])

    print()
    print(f"SmolLM2-135M, batch 1, {len(prompt)}-token prompt, {args.tokens} greedy decode steps, median of "
          f"{args.repeat} rounds [min–max]; 1-min load average during the run: "
          f"{min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} cores")
    print()
    # each engine against onnxruntime (default threads) of the same round: the machine's speed drifts between rounds
    base = next((name for name, (kind, _) in engines if kind == "ort"), None)
    print(f"| engine | prefill tok/s ({len(prompt)}-token prompt) | decode tok/s | prefill / onnxruntime "
          "(per round) | decode / onnxruntime (per round) | first generated ids |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, _ in engines:
        res = results[name]
        ratios = ["", ""]
        if base is not None:
            ratios = [fmt([a / b for a, b in zip(res[key], results[base][key])], 2) + "x" for key in ("prefill", "tps")]
        print(f"| {name} | {fmt(res['prefill'], 0)} | {fmt(res['tps'])} | {ratios[0]} | {ratios[1]} | "
              f"{','.join(map(str, res['ids'][:6]))} |")


if __name__ == "__main__":
    main()
