"""Evaluate compiled artifact directories of SmolLM2-135M the way quant_accuracy.py does (same held-out text, same
float32 forward, only the projections from ROM and the SRAM correction), without its sweep:

    python benchmarks/eval_compiled.py LABEL=DIR [LABEL=DIR ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quant_accuracy as qa  # noqa: E402


def main() -> None:
    model_dir, adapter_dir = qa.smollm2.hf_fp32(), qa.smollm2.adapter()
    tok = qa.transformers.AutoTokenizer.from_pretrained(model_dir)
    bos = tok.bos_token_id
    eval_path = next(p for p in qa.EVAL_TEXTS if p.is_file())
    eval_ids = [bos] + [i for i in tok(eval_path.read_text())["input_ids"] if i != bos][:1023]
    print(f"held-out: {eval_path} ({len(eval_ids)} tokens)", flush=True)
    ev = qa.Evaluator(model_dir, adapter_dir, eval_ids)
    prompt = [bos] + [i for i in tok(qa.PROMPT)["input_ids"] if i != bos]
    print(f"FP32 greedy: {tok.decode(ev.greedy(None, None, prompt, 24))!r}", flush=True)
    for spec in sys.argv[1:]:
        label, _, out = spec.partition("=")
        deq, corrs, bpw, corr_bytes = qa.compiled(Path(out), ev.proj)
        m = ev.metrics(deq, corrs)
        print(f"| {label} | {bpw:.3f} | {corr_bytes / 1e6:.2f} | {m['top1']:.3f} | {m['top1_ad']:.3f} | {m['kl']:.3f} | "
              f"{m['kl_ad']:.3f} | {m['ppl']:.2f} |", flush=True)
        print(f"  greedy: {tok.decode(ev.greedy(deq, corrs, prompt, 24))!r}", flush=True)


if __name__ == "__main__":
    main()
