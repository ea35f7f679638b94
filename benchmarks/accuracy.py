"""Accuracy of each ROM weight format on the real model: the table in docs/accuracy.md.

SmolLM2-135M-Instruct (tests/fixtures/smollm2.py) with its r=8 peft adapter, compiled per format onto the
1 GiB bench target, run by the emulator teacher-forced over real English text (the GPL-3 text that ships
with Debian), and compared with onnxruntime on torch.onnx exports of the FP32 model (the adapter merged for
the adapter rows). Prints a markdown table and the NF4 greedy continuation of "The capital of France is".

    python benchmarks/accuracy.py [--tokens 320] [--markdown docs/accuracy-table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romac.driver import compile_checkpoint  # noqa: E402
from romac.emulator import Machine  # noqa: E402
from romac.onnx_reference import _perplexity, kl_divergence, top1_agreement  # noqa: E402
from romac.passes import CompileOptions  # noqa: E402
from tests.fixtures import onnx_exports, smollm2  # noqa: E402
from tests.test_real_model import ort_logits  # noqa: E402

TARGET = str(ROOT / "benchmarks" / "targets" / "bench-1g.toml")
# (label, projection format, embedding/head format)
ROWS = [
    ("FP32", "fp32", "fp32"),
    ("NF4 (bnb, blocksize 64, double quant)", "nf4", "int8"),
    ("INT4 g128 (ROMA)", "int4", "int8"),
    ("INT4 g128, INT4 embedding too", "int4", "int4"),
    ("INT2 g128 (ROMA)", "int2", "int8"),
    ("INT8 g128", "int8", "int8"),
]
PROMPT = "The capital of France is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args()
    ids = smollm2.english_token_ids(args.tokens)
    toks = np.asarray(ids)
    ref = {None: ort_logits(onnx_exports.onnx_export("legacy"), ids),
           "lora": ort_logits(onnx_exports.onnx_export("legacy", adapter=True), ids)}
    lines = [f"Text: {args.tokens} tokens of the GPL-3 preamble (/usr/share/common-licenses/GPL-3). Reference: "
             "onnxruntime on a torch.onnx export of the FP32 model (adapter merged for the adapter rows); FP32 "
             f"perplexity {_perplexity(ref[None], toks):.2f} without the adapter, {_perplexity(ref['lora'], toks):.2f} with it.",
             "",
             "| weights (projections) | embedding / LM head | adapter | perplexity | top-1 agreement vs FP32 | KL vs FP32 (nats, mean) | ROM used (MiB) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    continuation = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, fmt, emb in ROWS:
            out = Path(tmp) / fmt / emb
            t0 = time.perf_counter()
            compile_checkpoint(str(smollm2.hf_fp32()), out, [f"lora={smollm2.adapter()}"], TARGET,
                               CompileOptions(quant=fmt, quant_embedding=emb))
            rom_mib = json.loads((out / "report.json").read_text())["rom"]["used_bytes"] / 2**20
            machine = Machine(out)
            for adapter in (None, "lora"):
                machine.reset(adapter=adapter)
                lg = machine.step(ids)
                row = (f"| {label} | {emb.upper()} | {'r=8' if adapter else 'none'} | {_perplexity(lg, toks):.2f} | "
                       f"{100 * top1_agreement(ref[adapter], lg):.1f}% | {kl_divergence(ref[adapter], lg).mean():.3f} | "
                       f"{rom_mib:.1f} |")
                lines.append(row)
                print(row, f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if fmt == "nf4":
                from romac.frontend.tokenizer import artifact_tokenizer, decode, encode

                tok = artifact_tokenizer(machine.manifest)
                machine.reset(adapter=None)
                prompt = encode(tok, PROMPT)
                new, _ = machine.generate(prompt, 16, stop=machine.config.get("eos_token_id"))
                continuation = decode(tok, prompt + new)
    lines += ["", f"NF4 greedy continuation (emulator, no adapter, 16 tokens): {continuation!r}"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
