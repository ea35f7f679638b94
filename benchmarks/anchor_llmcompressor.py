"""GPTQ from an established implementation (llm-compressor), run in its own venv by quant_accuracy.py.

    /work/venv-anchors/bin/python benchmarks/anchor_llmcompressor.py MODEL_DIR CALIB.json OUT.safetensors BITS GROUP

Quantizes every q/k/v/o/gate/up/down projection of the checkpoint with llm-compressor's GPTQModifier (asymmetric
integer, groups of GROUP along the input (llm-compressor needs in % GROUP == 0: SmolLM2's 576 rules
out 128, so the benchmark runs 64 and 192 = 576/3 = 1536/8 on either side of it), its own min/max observer and grid: float scale, integer zero point),
calibrated on the token sequences in CALIB.json, and writes the fake-quantized (dequantized) projection weights,
named like romac's tensors (``layers.0.self_attn.q_proj``), to OUT. Kept apart from romac: it needs
llm-compressor's pinned transformers, which is not the one romac's tests use.
"""

import json
import sys
import time

import torch


def main() -> None:
    model_dir, calib, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    import datasets
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file

    seqs = json.load(open(calib))
    ds = datasets.Dataset.from_dict({"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    recipe = GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "strategy": "group", "group_size": group, "symmetric": False,
            "dynamic": False}}},
        ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max(map(len, seqs)),
            num_calibration_samples=len(seqs))
    seconds = time.perf_counter() - t0
    tensors = {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            tensors[name.removeprefix("model.")] = mod.weight.detach().float().contiguous()
    save_file(tensors, out, metadata={"seconds": f"{seconds:.1f}", "llmcompressor": __import__("llmcompressor").__version__})
    print(json.dumps({"seconds": seconds, "tensors": len(tensors)}))


if __name__ == "__main__":
    main()
